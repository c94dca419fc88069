"""The report card: every probe on one model, the headline numbers, and the JSON / Markdown / PNG.

``report.json`` (schema ``mllm-unlearn/audit/1``) holds ``{"schema", "data", "forget", "config",
"runs": {name: card}, "timings": {name: seconds}}``; a card has one key per probe (``reference``,
``unseen``, ``identity``, ``relearn``, ``benign``, ``quantization``, ``oracle``; a probe that was not
run is absent) and ``headline``, the flat numbers that :mod:`mllm_unlearn.experiments.audit`
averages over worlds (:data:`HEADLINE`).

Summary score (``headline.summary``): the harmonic mean of

* forgetting ``F = clip((V - M) / (V - O), 0, 1)`` on unseen-photo forget VQA, where ``V``, ``M``, ``O``
  are the vanilla model's, this model's and the oracle's (chance, 0.25, without an oracle): the share
  of the vanilla-to-oracle gap closed on photos never used for unlearning;
* retention ``R = min_k clip(M_k / V_k, 0, 1)`` over retain VQA, real-world VQA, and the text-only
  QA of the forget and the retain people: the weakest of what must be kept. "Forgotten" means the
  face, not the text knowledge (the forget people's text-only QA must stay) nor anyone else, so a
  method that forgets the face by damaging text knowledge or other people pays for it here.

It is 1 for a model that forgets as far as the oracle on unseen photos while keeping every retain
answer, 0 when either part is 0 (a model that changes nothing scores F = 0, hence 0).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...models.loading import LoadedModel
from .common import CHANCE, AuditData, MCQScores, score_mcqs
from .forget_quality import forget_items_scores, forget_quality
from .identity import identity_probe
from .mia import mia_probe
from .quantization import DEFAULT_SPECS, quantization_probe, vanilla_reference
from .relearn import AttackBudget, benign_probe, relearn_probe
from .unseen import unseen_probe

SCHEMA = "mllm-unlearn/audit/1"
PROBES = ("unseen", "identity", "relearn", "benign", "quantization", "oracle")


@dataclass
class AuditConfig:
    forget: str = "forget_15"
    probes: tuple[str, ...] = PROBES
    budget: AttackBudget = field(default_factory=AttackBudget)
    quant_specs: tuple[str, ...] = DEFAULT_SPECS
    max_new_tokens: int = 24
    unseen_photos: int | None = None  # None: every unseen photo
    # also give the oracle a card (when there is one): the gold standard of every probe, e.g. what a
    # model that never saw the forget people names them, and how far relearning lifts it
    audit_oracle: bool = True
    #: run the relearning probe both ways (attack half A, measure B; then attack B, measure A) and pool them,
    #: instead of the protocol's one way. The same quantity on twice the people: one way rests on half the
    #: forget people's canonical questions (20 in the synthetic worlds' forget_15) and on which half is attacked.
    #: Measured on cvf_ncu's default, three draws on development worlds 18-20 and 21-23: the standard deviation
    #: between draws of one world is 0.125 / 0.173 one way and 0.070 / 0.089 both ways; over five such sets of
    #: three worlds 0.119 against 0.078 (larger both ways on one set: 0.074 against 0.051; docs/method.md,
    #: twenty-fourth pass). Off by default, so the audit's tables keep the published protocol; ``dev_sweep.py
    #: --relearn-both-halves`` and ``mllm-unlearn audit --relearn-both-halves`` turn it on
    relearn_both_halves: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.probes) - set(PROBES)
        if unknown:
            raise ValueError(f"unknown probe(s) {sorted(unknown)}; known: {', '.join(PROBES)}")


@dataclass
class References:
    """What every card is compared with, computed once per audit: the vanilla model's numbers, its
    quantised numbers, and the oracle's forget-item scores and MIA."""

    vanilla: dict[str, float] = field(default_factory=dict)  # reference + unseen numbers of vanilla
    vanilla_quant: dict[str, dict[str, float]] | None = None
    oracle_scores: MCQScores | None = None
    oracle: dict[str, float] = field(default_factory=dict)  # the oracle's reference numbers and MIA


