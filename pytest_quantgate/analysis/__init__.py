"""Analysis layer: reading int8 graphs and explaining a drop.

Owns the one int8-graph model (``qgraph``: reading, dequantising and matching weights, SQNR), the lineage
judge (is the sidecar quantised from this fp32?) and the diagnosis (where does the drop come from?). May import
the base modules, ``io``, ``engine`` and ``producers`` (provenance records); never the runner, reports or front
ends.
"""
