"""The version of adapt, recorded in the checkpoints, exports and results it writes."""

__version__ = "0.1.0"
