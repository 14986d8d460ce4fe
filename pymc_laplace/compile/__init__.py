"""Stage 1, model -> compiled functions: the only code that reads a ``pm.Model``, and what it builds with."""
