"""Datasets: the on-disk format, the in-memory loader and the generators/converters that write it."""

from spineseg.data.dataset import (
    SPLITS,
    DatasetError,
    Sample,
    Split,
    assign_splits,
    load_split,
    read_manifest,
    splits_present,
    write_dataset,
)

__all__ = ["SPLITS", "DatasetError", "Sample", "Split", "assign_splits", "load_split", "read_manifest",
           "splits_present", "write_dataset"]
