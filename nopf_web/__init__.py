"""nopf: TCP hole punching with a local web dashboard."""

__version__ = "0.1.0"
