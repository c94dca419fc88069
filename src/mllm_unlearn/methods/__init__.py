"""Unlearning methods, each a small class that defines its loss, picked by name from a registry.
One module per method; importing it registers the method."""

from . import cvf_ncu, ga, ga_diff, kl_min, manu, mmunlearner, npo, simnpo, siu  # noqa: F401  (registers them)
from .base import UnlearnContext, UnlearningMethod, available_methods, get_method, register, report_order

__all__ = ["UnlearnContext", "UnlearningMethod", "available_methods", "get_method", "register", "report_order"]
