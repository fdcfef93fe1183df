"""Infer tasks: NLB U-Net segmentation, slice classification, interactive watershed."""
