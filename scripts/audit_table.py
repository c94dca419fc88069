"""The README's audit table: one row per model, the headline metrics as mean ± 95 % CI half-width.

Usage: python scripts/audit_table.py [--columns KEY,...] OUT [OUT ...]   (each OUT: ``mllm-unlearn audit --seeds``)

``--columns``: these headline metrics only (keys of :data:`COLUMNS`), e.g. for audits run with some probes.

Several OUTs are pooled seed by seed from their per-seed reports (``OUT/seed<N>/report.json``): OUTs over
the same seeds and cache (e.g. the baselines, then a new cvf_ncu) add models, and a model already listed
for a seed (vanilla, oracle) keeps its first report; OUTs over other seeds (e.g. one ``audit --seeds N``
process per world, run side by side) add worlds. Every model must be in every seed's reports.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from mllm_unlearn.experiments.audit import aggregate

COLUMNS = {
    "forget_vqa": "Forget VQA ↓",
    "unseen_forget_vqa": "Unseen VQA ↓",
    "still_recognised": "Still recognised ↓",
    "retain_vqa": "Retain VQA ↑",
    "real_vqa": "Real VQA ↑",
    "forget_qa": "Forget QA ↑",
    "retain_qa": "Retain QA ↑",
    "misid_unseen": "Misid. unseen ↓",
    "relearn_recovery": "Relearn rec. ↓",
    "benign_forget_after": "Benign drift: forget VQA ↓",
    "int4_forget_vqa": "int4 forget ↓",
    "int4_retain_ratio": "int4 retain ratio ↑",
    "forget_quality": "Forget quality ↑",
    "mia_auc": "MIA AUC",
    "summary": "Summary ↑",
}


def table(outs: list[Path], only: list[str] | None = None) -> str:
    reports: dict[int, dict] = {}
    for out in outs:
        for seed in json.loads((out / "summary.json").read_text())["seeds"]:
            report = json.loads((out / f"seed{seed}" / "report.json").read_text())
            runs = reports.setdefault(seed, {"runs": {}})["runs"]
            for name, card in report["runs"].items():
                runs.setdefault(name, card)
    seeds = sorted(reports)
    models = list(dict.fromkeys(name for seed in seeds for name in reports[seed]["runs"]))
    for name in models:
        missing = [seed for seed in seeds if name not in reports[seed]["runs"]]
        if missing:
            raise SystemExit(f"{name} has no report for seed(s) {missing} in {', '.join(map(str, outs))}")
    rows = aggregate(reports)
    # one world has no interval: its values are printed alone
    spread = "mean ± 95 % CI half-width" if len(seeds) > 1 else "one world"
    head = f"Seeds {', '.join(map(str, seeds))}: {spread}.\n\n"
    # a metric no report has (e.g. one added to the audit after these reports were made) is left out
    columns = [k for k in only or COLUMNS if any(not math.isnan(m[k]["mean"]) for m in rows.values())]
    lines = ["| model | " + " | ".join(COLUMNS[k] for k in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = []
        for key in columns:
            m = metrics.get(key)
            if m is None or math.isnan(m["mean"]):
                cells.append("–")
            else:
                cells.append(f"{m['mean']:.2f}" + ("" if math.isnan(m["ci95"]) else f" ± {m['ci95']:.2f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    only = None
    if args[:1] == ["--columns"]:
        only, args = args[1].split(","), args[2:]
        unknown = [k for k in only if k not in COLUMNS]
        if unknown:
            raise SystemExit(f"--columns: no column {unknown}; choose from {', '.join(COLUMNS)}")
    print(table([Path(a) for a in args], only))
