"""normlab: batch-normalization variants, exactly as their papers define them, for any PyTorch model.

Layers follow torch's BatchNorm conventions (see :mod:`normlab.base`); :func:`convert` swaps them
into any model by name (:func:`kinds` lists the names).
"""

from .base import Moments, NormBase, batch_moments, inference_affine, is_stat_norm, load_statistics
from .batch_renorm import BatchRenorm, Ramp, paper_schedule
from .batchnorm import BatchNorm
from .registry import ConversionReport, convert, kinds, register

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "ConversionReport",
    "Moments",
    "NormBase",
    "Ramp",
    "batch_moments",
    "convert",
    "inference_affine",
    "is_stat_norm",
    "kinds",
    "load_statistics",
    "paper_schedule",
    "register",
]
