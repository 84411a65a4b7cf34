"""The package version, in a module of its own so that any stage can name it without importing the package's
``__init__`` (which sits above everything: it re-exports the public API). Keep it equal to pyproject.toml's."""

__version__ = "0.1.0"
