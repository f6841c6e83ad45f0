"""Drop-in replacements for existing research code (see :mod:`pynas.compat.darts`)."""
