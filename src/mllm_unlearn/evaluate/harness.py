"""The evaluation protocol: Forget / Retain / Real-world / Test x VQA (with image) / QA (text only).

Every item is scored on its own (:class:`ItemResult`), then aggregated into stable metric keys:

- ``{split}_{vqa|qa}``: MCQ accuracy in [0, 1], by the chosen ``mcq_mode``:
  ``generate`` = MLLMU-Bench's protocol (greedy generation, letter parsing), or
  ``likelihood`` = the option whose text has the highest log-likelihood as the answer (fast, no parsing).
  With ``mcq_mode="both"`` the key holds the protocol's number and both variants are also written
  as ``{split}_{mod}_letter`` and ``{split}_{mod}_lik``.
- ``{split}_{mod}_cloze``: cloze accuracy; ``{split}_{mod}_rougeL`` / ``_rougeL_recall``: generation
  (CLEAR reports ROUGE-L recall on captions: ``{split}_vqa_rougeL_recall``).

``protocol`` picks the benchmark's generation protocol for MCQs: ``mllmu`` (its prompt, the reply's
letter; also used for CLEAR's name MCQ) or ``umu`` (UMU-Bench's ``Select answer in [...]`` prompt,
the reply matched to an option's *text*, by closest string similarity on the real-world split), which
also adds UMU's cross-modal agreement ``{split}_both_right`` / ``{split}_both_wrong`` over paired
text-only / with-image versions of the same question.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.prompts import format_cloze, format_mcq
from ..data.sample import SPLITS, BenchmarkData, Sample
from ..models.loading import LoadedModel
from ..models.scoring import answer_logprobs, eval_mode, generate
from .metrics import cloze_correct, parse_choice, rouge_l
from .protocols import cross_modal, match_option_text, pair_modalities, umu_mcq_body

MCQ_MODES = ("generate", "likelihood", "both")
PROTOCOLS = ("mllmu", "umu")


@dataclass
class EvalConfig:
    mcq_mode: str = "generate"
    batch_size: int = 32
    max_new_tokens: int = 50  # MLLMU-Bench generates 50 new tokens
    length_norm: bool = False  # likelihood mode: mean instead of summed log-prob per option
    splits: tuple[str, ...] = SPLITS
    protocol: str = "mllmu"

    def __post_init__(self) -> None:
        if self.mcq_mode not in MCQ_MODES:
            raise ValueError(f"mcq_mode must be one of {MCQ_MODES}, not {self.mcq_mode!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {self.protocol!r}")


@dataclass
class ItemResult:
    id: str
    person: str
    split: str
    task: str
    modality: str
    metric: str  # "letter", "lik", "cloze", "rougeL"
    score: float  # 1/0 for accuracies, ROUGE-L F for generation
    prediction: str
    recall: float | None = None


def _chunks(items: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _score_mcq_letter(lm, split, items, cfg) -> list[ItemResult]:
    """The benchmark's generation protocol: MLLMU's letter, or UMU's option text."""
    if cfg.protocol == "umu":
        replies = generate(lm, items, [umu_mcq_body(s.question, s.options) for s in items], cfg.max_new_tokens)
        picks = [match_option_text(r, s.options, fuzzy=split == "real") for s, r in zip(items, replies)]
    else:
        replies = generate(lm, items, [format_mcq(s.question, s.options) for s in items], cfg.max_new_tokens)
        picks = [parse_choice(r, "".join(sorted(s.options))) for s, r in zip(items, replies)]
    return [
        ItemResult(s.id, s.person, split, s.task, s.modality, "letter", float(p == s.correct), r)
        for s, r, p in zip(items, replies, picks)
    ]


def _score_mcq_likelihood(lm, split, items, cfg) -> list[ItemResult]:
    flat = [(s, letter, text) for s in items for letter, text in sorted(s.options.items())]
    with torch.no_grad():
        lp = answer_logprobs(
            lm, [f[0] for f in flat], [f[0].question for f in flat], [f[2] for f in flat], length_norm=cfg.length_norm
        ).cpu()
    results, i = [], 0
    for s in items:
        k = len(s.options)
        best = sorted(s.options)[int(lp[i : i + k].argmax())]
        results.append(ItemResult(s.id, s.person, split, s.task, s.modality, "lik", float(best == s.correct), best))
        i += k
    return results


def _score_cloze(lm, split, items, cfg) -> list[ItemResult]:
    replies = generate(lm, items, [format_cloze(s.question) for s in items], cfg.max_new_tokens)
    return [
        ItemResult(s.id, s.person, split, s.task, s.modality, "cloze", float(cloze_correct(r, s.answer)), r)
        for s, r in zip(items, replies)
    ]


def _score_gen(lm, split, items, cfg) -> list[ItemResult]:
    replies = generate(lm, items, [s.question for s in items], cfg.max_new_tokens)
    out = []
    for s, r in zip(items, replies):
        rl = rouge_l(r, s.answer)
        out.append(ItemResult(s.id, s.person, split, s.task, s.modality, "rougeL", rl["f"], r, rl["recall"]))
    return out


