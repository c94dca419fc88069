"""Probe 5 — quantisation.

Protocol: the merged model is fake-quantised (:mod:`mllm_unlearn.models.quantize`: weight-only
round-to-nearest of every Linear but the LM head) with each spec — by default ``int8`` and ``int4``
per output channel (symmetric) and ``int4-g128`` / ``int4-g64`` group-wise (asymmetric, zero point,
as GPTQ / AWQ checkpoints store weights) — and forget VQA and retain VQA (canonical photos, option
likelihood) are measured. The vanilla model is quantised the same way: ``retain_ratio`` (quantised
over full-precision retain VQA) is to be read against ``retain_ratio_vanilla``, and forget VQA going
back up after quantisation means the unlearning update was smaller than a quantisation bin
(Zhang et al., ICLR 2025, arXiv 2410.16454: ~21 % of forget knowledge kept at full precision, ~83 %
after 4-bit).
"""

from __future__ import annotations

from collections.abc import Sequence

from ...models.loading import LoadedModel
from ...models.quantize import QuantSpec, quantized_copy
from .common import AuditData, score_mcqs

DEFAULT_SPECS = ("int8", "int4", "int4-g128", "int4-g64")


def quantized_vqa(lm: LoadedModel, data: AuditData, spec: QuantSpec) -> dict[str, float]:
    q = LoadedModel(quantized_copy(lm.model, spec), lm.processor, lm.arch)
    out = {
        "forget_vqa": score_mcqs(q, data.image_mcqs("forget")).accuracy(),
        "retain_vqa": score_mcqs(q, data.image_mcqs("retain")).accuracy(),
    }
    del q
    return out


def full_precision_vqa(lm: LoadedModel, data: AuditData) -> dict[str, float]:
    return {
        "forget_vqa": score_mcqs(lm, data.image_mcqs("forget")).accuracy(),
        "retain_vqa": score_mcqs(lm, data.image_mcqs("retain")).accuracy(),
    }


def quantization_probe(
    lm: LoadedModel,
    data: AuditData,
    specs: Sequence[str] = DEFAULT_SPECS,
    vanilla: dict[str, dict[str, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Per spec: the run's forget / retain VQA, retain ratio, and the vanilla model's (``vanilla`` =
    :func:`quantized_vqa` results of the vanilla model per spec name, plus ``fp`` for full precision)."""
    fp = full_precision_vqa(lm, data)
    out = {}
    for text in specs:
        spec = QuantSpec.parse(text)
        row = quantized_vqa(lm, data, spec)
        row["retain_ratio"] = row["retain_vqa"] / fp["retain_vqa"] if fp["retain_vqa"] else float("nan")
        row["forget_vqa_fp"] = fp["forget_vqa"]
        if vanilla is not None and spec.name in vanilla and "fp" in vanilla:
            v, vfp = vanilla[spec.name], vanilla["fp"]
            row.update(
                {
                    "forget_vqa_vanilla": v["forget_vqa"],
                    "retain_vqa_vanilla": v["retain_vqa"],
                    "retain_ratio_vanilla": v["retain_vqa"] / vfp["retain_vqa"] if vfp["retain_vqa"] else float("nan"),
                }
            )
        out[spec.name] = row
    return out


def vanilla_reference(lm: LoadedModel, data: AuditData, specs: Sequence[str] = DEFAULT_SPECS) -> dict:
    """What :func:`quantization_probe` compares against: the vanilla model's VQA per spec and in ``fp``."""
    out = {"fp": full_precision_vqa(lm, data)}
    for text in specs:
        spec = QuantSpec.parse(text)
        out[spec.name] = quantized_vqa(lm, data, spec)
    return out