def reference_metrics(lm: LoadedModel, data: AuditData) -> dict[str, float]:
    """Forget / retain / real-world VQA on the canonical photos, and the forget and retain people's
    text-only QA (option likelihood)."""
    vqa = {f"{split}_vqa": score_mcqs(lm, data.image_mcqs(split)).accuracy() for split in ("forget", "retain", "real")}
    qa = {
        f"{split}_qa": score_mcqs(lm, data.bench.items(split, "mcq", "qa")).accuracy() for split in ("forget", "retain")
    }
    return {**vqa, **qa}


def _numbers(prefix: str, probe: dict[str, Any]) -> dict[str, float]:
    """A probe's scalar results as reference metrics, keys prefixed (per-person breakdowns left out)."""
    return {f"{prefix}_{k}": v for k, v in probe.items() if not isinstance(v, dict)}


def prepare_references(
    vanilla: LoadedModel, data: AuditData, cfg: AuditConfig, oracle: LoadedModel | None = None
) -> References:
    refs = References()
    refs.vanilla = {
        **reference_metrics(vanilla, data),
        **_numbers("unseen", unseen_probe(vanilla, data, cfg.unseen_photos)),
    }
    if "quantization" in cfg.probes:
        refs.vanilla_quant = vanilla_reference(vanilla, data, cfg.quant_specs)
    if oracle is not None:
        refs.oracle_scores = forget_items_scores(oracle, data)
        refs.oracle = {
            **reference_metrics(oracle, data),
            **_numbers("unseen", unseen_probe(oracle, data, cfg.unseen_photos)),
            **mia_probe(oracle, data),
        }
    return refs


def audit_model(lm: LoadedModel, data: AuditData, cfg: AuditConfig, refs: References) -> dict[str, Any]:
    """Every configured probe on ``lm`` (a plain, merged model), as one card."""
    card: dict[str, Any] = {"reference": reference_metrics(lm, data)}
    seconds: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        card[name] = fn(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - t0, 1)

    if "unseen" in cfg.probes:
        timed("unseen", unseen_probe, lm, data, cfg.unseen_photos)
    if "identity" in cfg.probes:
        timed("identity", identity_probe, lm, data, cfg.max_new_tokens)
    if "relearn" in cfg.probes:
        timed("relearn", relearn_probe, lm, data, cfg.budget, both_halves=cfg.relearn_both_halves)
    if "benign" in cfg.probes:
        timed("benign", benign_probe, lm, data, cfg.budget)
    if "quantization" in cfg.probes:
        timed("quantization", quantization_probe, lm, data, cfg.quant_specs, refs.vanilla_quant)
    if "oracle" in cfg.probes and refs.oracle_scores is not None:
        t0 = time.perf_counter()
        card["oracle"] = {
            **forget_quality(forget_items_scores(lm, data), refs.oracle_scores),
            **mia_probe(lm, data),
            "mia_auc_oracle": refs.oracle.get("mia_auc", math.nan),
        }
        seconds["oracle"] = round(time.perf_counter() - t0, 1)
    card["seconds"] = seconds
    card["headline"] = headline(card, refs)
    return card


