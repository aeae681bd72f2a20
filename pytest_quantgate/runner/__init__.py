"""Runner layer: gating one registry entry on one EP, end to end.

Owns ``gate.run_one`` (regenerate, cache, prepare, measure, lineage, speed, diagnosis, the regeneration rule)
and its helpers ``regen`` (rebuilding sidecars safely across workers) and ``cache`` (passing rows between runs).
May import every layer below it (base, ``io``, ``engine``, ``producers``, ``analysis``); never the reports or
the front ends.
"""
