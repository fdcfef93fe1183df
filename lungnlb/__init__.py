"""LungNLB: U-Net with specialised non-local blocks for lung tumour segmentation and classification on CT."""

__version__ = "0.1.0"