#: the flat per-card numbers (``headline``) and what each means; arrows: which way is better for
#: forgetting (↓ / ↑) or utility (↑)
HEADLINE = {
    "forget_vqa": "forget VQA, photos used for unlearning ↓",
    "unseen_forget_vqa": "forget VQA on unseen photos ↓",
    "still_recognised": "share of forget people whose unseen-photo forget VQA exceeds chance + 0.15 ↓",
    "retain_vqa": "retain VQA ↑",
    "real_vqa": "real-world VQA ↑",
    "forget_qa": "forget people's text-only QA (what is known by name stays) ↑",
    "retain_qa": "retain people's text-only QA ↑",
    "unseen_retain_vqa": "retain VQA on unseen photos ↑",
    "misid_train": "share of forget training photos named as another known person ↓",
    "misid_unseen": "share of forget unseen photos named as another known person ↓",
    "true_name_unseen": "share of forget unseen photos still named correctly ↓",
    "stranger_misid": "share of stranger photos named as a known person ↓",
    "relearn_after": "held-out-half forget VQA after the relearning attack ↓",
    "relearn_recovery": "its rise from before the attack ↓",
    "relearn_unseen_recovery": "the same half's rise on its unseen photos ↓",
    "benign_forget_after": "forget VQA after benign fine-tuning on retain pairs ↓",
    "benign_unseen_after": "unseen forget VQA after benign fine-tuning ↓",
    "int8_forget_vqa": "forget VQA after int8 ↓",
    "int4_forget_vqa": "forget VQA after int4 per channel ↓",
    "int4_retain_ratio": "retain VQA after int4 / before ↑",
    "int4g128_forget_vqa": "forget VQA after int4 group 128 ↓",
    "forget_quality": "KS p-value vs the oracle, truth ratio ↑",
    "mia_auc": "loss MIA AUC forget vs stranger photos (oracle ≈ 0.5) ↓",
    "summary": "harmonic mean of forgetting (unseen, oracle-scaled) and retention ↑",
}


def _get(d: dict, *path, default=math.nan):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def headline(card: dict, refs: References) -> dict[str, float]:
    ident = card.get("identity", {})
    strangers = ident.get("strangers", {})
    h = {
        "forget_vqa": _get(card, "reference", "forget_vqa"),
        "unseen_forget_vqa": _get(card, "unseen", "forget_vqa"),
        "still_recognised": _get(card, "unseen", "still_recognised"),
        "retain_vqa": _get(card, "reference", "retain_vqa"),
        "real_vqa": _get(card, "reference", "real_vqa"),
        "forget_qa": _get(card, "reference", "forget_qa"),
        "retain_qa": _get(card, "reference", "retain_qa"),
        "unseen_retain_vqa": _get(card, "unseen", "retain_vqa"),
        "misid_train": _get(ident, "forget_train", "misidentified"),
        "misid_unseen": _get(ident, "forget_unseen", "misidentified"),
        "true_name_unseen": (
            _get(ident, "forget_unseen", "true_name") / _get(ident, "forget_unseen", "n", default=1)
            if "forget_unseen" in ident
            else math.nan
        ),
        "stranger_misid": _get(strangers, "misidentified"),
        "relearn_after": _get(card, "relearn", "forget_vqa_after"),
        "relearn_recovery": _get(card, "relearn", "recovery"),
        "relearn_unseen_recovery": _get(card, "relearn", "unseen_recovery"),
        "benign_forget_after": _get(card, "benign", "forget_vqa_after"),
        "benign_unseen_after": _get(card, "benign", "unseen_vqa_after"),
        "int8_forget_vqa": _get(card, "quantization", "int8", "forget_vqa"),
        "int4_forget_vqa": _get(card, "quantization", "int4", "forget_vqa"),
        "int4_retain_ratio": _get(card, "quantization", "int4", "retain_ratio"),
        "int4g128_forget_vqa": _get(card, "quantization", "int4-g128", "forget_vqa"),
        "forget_quality": _get(card, "oracle", "forget_quality"),
        "mia_auc": _get(card, "oracle", "mia_auc"),
    }
    h["summary"] = summary_score(h, refs)
    return {k: float(v) for k, v in h.items()}


def summary_score(h: dict[str, float], refs: References) -> float:
    """See the module docstring."""
    v_u = refs.vanilla.get("unseen_forget_vqa", math.nan)
    o_u = refs.oracle.get("unseen_forget_vqa", CHANCE)
    m_u = h.get("unseen_forget_vqa", math.nan)
    kept = [
        (refs.vanilla.get(k, math.nan), h.get(k, math.nan))
        for k in ("retain_vqa", "real_vqa", "forget_qa", "retain_qa")
    ]
    kept = [(v, m) for v, m in kept if not (math.isnan(v) or math.isnan(m)) and v > 0]
    gap = v_u - o_u
    if math.isnan(v_u) or math.isnan(m_u) or gap <= 0 or not kept:
        return math.nan
    forgetting = min(1.0, max(0.0, (v_u - m_u) / gap))
    retention = min(min(1.0, max(0.0, m / v)) for v, m in kept)
    return 0.0 if forgetting + retention == 0 else 2 * forgetting * retention / (forgetting + retention)


