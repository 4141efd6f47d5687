"""Instruction datasets: built-in sets, loaders for files, folders and hub datasets, and seeded splits."""

from .sources import FIELDS, SPLITS, Source, builtin, load_file, load_hub, load_source, make_splits, take

__all__ = ["FIELDS", "SPLITS", "Source", "builtin", "load_file", "load_hub", "load_source", "make_splits", "take"]
