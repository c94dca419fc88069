"""The built-in default: the whole pipeline on a synthetic world and a tiny LLaVA, on a CPU.

make-world -> make-tiny-model -> finetune (the vanilla model) -> evaluate, then one unlearning run
per method from the same vanilla model, each evaluated the same way. Written to ``DIR/results.json``
(``{method: {metric: value}}``), ``DIR/results.md``, per-item predictions and each run's adapter.

MCQs are scored by option likelihood: the tiny model does not learn to answer by letter on a CPU
budget (see :class:`mllm_unlearn.data.world.WorldConfig`); the letter protocol is for real models.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..data.mllmu import read_mllmu
from ..data.world import WorldConfig, make_world
from ..evaluate.audit import AuditConfig
from ..evaluate.audit.oracle import oracle_model
from ..evaluate.harness import EvalConfig, evaluate, markdown_table
from ..methods import available_methods, get_method
from ..models.loading import load_model
from ..models.tiny import TinySizes, corpus_for, make_tiny_model
from ..runtime.background import background, spare_cores
from ..runtime.outputs import atomic_dir, refuse_existing
from ..train.finetune import finetune
from ..train.loop import TrainConfig
from ..train.unlearn import UnlearnConfig, run_record, save_run, unlearn
from .audit import run_audit


@dataclass
class DemoConfig:
    seed: int = 0
    forget: str = "forget_15"
    world: WorldConfig = field(default_factory=WorldConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, lr=1e-3, batch_size=32, warmup=50))
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(mcq_mode="likelihood", max_new_tokens=24))
    methods: tuple[str, ...] = ("vanilla", "cvf_ncu")
    sizes: TinySizes = field(default_factory=TinySizes)
    #: audit every unlearned run (unseen photos, misidentification, relearning, benign fine-tuning,
    #: quantisation, against a retrained oracle; about 3 minutes more for the default two rows);
    #: None: no audit
    audit: AuditConfig | None = field(default_factory=AuditConfig)
    #: train the audit's retrained oracle in a second process, beside the vanilla fine-tune and the
    #: unlearning runs, when the machine has a core to spare (every job here runs on one thread). Same
    #: bytes either way (each fine-tune seeds itself); on 2 cores it takes the oracle's fine-tune off the
    #: critical path: 5 min 40 s -> 3 min 56 s (oracle 118 s), and 12 min 38 s -> 9 min 55 s on a machine
    #: 2.5x slower, same results (README, "What the demo does"; the CLI's ``--oracle-in-process`` turns it off)
    parallel_oracle: bool = True


def write_results(out: Path, results: dict[str, dict[str, float]]) -> str:
    table = markdown_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(table + "\n")
    return table


def run_demo(out_dir: str | Path, cfg: DemoConfig = DemoConfig()) -> dict[str, dict[str, float]]:
    """Run the demo into ``out_dir`` (refused if it exists; built in a temporary sibling first)."""
    out = refuse_existing(out_dir)
    choices = ["vanilla", *available_methods()]
    unknown = set(cfg.methods) - set(choices)
    if unknown:
        raise ValueError(f"unknown demo method(s) {sorted(unknown)}; available: {', '.join(choices)}")
    timings: dict[str, float] = {}
    audited = cfg.audit is not None and len(cfg.methods) > 1
    with atomic_dir(out) as work, ExitStack() as jobs:
        t0 = time.perf_counter()
        world = make_world(work / "world", WorldConfig(**{**cfg.world.__dict__, "seed": cfg.seed}))
        data = read_mllmu(world, forget=cfg.forget)
        make_tiny_model("llava", work / "base", corpus_for(data, "llava"), sizes=cfg.sizes, seed=cfg.seed)
        timings["world_and_model_s"] = time.perf_counter() - t0
        oracle_job = None
        if audited and cfg.parallel_oracle and spare_cores(torch.get_num_threads()):
            oracle_job = jobs.enter_context(
                background(
                    "the retrained oracle's fine-tune",
                    _train_oracle,
                    work / "base",
                    world,
                    cfg.forget,
                    cfg.finetune,
                    work / "oracle",
                    log=work / "oracle.log",
                )
            )

        t0 = time.perf_counter()
        lm = load_model(work / "base")
        finetune(lm, data.train, cfg.finetune, work / "vanilla")
        timings["finetune_s"] = time.perf_counter() - t0

        results: dict[str, dict[str, float]] = {}
        for method in cfg.methods:
            t0 = time.perf_counter()
            lm = load_model(work / "vanilla")
            if method != "vanilla":
                run_cfg = UnlearnConfig(
                    **{**cfg.unlearn.__dict__, "method": method, "seed": cfg.seed, "cache_dir": str(work / "ncu_cache")}
                )
                lm, history = unlearn(lm, data, run_cfg)
                timings[f"unlearn_{method}_s"] = time.perf_counter() - t0
                method_cls = get_method(method)
                save_run(
                    lm,
                    work / "runs" / method,
                    run_record(run_cfg, method_cls(), history, lm),
                    merge=not method_cls.trains,
                )
            t0 = time.perf_counter()
            results[method] = evaluate(lm, data, cfg.eval, predictions_file=work / f"predictions_{method}.jsonl")
            timings[f"evaluate_{method}_s"] = time.perf_counter() - t0
        audit = _audit(work, data, cfg, timings, oracle_job) if audited else None
        (work / "timings.json").write_text(json.dumps(timings, indent=2))
        table = write_results(work, results)
        shutil.rmtree(work / "base")  # rebuilt from the seed in seconds; the vanilla model is kept
        shutil.rmtree(work / "ncu_cache", ignore_errors=True)
    print(table)
    if audit is not None:
        print(audit_summary(audit))
    print("timings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    return results


def _train_oracle(base: Path, world: Path, forget: str, finetune_cfg: TrainConfig, cache: Path) -> None:
    """The retrained oracle, in the second process (it reads the world itself: nothing big is pickled)."""
    oracle_model(base, read_mllmu(world, forget=forget), finetune_cfg, cache)


def _audit(work: Path, data, cfg: DemoConfig, timings: dict[str, float], oracle_job=None) -> dict:
    """The audit of every unlearned run against the vanilla model and a retrained oracle (the vanilla
    fine-tune without the forget people), written to ``work/audit``. With ``oracle_job`` the oracle was
    trained in a second process; ``oracle_model`` then finds it in its cache."""
    t0 = time.perf_counter()
    if oracle_job is not None:
        oracle_job.join()
    oracle = oracle_model(work / "base", data, cfg.finetune, work / "oracle")
    timings["oracle_wait_s" if oracle_job is not None else "oracle_finetune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    runs = {m: work / "runs" / m for m in cfg.methods if m != "vanilla"}
    audit_cfg = replace(cfg.audit, forget=cfg.forget)
    report = run_audit(work / "vanilla", runs, work / "world", work / "audit", audit_cfg, oracle=oracle)
    timings["audit_s"] = time.perf_counter() - t0
    return report


#: the audit numbers the demo prints (the full card is in DIR/audit/report.md)
SUMMARY_KEYS = (
    "unseen_forget_vqa",
    "still_recognised",
    "misid_unseen",
    "relearn_recovery",
    "benign_forget_after",
    "int4_retain_ratio",
)


def audit_summary(report: dict) -> str:
    """A short table of the audit: one row per model, the numbers that say whether forgetting is real."""
    lines = ["audit (details: audit/report.md)", "| model | " + " | ".join(SUMMARY_KEYS) + " | summary |"]
    lines.append("|---" * (len(SUMMARY_KEYS) + 2) + "|")
    for name, card in report["runs"].items():
        values = [card["headline"].get(k, float("nan")) for k in (*SUMMARY_KEYS, "summary")]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)
