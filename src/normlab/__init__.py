"""normlab: batch-normalization variants, exactly as their papers define them, for any PyTorch model.

Layers follow torch's BatchNorm conventions (see :mod:`normlab.base`); :func:`convert` swaps them
into any model by name (:func:`kinds` lists the names).
"""

from .adabn import adapt
from .base import BatchStats, Moments, NormBase, batch_moments, inference_affine, is_stat_norm, load_statistics
from .batch_renorm import BatchRenorm, Ramp, paper_schedule
from .batchnorm import BatchNorm
from .cross_iteration import CrossIterationBatchNorm
from .decorrelated import DecorrelatedBatchNorm
from .diagnostics import statistic_shift
from .distributed import sync, unsync
from .fold import fold
from .freezing import freeze, is_frozen, unfreeze
from .ghost import GhostBatchNorm
from .kalman import BatchKalmanNorm, sum_estimates
from .mean_only import MeanOnlyBatchNorm
from .normprop import NormPropConv2d, NormPropLinear, NormPropReLU, Standardize, dataset_statistics
from .pairing import find_pairs
from .population import recompute_statistics
from .registry import ConversionReport, convert, kinds, register
from .weight_norm import clip_weight_norm_, init_weight_norm, is_weight_normalized, remove_weight_norm, weight_norm

__version__ = "0.1.0"

__all__ = [
    "BatchKalmanNorm",
    "BatchNorm",
    "BatchRenorm",
    "BatchStats",
    "ConversionReport",
    "CrossIterationBatchNorm",
    "DecorrelatedBatchNorm",
    "GhostBatchNorm",
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
    "sync",
    "unsync",
    "MeanOnlyBatchNorm",
    "NormPropConv2d",
    "NormPropLinear",
    "NormPropReLU",
    "Standardize",
    "dataset_statistics",
    "clip_weight_norm_",
    "init_weight_norm",
    "is_weight_normalized",
    "remove_weight_norm",
    "weight_norm",
    "adapt",
    "find_pairs",
    "fold",
    "freeze",
    "is_frozen",
    "recompute_statistics",
    "statistic_shift",
    "sum_estimates",
    "unfreeze",
]
