"""The built-in default: the whole pipeline on a synthetic world and a tiny LLaVA, on a CPU.

make-world -> make-tiny-model -> finetune (the vanilla model) -> evaluate, written to
``DIR/results.json`` (``{method: {metric: value}}``) and ``DIR/results.md``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.mllmu import read_mllmu
from ..data.world import WorldConfig, make_world
from ..evaluate.harness import EvalConfig, evaluate, markdown_table
from ..models.loading import load_model
from ..models.tiny import corpus_for, make_tiny_model
from ..train.finetune import finetune
from ..train.loop import TrainConfig

#: the methods the demo can run, in table order
DEMO_METHODS = ("vanilla",)


@dataclass
class DemoConfig:
    seed: int = 0
    forget: str = "forget_10"
    world: WorldConfig = field(default_factory=WorldConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, lr=1e-3, batch_size=32,
                                                                      warmup=50))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(mcq_mode="both", max_new_tokens=24))
    methods: tuple[str, ...] = ("vanilla",)


def write_results(out: Path, results: dict[str, dict[str, float]]) -> str:
    table = markdown_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(table + "\n")
    return table


def run_demo(out_dir: str | Path, cfg: DemoConfig = DemoConfig()) -> dict[str, dict[str, float]]:
    """Run the demo into ``out_dir`` (refused if it exists; built in a temporary sibling first)."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; choose a new --out")
    unknown = set(cfg.methods) - set(DEMO_METHODS)
    if unknown:
        raise ValueError(f"unknown demo method(s) {sorted(unknown)}; available: {', '.join(DEMO_METHODS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        world = make_world(work / "world", WorldConfig(**{**cfg.world.__dict__, "seed": cfg.seed}))
        data = read_mllmu(world, forget=cfg.forget)
        make_tiny_model("llava", work / "base", corpus_for(data, "llava"), seed=cfg.seed)
        timings["world_and_model_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        lm = load_model(work / "base")
        finetune(lm, data.train, cfg.finetune, work / "vanilla")
        timings["finetune_s"] = time.perf_counter() - t0

        results: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        results["vanilla"] = evaluate(load_model(work / "vanilla"), data, cfg.eval,
                                      predictions_file=work / "predictions_vanilla.jsonl")
        timings["evaluate_vanilla_s"] = time.perf_counter() - t0
        (work / "timings.json").write_text(json.dumps(timings, indent=2))
        table = write_results(work, results)
        shutil.rmtree(work / "base")
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(table)
    print("timings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    return results