# ------------------------------------------------------------------------------------------ report


def report_dict(
    cards: dict[str, dict], data: AuditData, cfg: AuditConfig, refs: References, timings: dict[str, float] | None = None
) -> dict:
    return {
        "schema": SCHEMA,
        "data": str(data.root),
        "forget": data.forget_split,
        "config": asdict(cfg),
        "references": {"vanilla": refs.vanilla, "oracle": refs.oracle},
        "runs": cards,
        "timings": timings or {},
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _detail(title: str, header: Sequence[str], rows: list[tuple]) -> list[str]:
    """A titled Markdown table (nothing when there are no rows)."""
    if not rows:
        return []
    head = ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return head + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def markdown_report(report: dict) -> str:
    runs = report["runs"]
    lines = [
        f"# Audit: {report['data']} ({report['forget']})",
        "",
        "Is the forgetting real? One column per probe; see docs/audit.md for every protocol.",
        "",
        "## Headline",
        "",
    ]
    keys = list(HEADLINE)
    lines += ["| metric | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for k in keys:
        lines.append(
            f"| {k} ({HEADLINE[k]}) | " + " | ".join(_fmt(c["headline"].get(k, math.nan)) for c in runs.values()) + " |"
        )
    ident_cols = ("n", "true_name", "other_name", "no_name", "unknown_reply")
    lines += _detail(
        "Identity replies (true name / another known name / no name; 'don't know' among no name)",
        ("run", "set", *ident_cols, "example"),
        [
            (name, key, *(row[c] for c in ident_cols), (row["examples"] or [""])[0].replace("|", "/"))
            for name, c in runs.items()
            for key, row in c.get("identity", {}).items()
        ],
    )
    quant_cols = ("forget_vqa", "retain_vqa", "retain_ratio", "forget_vqa_vanilla", "retain_ratio_vanilla")
    lines += _detail(
        "Quantisation (forget VQA / retain ratio; vanilla under the same quantisation)",
        ("run", "spec", *quant_cols),
        [
            (name, spec, *(row.get(c, math.nan) for c in quant_cols))
            for name, c in runs.items()
            for spec, row in c.get("quantization", {}).items()
        ],
    )
    if report.get("references", {}).get("oracle"):
        o = report["references"]["oracle"]
        lines += [
            "",
            f"Oracle (retrained without the forget people): forget VQA {_fmt(o.get('forget_vqa'))}, "
            f"unseen forget VQA {_fmt(o.get('unseen_forget_vqa'))}, retain VQA {_fmt(o.get('retain_vqa'))}, "
            f"MIA AUC {_fmt(o.get('mia_auc'))}.",
        ]
    return "\n".join(lines) + "\n"


#: the headline numbers the PNG shows (all in [0, 1])
PLOT_KEYS = (
    "forget_vqa",
    "unseen_forget_vqa",
    "retain_vqa",
    "misid_unseen",
    "true_name_unseen",
    "relearn_after",
    "benign_forget_after",
    "int4_forget_vqa",
    "int4_retain_ratio",
    "forget_quality",
    "mia_auc",
    "summary",
)


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = report["runs"]
    keys = [k for k in PLOT_KEYS if any(not math.isnan(c["headline"].get(k, math.nan)) for c in runs.values())]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(keys) + 2), 4.5))
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(keys))
    for i, (name, card) in enumerate(runs.items()):
        vals = [card["headline"].get(k, math.nan) for k in keys]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, [0 if math.isnan(v) else v for v in vals], width, label=name)
    ax.set_xticks(x, keys, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value (see report.md for direction)")
    ax.set_title(f"Audit {Path(report['data']).name} ({report['forget']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str | Path, report: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False, default=float) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    plot_report(report, out / "report.png")
    return out
