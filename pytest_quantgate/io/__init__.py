"""Input/output layer: reading what the user hands the gate.

Owns the registry (schema validation, entry paths, the write guard, the one text editor behind `quantgate pin`),
the soak fixtures (layouts, feeds, chunked reading) and bounded ``.npz`` reading. May import the base modules
(``errors``, ``records``, ``system``, ``settings``, ``fileio``) and nothing else of the package.
"""
