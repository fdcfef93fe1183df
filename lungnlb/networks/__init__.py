"""Networks: the NLB U-Nets of the paper and the baselines of its tables, built by name."""

from .registry import build_model, is_segmentation_model, list_models, size_divisor
from .unet_nlb import SegClsUNet

__all__ = ["SegClsUNet", "build_model", "is_segmentation_model", "list_models", "size_divisor"]
