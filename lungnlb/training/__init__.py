"""Training: labelled slices from prepared studies, patient splits, multi-task loss, the training loop."""

from .dataset import SliceDataset, SliceSample, load_slices, read_records, slice_plan
from .loss import MultiTaskLoss
from .split import load_split, make_split, save_split
from .trainer import TrainConfig, TrainingSet, fit, train

__all__ = [
    "MultiTaskLoss", "SliceDataset", "SliceSample", "TrainConfig", "TrainingSet", "fit", "load_slices", "load_split", "make_split",
    "read_records", "save_split", "slice_plan", "train",
]
