"""spineseg: ensembles of pre-trained U-Nets for Th8–Th11 spine-region segmentation on radiographs."""

__version__ = "0.1.0"
