"""Data sources: the base class here; the built-in sources register themselves when their module is
imported, which :mod:`mkdt.data.registry` does on first use (see ``BUILTIN_MODULES``)."""

from mkdt.data.sources.base import Decoded, Source, SplitNotFound

BUILTIN_MODULES = ("digits", "idx", "imagefolder", "torchvision_sets", "finegrained")

__all__ = ["BUILTIN_MODULES", "Decoded", "Source", "SplitNotFound"]
