"""Dataset preparation: sources -> deterministic WebDataset shards + ``manifest.json``.

Run ``python data_prep/make_shards.py --help`` from the repository root, or call
``prepare()`` (the trainer does, to create the digits demo data when it is missing).
This package never imports torch or webdataset: preparing data needs neither.
"""

from .dataset import DEFAULT_SHARD_SIZE, VERSION, prepare
from .sources import SOURCES, SourceError, SourceMissing
from .writer import MANIFEST

__all__ = ["prepare", "SOURCES", "SourceError", "SourceMissing", "MANIFEST",
           "DEFAULT_SHARD_SIZE", "VERSION"]
