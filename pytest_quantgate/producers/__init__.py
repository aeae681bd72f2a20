"""Producers: the code that writes ``.int8.onnx`` sidecars (PTQ dynamic, PTQ static, weight-only, QAT and QAD).

Owns building a sidecar from an fp32 model (``ptq_*``, ``qat``, ``qad``, ``weight_only``), picking the producer
a registry entry names (``dispatch``), the provenance stored inside each sidecar and its atomic publishing
(``provenance``), and what a sidecar's bytes depend on (``build``). May import the base modules, ``io`` and
``engine`` (onnxruntime loading); never the analysis, the runner, the reports or the front ends.
"""
