"""robench: train and benchmark robust image classifiers around RLFAT (ICLR 2020)."""

__version__ = "0.1.0"
