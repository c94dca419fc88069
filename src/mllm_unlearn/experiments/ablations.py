"""Table 2 of the paper: each CVF / NCU component switched off or replaced, from one vanilla model.

Every row is a full unlearning run with the same data, seed, steps and learning rate as ``cvf_ncu``;
only the named switch differs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..data.sample import BenchmarkData
from ..evaluate.harness import EvalConfig, evaluate, markdown_table
from ..methods import get_method
from ..models.loading import LoadedModel
from ..runtime.outputs import atomic_dir, refuse_existing
from ..train.unlearn import UnlearnConfig, unlearn

#: row name -> (driver overrides, CVF option overrides)
ABLATIONS: dict[str, tuple[dict, dict]] = {
    "CVF + NCU (ours)": ({}, {}),
    "push: L_nMSE (Eq. 5)": ({}, {"push": "nmse"}),
    "w/o L_CVF-pull (Eq. 6)": ({}, {"pull": False}),
    "w/o L_RET (Eq. 9)": ({}, {"ret": False}),
    "w/o L_GUM (Eq. 10)": ({}, {"gum": False}),
    "Full CVF-only (no subspace)": ({"subspace": "none"}, {}),
    "CVF + Rand (random subspace)": ({"subspace": "random"}, {}),
    "pooled IVRs (paper's text)": ({}, {"level": "pooled"}),
}


def run_ablations(
    load: Callable[[], LoadedModel],
    data: BenchmarkData,
    out_dir: str | Path,
    cfg: UnlearnConfig,
    eval_cfg: EvalConfig = EvalConfig(mcq_mode="likelihood"),
    rows: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate the vanilla model and every ablation row; write results.json / results.md to ``out_dir``.
    ``load()`` returns a fresh copy of the vanilla model for each row."""
    out = refuse_existing(out_dir)
    unknown = set(rows or []) - set(ABLATIONS)
    if unknown:
        raise ValueError(f"unknown ablation row(s) {sorted(unknown)}; rows: {list(ABLATIONS)}")
    method_cls = get_method("cvf_ncu")
    results = {"vanilla": evaluate(load(), data, eval_cfg)}
    for name in rows or ABLATIONS:
        driver, options = ABLATIONS[name]
        run_cfg = UnlearnConfig(**{**cfg.__dict__, **driver, "method": "cvf_ncu"})
        lm, _ = unlearn(load(), data, run_cfg, method_cls.config_class(**options))
        results[name] = evaluate(lm, data, eval_cfg)
        print(markdown_table({name: results[name]}).splitlines()[-1], flush=True)
    with atomic_dir(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        (tmp / "results.md").write_text(markdown_table(results) + "\n")
    print(markdown_table(results))
    return results
