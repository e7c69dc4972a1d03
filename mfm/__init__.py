"""Masked Frequency Modeling pipeline."""

__version__ = "0.1.0"
