"""Derive segmentation labels from boxes or clicks with a marker-controlled watershed (paper §IV.A)."""

from lungnlb.labels.watershed import WatershedParams, box_to_mask, points_to_mask

__all__ = ["WatershedParams", "box_to_mask", "points_to_mask"]
