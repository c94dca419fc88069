"""Audits end to end: one audit of given runs (:func:`run_audit`), and the same over several synthetic
worlds with mean and 95 % confidence intervals (:func:`run_multiseed`).

Per seed, :func:`run_multiseed` builds (or finds in its cache) world -> tiny base model -> vanilla
fine-tune -> retrained oracle -> one unlearning run per method, then audits vanilla and every run
(:mod:`mllm_unlearn.evaluate.audit`). Everything but the audit itself is cached under
``cache_dir/seed<N>/``, keyed by the settings (``settings.json`` there must match, else it is an error),
so a second call only re-audits. The aggregate (``summary.json`` / ``summary.md``) gives, per run and
headline metric, the mean over seeds and the 95 % t-interval half-width
``t_{0.975, n-1} * s / sqrt(n)`` (NaN with one seed).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from ..data.mllmu import read_mllmu
from ..data.world import WorldConfig, make_world
from ..evaluate.audit import AuditConfig, audit_model, load_audit_data, load_run, prepare_references, report_dict
from ..evaluate.audit.card import HEADLINE, write_report
from ..evaluate.audit.oracle import oracle_model
from ..methods import get_method
from ..models.loading import load_model
from ..models.tiny import TinySizes, corpus_for, make_tiny_model
from ..train.finetune import finetune
from ..train.loop import TrainConfig
from ..train.unlearn import UnlearnConfig, run_record, save_run, unlearn


def run_audit(
    vanilla: str | Path,
    runs: dict[str, str | Path],
    data_root: str | Path,
    out: str | Path,
    cfg: AuditConfig = AuditConfig(),
    *,
    oracle: str | Path | None = None,
) -> dict:
    """Audit ``runs`` (name -> run folder, adapter or model) against ``vanilla``; write the report into
    ``out`` and return it. ``oracle``: the retrained oracle's folder (see :func:`oracle_model`)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = load_audit_data(data_root, cfg.forget)
    vanilla_lm = load_model(vanilla)
    oracle_lm = load_model(oracle) if oracle is not None and "oracle" in cfg.probes else None
    refs = prepare_references(vanilla_lm, data, cfg, oracle_lm)
    timings["references_s"] = time.perf_counter() - t0
    cards = {}
    extra = {"oracle": oracle} if oracle_lm is not None and cfg.audit_oracle else {}
    del oracle_lm
    for name, path in {"vanilla": None, **extra, **runs}.items():
        t0 = time.perf_counter()
        lm = vanilla_lm if path is None else load_run(path, vanilla)
        cards[name] = audit_model(lm, data, cfg, refs)
        timings[f"audit_{name}_s"] = time.perf_counter() - t0
    report = report_dict(cards, data, cfg, refs, {k: round(v, 1) for k, v in timings.items()})
    write_report(out, report)
    return report


@dataclass
class MultiSeedConfig:
    seeds: tuple[int, ...] = (3, 4, 5)
    methods: tuple[str, ...] = ("cvf_ncu",)
    forget: str = "forget_15"
    world: WorldConfig = field(default_factory=WorldConfig)
    sizes: TinySizes = field(default_factory=TinySizes)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, lr=1e-3, batch_size=32, warmup=50))
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


def quick_config(seeds: tuple[int, ...] = (3, 4), finetune_steps: int = 150) -> MultiSeedConfig:
    """A tiny variant (10 people, small model, short training) that checks the machinery in about a
    minute per seed on 2 CPU cores. 150 fine-tune steps leave the tiny model half-trained; with
    ``finetune_steps=600`` it knows every person (forget / retain / real VQA 1.0) in about 70 s."""
    from ..evaluate.audit import AttackBudget

    return MultiSeedConfig(
        seeds=seeds,
        methods=("cvf_ncu",),
        world=WorldConfig(
            n_people=10, n_real=4, n_strangers=4, pretrain_strangers=2, train_photos=2, test_photos=2, image_size=32
        ),
        sizes=TinySizes(vision_hidden=32, text_hidden=64, text_intermediate=128, vocab_size=400),
        finetune=TrainConfig(steps=finetune_steps, lr=3e-3, batch_size=16, warmup=20),
        unlearn=UnlearnConfig(steps=10, batch_size=4, warmup=2),
        audit=AuditConfig(budget=AttackBudget(steps=5, batch_size=4), quant_specs=("int8", "int4"), max_new_tokens=24),
    )


def _settings(cfg: MultiSeedConfig, seed: int) -> dict:
    return json.loads(
        json.dumps(
            {
                "seed": seed,
                "forget": cfg.forget,
                "world": asdict(cfg.world),
                "sizes": asdict(cfg.sizes),
                "finetune": asdict(cfg.finetune),
            }
        )
    )


