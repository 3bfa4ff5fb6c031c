"""Data pipelines and the drop-in GutoutLoader. DALI is imported lazily, only by the `dali` backend."""

from .batch import Batch, LoaderConfig
from .datasets import ArrayDataset, DatasetError, FolderDataset, check_images, load_folder
from .loader import GutoutLoader, make_source

__all__ = [
    "ArrayDataset",
    "Batch",
    "DatasetError",
    "FolderDataset",
    "GutoutLoader",
    "LoaderConfig",
    "check_images",
    "load_folder",
    "make_source",
]
