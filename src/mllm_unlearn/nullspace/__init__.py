"""Null-space-constrained unlearning (NCU, paper Sec. 3.2-3.3, Eq. 12-18).

Flow: :func:`target_linears` picks the LoRA targets of an update scope; :func:`collect_covariances`
(or :func:`cached_covariances`) measures the retain covariance of each target's input in one pass;
:func:`attach_lora` sets each LoRA A to the null-space basis of that covariance and freezes it, so
training (:func:`trainable_parameters`) moves only B; :func:`reference_model` gives the original
model back for reference outputs.
"""

from .bases import check_rank, forget_specific_directions, null_space_basis, random_basis, retain_energy
from .cache import CovarianceCache, cache_key, cached_covariances, fingerprint_samples
from .calibrate import (
    LayerStats,
    collect_covariances,
    default_image_features,
    full_forward,
    target_linears,
    unused_layers,
)
from .lora import (
    CalibrationEnergy,
    NCUConfig,
    attach_lora,
    base_weights,
    calibration_terms,
    lora_A_weights,
    lora_layers,
    reference_model,
    refreeze,
    trainable_parameters,
)

__all__ = [
    "CalibrationEnergy",
    "CovarianceCache",
    "LayerStats",
    "NCUConfig",
    "attach_lora",
    "base_weights",
    "cache_key",
    "cached_covariances",
    "calibration_terms",
    "check_rank",
    "collect_covariances",
    "default_image_features",
    "fingerprint_samples",
    "forget_specific_directions",
    "full_forward",
    "lora_A_weights",
    "lora_layers",
    "null_space_basis",
    "random_basis",
    "reference_model",
    "refreeze",
    "retain_energy",
    "target_linears",
    "trainable_parameters",
    "unused_layers",
]
