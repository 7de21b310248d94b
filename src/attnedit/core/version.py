"""The package's version, written once: the package root re-exports it, pyproject reads it
(``[tool.setuptools.dynamic]``), and run manifests record it. Imports nothing."""

__version__ = "0.1.0"
