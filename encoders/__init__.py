"""``loupe.encoders``: see ``loupe/__init__.py`` for how the packages fit together."""

# The repository keeps this package at its top level and links it into loupe/, so a stray
# ``import encoders`` would load a second copy of every module (two of each class and registry).
if __name__ != "loupe.encoders":
    raise ImportError(f"import loupe.encoders, not {__name__}")
