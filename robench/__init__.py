"""robench: train and benchmark robust image classifiers around RLFAT (ICLR 2020)."""

__version__ = "0.1.0"

from robench.frame import outcomes_frame  # noqa: E402  (light: pandas is imported when it is called)

__all__ = ["__version__", "outcomes_frame"]
