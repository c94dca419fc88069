"""Unlearning methods, each a small class that defines its loss, picked by name from a registry."""

from . import baselines, cvf_ncu  # noqa: F401  (registers the methods)
from .base import UnlearnContext, UnlearningMethod, available_methods, get_method, register

__all__ = ["UnlearnContext", "UnlearningMethod", "available_methods", "get_method", "register"]
