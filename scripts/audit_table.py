"""The README's audit table: one row per model, the headline metrics as mean ± 95 % CI half-width.

Usage: python scripts/audit_table.py OUT [OUT ...]   (each OUT written by ``mllm-unlearn audit --seeds``)

Several OUTs over the same seeds and cache (e.g. the baselines, then a new cvf_ncu) are merged: a model
already listed (vanilla, oracle) keeps its first row. Seeds must agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = {
    "forget_vqa": "Forget VQA ↓",
    "unseen_forget_vqa": "Unseen VQA ↓",
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


def table(outs: list[Path]) -> str:
    rows: dict[str, dict] = {}
    seeds = None
    for out in outs:
        summary = json.loads((out / "summary.json").read_text())
        if seeds is not None and summary["seeds"] != seeds:
            raise SystemExit(f"{out}: seeds {summary['seeds']} differ from {seeds}")
        seeds = summary["seeds"]
        for name, metrics in summary["runs"].items():
            rows.setdefault(name, metrics)
    head = f"Seeds {', '.join(map(str, seeds))}: mean ± 95 % CI half-width.\n\n"
    lines = ["| model | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, metrics in rows.items():
        cells = []
        for key in COLUMNS:
            m = metrics.get(key)
            cells.append("–" if m is None else f"{m['mean']:.2f} ± {m['ci95']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


if __name__ == "__main__":
    print(table([Path(a) for a in sys.argv[1:]]))
