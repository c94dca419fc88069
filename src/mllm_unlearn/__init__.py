"""mllm-unlearn: make a multimodal LLM forget what target people look like.

Reference implementation of null-space-constrained contrastive visual forgetting (CVF + NCU).
Subpackages, in the direction data flows: ``data`` -> ``models`` -> ``nullspace`` / ``methods`` ->
``train`` -> ``evaluate`` -> ``experiments`` -> ``cli``.
"""

__version__ = "0.1.0"
