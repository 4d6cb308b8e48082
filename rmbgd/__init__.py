"""rmbgd: a background-removal daemon."""

__version__ = "0.1.0"
