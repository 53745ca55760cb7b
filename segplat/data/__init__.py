"""Data: layout readers, the zarr patch store, patch datasets and device preprocessing."""

from segplat.data.datamodule import DataInfo, DataModule
from segplat.data.dataset import PatchDataset
from segplat.data.store import PatchStore, prepare_store

__all__ = ["DataInfo", "DataModule", "PatchDataset", "PatchStore", "prepare_store"]
