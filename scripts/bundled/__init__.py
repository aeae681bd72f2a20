"""The project's own bundled models: deterministic, seeded training scripts on real content.

``python -m scripts.bundled.build_all`` rebuilds every bundled model, its int8 sidecar, its fixtures and
``model/registry.json``. Training content comes only from the photographs and tables that ship inside the
scikit-image and scikit-learn wheels, so the build needs no network access.
"""
