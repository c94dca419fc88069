"""Per-architecture adapters (a registry keyed by ``model_type``), loading, and the tiny model zoo."""

from .base import ArchAdapter, Batch, get_arch, register_arch, supported_archs
from .llava import LLAVA
from .loading import LoadedModel, load_model
from .qwen2_vl import QWEN2_5_VL, QWEN2_VL  # noqa: F401  (registers the Qwen2-VL / Qwen2.5-VL adapters)

__all__ = ["ArchAdapter", "Batch", "LLAVA", "LoadedModel", "get_arch", "load_model", "register_arch", "supported_archs"]