def prepare_seed(cfg: MultiSeedConfig, seed: int, cache: Path) -> dict[str, Path]:
    """World, base, vanilla, oracle and one run per method for ``seed``, built or found in ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    settings, marker = _settings(cfg, seed), cache / "settings.json"
    if marker.exists() and json.loads(marker.read_text()) != settings:
        raise ValueError(f"{cache} was built with other settings ({marker}); use another --cache")
    marker.write_text(json.dumps(settings, indent=2))
    world = cache / "world"
    if not world.exists():
        make_world(world, WorldConfig(**{**asdict(cfg.world), "seed": seed}))
    data = read_mllmu(world, forget=cfg.forget)
    base = cache / "base"
    if not base.exists():
        make_tiny_model("llava", base, corpus_for(data, "llava"), sizes=cfg.sizes, seed=seed)
    train_cfg = TrainConfig(**{**asdict(cfg.finetune), "seed": seed})
    vanilla = cache / "vanilla"
    if not vanilla.exists():
        finetune(load_model(base), data.train, train_cfg, vanilla)
    oracle = oracle_model(base, data, train_cfg, cache)
    paths = {"world": world, "base": base, "vanilla": vanilla, "oracle": oracle}
    for method in cfg.methods:
        method_cls = get_method(method)
        run_cfg = UnlearnConfig(
            **{
                **asdict(cfg.unlearn),
                "method": method,
                "seed": seed,
                "cache_dir": str(cache / "ncu_cache"),
            }
        )
        # the key holds the method's default rank (the driver caps it by the layers' width) and options:
        # a changed default retrains the run
        key = json.dumps(
            {**asdict(run_cfg), "default_rank": method_cls.default_rank, "method_config": method_cls().config_dict()},
            sort_keys=True,
            default=str,
        )
        run_dir = cache / "runs" / method
        if run_dir.exists() and json.loads((run_dir / "run.json").read_text()).get("audit_key") != key:
            shutil.rmtree(run_dir)
        if not run_dir.exists():
            lm, history = unlearn(load_model(vanilla), data, run_cfg)
            save_run(lm, run_dir, run_record(run_cfg, method_cls(), history, lm, audit_key=key), merge=True)
        paths[method] = run_dir
    return paths


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of the 95 % Student-t interval (NaN values dropped)."""
    x = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return {"mean": math.nan, "ci95": math.nan, "n": 0}
    half = float(student_t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return {"mean": float(x.mean()), "ci95": half, "n": int(len(x))}


def aggregate(reports: dict[int, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """run name -> headline metric -> mean / ci95 / n over the seeds' reports."""
    names = [n for r in reports.values() for n in r["runs"]]
    out = {}
    for name in dict.fromkeys(names):
        out[name] = {
            k: mean_ci([r["runs"][name]["headline"].get(k, math.nan) for r in reports.values() if name in r["runs"]])
            for k in HEADLINE
        }
    return out


def summary_markdown(agg: dict, seeds: list[int]) -> str:
    runs = list(agg)
    lines = [
        f"# Audit over seeds {', '.join(map(str, seeds))}: mean ± 95 % CI half-width",
        "",
        "| metric | " + " | ".join(runs) + " |",
        "|---" * (len(runs) + 1) + "|",
    ]
    for k, meaning in HEADLINE.items():
        cells = []
        for r in runs:
            m = agg[r][k]
            cells.append(
                "–"
                if math.isnan(m["mean"])
                else f"{m['mean']:.3f}" + ("" if math.isnan(m["ci95"]) else f" ± {m['ci95']:.3f}")
            )
        lines.append(f"| {k} ({meaning}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_multiseed(out: str | Path, cfg: MultiSeedConfig, cache_dir: str | Path) -> dict:
    """Per seed: prepare (cached), audit into ``out/seed<N>/``; then ``out/summary.{json,md}``."""
    out, cache_dir = Path(out), Path(cache_dir)
    reports, timings = {}, {}
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        paths = prepare_seed(cfg, seed, cache_dir / f"seed{seed}")
        timings[f"prepare_seed{seed}_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        reports[seed] = run_audit(
            paths["vanilla"],
            {m: paths[m] for m in cfg.methods},
            paths["world"],
            out / f"seed{seed}",
            cfg.audit,
            oracle=paths["oracle"],
        )
        timings[f"audit_seed{seed}_s"] = round(time.perf_counter() - t0, 1)
    agg = aggregate(reports)
    summary = {
        "schema": "mllm-unlearn/audit-seeds/1",
        "seeds": list(cfg.seeds),
        "methods": list(cfg.methods),
        "metrics": HEADLINE,
        "runs": agg,
        "timings": timings,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (out / "summary.md").write_text(summary_markdown(agg, list(cfg.seeds)))
    return summary
