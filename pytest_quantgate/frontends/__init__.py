"""Front ends: the ways users run the gate.

Owns the pytest plugin (``plugin`` hooks and options, ``items``, ``stash``), the ``quantgate`` command
(``cli``), the pre-commit hook (``precommit``) and ``quantgate advise``. May import every other layer; nothing
imports a front end.
"""
