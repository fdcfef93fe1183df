"""Calibrations and measurements that set the library's constants; run as ``python -m experiments.<name>``."""
