"""The data layer: named sources decoded once into a cache, loaded as :class:`ImageSet`."""

from mkdt.data.imageset import ImageSet, denormalize, normalize
from mkdt.data.registry import DataConfig, available_sources, load_dataset, register_source
from mkdt.data.splits import holdout_split, labelled_split, load_split, save_split

__all__ = [
    "DataConfig",
    "ImageSet",
    "available_sources",
    "denormalize",
    "holdout_split",
    "labelled_split",
    "load_dataset",
    "load_split",
    "normalize",
    "register_source",
    "save_split",
]
