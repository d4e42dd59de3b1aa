"""fewstep: train, sample and fairly compare one-step and few-step generative models.

Importing fewstep is cheap (no torch); heavy modules are imported where used.
"""
from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