def score_items(
    lm: LoadedModel, split: str, samples: Sequence[Sample], cfg: EvalConfig, desc: str | None = None
) -> list[ItemResult]:
    """Score every sample of one split, batched, with a progress bar."""
    scorers = {
        "cloze": [_score_cloze],
        "gen": [_score_gen],
        "mcq": {
            "generate": [_score_mcq_letter],
            "likelihood": [_score_mcq_likelihood],
            "both": [_score_mcq_letter, _score_mcq_likelihood],
        }[cfg.mcq_mode],
    }
    # group so that a batch shares task and modality (similar lengths, one kind of input)
    groups: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        groups[(s.task, s.modality)].append(s)
    jobs = [
        (fn, chunk)
        for key in sorted(groups)
        for fn in scorers[key[0]]
        for chunk in _chunks(groups[key], cfg.batch_size)
    ]
    results: list[ItemResult] = []
    with eval_mode(lm.model):
        for fn, chunk in tqdm(jobs, desc=desc or f"eval {split}", dynamic_ncols=True, leave=False):
            results += fn(lm, split, chunk, cfg)
    return results


def summarize(results: Iterable[ItemResult], mcq_mode: str = "generate") -> dict[str, float]:
    """Aggregate item results into the stable metric keys (see module docstring)."""
    acc: dict[str, list[float]] = defaultdict(list)
    for r in results:
        base = f"{r.split}_{r.modality}"
        if r.metric in ("letter", "lik"):
            acc[f"{base}_{r.metric}"].append(r.score)
        elif r.metric == "cloze":
            acc[f"{base}_cloze"].append(r.score)
        else:
            acc[f"{base}_rougeL"].append(r.score)
            acc[f"{base}_rougeL_recall"].append(r.recall)
    metrics = {k: sum(v) / len(v) for k, v in sorted(acc.items())}
    primary = "lik" if mcq_mode == "likelihood" else "letter"
    for key in [k for k in metrics if k.endswith(f"_{primary}")]:
        metrics[key[: -len(primary) - 1]] = metrics[key]
    if mcq_mode != "both":  # the variant equals the primary key: do not write it twice
        metrics = {k: v for k, v in metrics.items() if not k.endswith(f"_{primary}")}
    return dict(sorted(metrics.items()))


def evaluate(
    lm: LoadedModel, data: BenchmarkData, cfg: EvalConfig = EvalConfig(), predictions_file: Path | None = None
) -> dict[str, float]:
    """Run the protocol on every configured split of ``data``; optionally write per-item predictions."""
    results: list[ItemResult] = []
    for split in cfg.splits:
        if split in data.splits:
            results += score_items(lm, split, data.splits[split], cfg)
    if predictions_file is not None:
        with open(predictions_file, "w") as fh:
            for r in results:
                fh.write(json.dumps(asdict(r)) + "\n")
    metrics = summarize(results, cfg.mcq_mode)
    if cfg.protocol == "umu":
        metrics.update(cross_modal_metrics(results, "lik" if cfg.mcq_mode == "likelihood" else "letter"))
    return dict(sorted(metrics.items()))


def cross_modal_metrics(results: Iterable[ItemResult], metric: str) -> dict[str, float]:
    """UMU-Bench's ``{split}_both_right`` / ``{split}_both_wrong`` over paired MCQ results."""
    by_split: dict[str, dict[str, float]] = defaultdict(dict)
    for r in results:
        if r.task == "mcq" and r.metric == metric:
            by_split[r.split][r.id] = r.score
    out = {}
    for split, correct in by_split.items():
        pairs = pair_modalities(correct)
        if pairs:
            out.update({f"{split}_{k}": v for k, v in cross_modal(pairs).items()})
    return out


#: columns of the readable table, in order: (metric key, header)
TABLE_COLUMNS = [
    ("forget_vqa", "Forget VQA ↓"),
    ("forget_qa", "Forget QA ↑"),
    ("retain_vqa", "Retain VQA ↑"),
    ("retain_qa", "Retain QA ↑"),
    ("real_vqa", "Real VQA ↑"),
    ("real_qa", "Real QA ↑"),
    ("test_vqa", "Test VQA ↓"),
    ("forget_vqa_rougeL", "Forget gen R-L ↓"),
    ("retain_vqa_rougeL", "Retain gen R-L ↑"),
    ("forget_vqa_cloze", "Forget cloze ↓"),
    ("retain_vqa_cloze", "Retain cloze ↑"),
]


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per method; MCQ accuracies as percentages, ROUGE-L as fractions."""
    cols = [(k, h) for k, h in TABLE_COLUMNS if any(k in m for m in results.values())]
    lines = ["| method | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, m in results.items():
        cells = []
        for k, _ in cols:
            v = m.get(k)
            cells.append("–" if v is None else (f"{v:.3f}" if "rougeL" in k else f"{100 * v:.1f}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
