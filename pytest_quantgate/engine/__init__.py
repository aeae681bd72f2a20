"""Measurement layer: running both models and turning their outputs into statistics.

Owns onnxruntime loading and sessions (``ort``, ``providers``, ``sessions``), the capture of what ORT logs
(``logcapture``), the streaming sums and their bootstrap (``streaming``, ``metrics``) and the per-output checks
that build a ``GateResult`` (``comparison``). May import the base modules and ``io``; never the analysis, the
producers, the runner, the reports or the front ends.
"""
