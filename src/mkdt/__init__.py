"""mkdt: dataset distillation for self-supervised pre-training (MKDT, ICLR 2025)."""

__version__ = "0.1.0"

from mkdt.errors import MkdtError

__all__ = ["MkdtError", "__version__"]
