"""attnedit: attention-aware knowledge editing of large language models."""

__version__ = "0.1.0"

__all__ = ["__version__"]
