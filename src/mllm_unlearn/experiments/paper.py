"""The paper's whole experimental section from one call: :func:`run_paper` (``mllm-unlearn paper``).

A *plan* is a list of named jobs (:class:`Job`): per world seed the preparation (world -> tiny base ->
vanilla fine-tune), the vanilla evaluation of each forget split, one job per unlearning run (unlearn +
evaluate, and for Table 1 the replies of the case study), one per continual experiment (5 stages), and
the 7B cost projection. Each job writes ``jobs/<name>.json`` in the work folder (``DIR.partial``)
holding its result and the hash of every setting it depends on; a second call skips every finished
job and refuses one whose settings changed (naming the keys). The tables, figures and the JSON behind
them are then built from the job results (:mod:`mllm_unlearn.experiments.paper_report`) and the work
folder is renamed to ``DIR`` when complete.

Seeds: the *validation* worlds (0, 1, 2: the project's development worlds, where the defaults of every
method were chosen) decide the search of :attr:`PaperConfig.search` (lambda of Eq. 7 by default,
App. C.3: a small candidate set, the same budget for each candidate, never the reporting worlds);
the *reporting* worlds (3, 4, 5) are never used for a choice. Every number of a table is the mean and
95 % Student-t half-width over the reporting worlds (:func:`mllm_unlearn.experiments.audit.mean_ci`).

On real data (:class:`RealData`) one "seed" is the given model and benchmark; there is no validation
world, so the selection is given (a ``selection.json`` of a built-in run, or the method's defaults).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..data.mllmu import read_mllmu
from ..data.sample import BenchmarkData, Sample
from ..data.world import WorldConfig, make_world
from ..evaluate.harness import EvalConfig, evaluate
from ..methods import available_methods, get_method
from ..models.loading import LoadedModel, load_model
from ..models.scoring import generate
from ..models.tiny import TinySizes, corpus_for, make_tiny_model
from ..train.finetune import finetune
from ..train.loop import TrainConfig
from ..train.unlearn import UnlearnConfig, unlearn
from .ablations import ABLATIONS

SCHEMA = "mllm-unlearn/paper/1"
OURS = "cvf_ncu"
#: every experiment of the plan, in the paper's order
EXPERIMENTS = ("tab1", "tab2", "tab4", "tab5", "tab6", "tab7", "tab8", "tab9", "fig2", "fig3", "fig4", "fig5")
#: what each experiment is (also the heading of its Markdown file)
TITLES = {
    "tab1": "Table 1: every method, forget 5 %",
    "tab2": "Table 2: ablations of CVF and NCU (forget 5 %)",
    "tab4": "Table 4: every method, forget 10 %",
    "tab5": "Table 5: every method, forget 15 %",
    "tab6": "Table 6: baselines restricted to the visual module (vision tower + projector), forget 5 %",
    "tab7": "Table 7: unlearning time per epoch",
    "tab8": "Table 8: SIU adapted to our protocol, forget 5 %",
    "tab9": "Table 9: update scope of CVF-NCU, forget 5 %",
    "fig2": "Figure 2: continual unlearning, 5 sequential requests",
    "fig3": "Figure 3: continual unlearning, stage x task Forget VQA",
    "fig4": "Figure 4: sensitivity to alpha and beta",
    "fig5": "Figure 5: case study, replies of each method to the same items",
}
#: the metric keys the figures and the search read
VQA = ("forget_vqa", "retain_vqa", "real_vqa")
#: the CVF config fields the plan varies (checked against the method's config class at run time)
ALPHA, BETA = "alpha", "ret_weight"


@dataclass
class Selection:
    """The validation search: ``search`` = {CVF option: candidates}, searched one option after the
    other (each with the earlier ones fixed at their chosen value), on the validation worlds and the
    main forget split, with the same budget for each candidate.

    Rule (App. C.3, "the value that best maintains retention and general utility while achieving the
    desired forgetting strength"): among the candidates whose mean Retain VQA is at least
    ``retain_ratio`` x the vanilla's and mean Real-world VQA at least ``real_ratio`` x the vanilla's,
    the lowest mean Forget VQA; ties go to the higher Retain + Real VQA, then to the earlier
    candidate. When no candidate qualifies, the highest Retain + Real VQA (recorded as a fallback)."""

    search: dict[str, tuple[float, ...]] = field(default_factory=lambda: {"lam": (0.5, 1.0, 2.0, 3.0, 5.0)})
    retain_ratio: float = 0.98
    real_ratio: float = 0.95


@dataclass
class RealData:
    """A real checkpoint and benchmark instead of the built-in worlds (``--model --data --benchmark``)."""

    model: str
    data: str
    benchmark: str = "mllmu"
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    image_size: int | None = None


#: the forget splits of each benchmark for Tables 1 / 4 / 5 (None: the benchmark has no such split)
FORGETS = {
    "mllmu": ("forget_5", "forget_10", "forget_15"),
    "umu": ("forget_5", "forget_10", "forget_15"),
    "clear": ("forget05", "forget10", None),
}


@dataclass
class PaperConfig:
    report_seeds: tuple[int, ...] = (3, 4, 5)
    validation_seeds: tuple[int, ...] = (0, 1, 2)
    world: WorldConfig = field(default_factory=WorldConfig)
    sizes: TinySizes = field(default_factory=TinySizes)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, lr=1e-3, batch_size=32, warmup=50))
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(mcq_mode="likelihood", max_new_tokens=24))
    methods: tuple[str, ...] = ()  # () = every registered method
    forgets: tuple[str | None, ...] = FORGETS["mllmu"]  # Tables 1, 4, 5 (the first is the main split)
    ablations: tuple[str, ...] = tuple(ABLATIONS)
    visual_baselines: tuple[str, ...] = ("ga", "ga_diff", "manu", "mmunlearner")  # Table 6
    scopes: tuple[str, ...] = ("projector", "visual", "all")  # Table 9
    continual_methods: tuple[str, ...] = (OURS, "manu", "mmunlearner")  # Figures 2 and 3
    n_tasks: int = 5
    continual_replay: bool = True
    alphas: tuple[float, ...] = (1.0, 3.0, 5.0, 10.0, 20.0)  # Figure 4 (the default value is added)
    betas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0)
    case_items: int = 2  # Figure 5: items per category (Forget / Retain x VQA / QA)
    selection: Selection = field(default_factory=Selection)
    given_selection: dict[str, float] | None = None  # skip the search (real data: no validation world)
    project_7b: bool = True  # Table 7: the cost module's FLOP projection at LLaVA-1.5-7B (~3 min)
    real: RealData | None = None

    def __post_init__(self) -> None:
        if len(self.forgets) != 3 or self.forgets[0] is None:
            raise ValueError(f"forgets: the splits of Tables 1, 4 and 5 (the first required), not {self.forgets}")
        if self.real is None:
            both = set(self.report_seeds) & set(self.validation_seeds)
            if both:
                raise ValueError(f"seeds {sorted(both)} are both reporting and validation seeds: keep them apart")
            if not self.report_seeds or (not self.validation_seeds and self.given_selection is None):
                raise ValueError("give at least one reporting seed and one validation seed (or a selection)")
        unknown = set(self.ablations) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"unknown ablation row(s) {sorted(unknown)}; rows: {list(ABLATIONS)}")
        for m in (*self.methods, *self.visual_baselines, *self.continual_methods):
            get_method(m)  # names the available methods when unknown

    def all_methods(self) -> tuple[str, ...]:
        return tuple(self.methods or available_methods())


def quick_config(report_seeds: tuple[int, ...] = (3, 4), validation_seeds: tuple[int, ...] = (0,)) -> PaperConfig:
    """The reduced plan of the test suite: a 10-person world, a small model, 150 fine-tune steps, 3
    unlearning steps per run, a few methods and rows of each experiment — every file and key of the
    full plan, in a few minutes on 2 CPU cores. Its numbers mean nothing."""
    return PaperConfig(
        report_seeds=report_seeds,
        validation_seeds=validation_seeds,
        world=WorldConfig(
            n_people=10, n_real=4, n_strangers=4, pretrain_strangers=2, train_photos=2, test_photos=1, image_size=32
        ),
        sizes=TinySizes(vision_hidden=32, text_hidden=64, text_intermediate=128, vocab_size=400),
        finetune=TrainConfig(steps=150, lr=3e-3, batch_size=16, warmup=20),
        unlearn=UnlearnConfig(steps=3, batch_size=4, warmup=1),
        eval=EvalConfig(mcq_mode="likelihood", max_new_tokens=8, splits=("forget", "retain", "real")),
        methods=("ga", "manu", "siu", OURS),
        ablations=("CVF + NCU (ours)", "push: L_nMSE (Eq. 5)", "CVF + Rand (random subspace)"),
        visual_baselines=("ga", "manu"),
        continual_methods=(OURS, "manu"),
        n_tasks=2,
        alphas=(1.0,),
        betas=(0.0,),
        case_items=1,
        selection=Selection(search={"lam": (1.0, 3.0)}),
        project_7b=False,
    )


# -- jobs --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One unit of work. ``kind``: prepare | vanilla | run | continual | project. ``seed``: the world
    (None: real data or no world); ``spec``: what the job varies; ``selected``: True when its CVF
    options take the selection (its hash is then known only after the search)."""

    name: str
    kind: str
    seed: int | None
    spec: tuple[tuple[str, Any], ...] = ()
    selected: bool = False

    @property
    def params(self) -> dict[str, Any]:
        return {k: dict(v) if k == "options" else v for k, v in self.spec}

    @property
    def file(self) -> str:
        return self.name.replace("/", "__") + ".json"


def _job(name: str, kind: str, seed: int | None, selected: bool = False, **spec: Any) -> Job:
    frozen = {k: tuple(sorted(v.items())) if isinstance(v, dict) else v for k, v in spec.items()}
    return Job(name, kind, seed, tuple(sorted(frozen.items())), selected)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _seed_tag(seed: int | None) -> str:
    return "data" if seed is None else f"seed{seed}"


def run_job(seed: int | None, forget: str, method: str, *, scope: str | None = None, subspace: str | None = None,
            options: dict | None = None, case: bool = False, selected: bool | None = None) -> Job:  # fmt: skip
    opts = dict(sorted((options or {}).items()))
    tail = "".join(f"+{k}={_fmt(v)}" for k, v in opts.items())
    name = (
        f"{_seed_tag(seed)}/{forget}/{method}" + (f"@{scope}" if scope else "") + (f"~{subspace}" if subspace else "")
    )
    return _job(
        name + tail,
        "run",
        seed,
        selected=(method == OURS) if selected is None else selected,
        forget=forget,
        method=method,
        scope=scope,
        subspace=subspace,
        options=opts,
        case=case,
    )


def _vanilla_job(seed: int | None, forget: str, case: bool) -> Job:
    return _job(f"{_seed_tag(seed)}/{forget}/vanilla", "vanilla", seed, forget=forget, case=case)


def _default_cvf() -> Any:
    cls = get_method(OURS).config_class
    names = {f.name for f in fields(cls)}
    missing = {ALPHA, BETA} - names
    if missing:
        raise ValueError(f"{OURS}'s config has no field(s) {sorted(missing)}; Figure 4 cannot vary them")
    return cls()


def _sweep(values: tuple[float, ...], default: float) -> list[float]:
    return sorted({float(v) for v in values} | {float(default)})


def selection_jobs(cfg: PaperConfig) -> list[Job]:
    """The search's runs on the validation worlds (and their vanilla evaluations)."""
    if cfg.real is not None or cfg.given_selection is not None:
        return []
    main = cfg.forgets[0]
    jobs: list[Job] = []
    for seed in cfg.validation_seeds:
        jobs.append(_job(f"seed{seed}/prepare", "prepare", seed))
        jobs.append(_vanilla_job(seed, main, case=False))
    # each option's candidates are run with the options searched before it fixed: only the first
    # option's runs are known before any result; the rest are added as the search proceeds
    first, values = next(iter(cfg.selection.search.items()))
    for seed in cfg.validation_seeds:
        for v in values:
            jobs.append(run_job(seed, main, OURS, options={first: float(v)}, selected=False))
    return jobs


def experiment_jobs(cfg: PaperConfig, experiment: str) -> list[Job]:
    """The jobs of one experiment on the reporting seeds (preparation and vanilla evaluations included).
    Every job on the main forget split records the case study's replies, so that the same run serves
    every table it appears in (Table 1's cvf_ncu row is Table 2's first row, Table 9's visual row...)."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; experiments: {', '.join(EXPERIMENTS)}")
    seeds: list[int | None] = [None] if cfg.real is not None else list(cfg.report_seeds)
    main = cfg.forgets[0]
    methods = cfg.all_methods()
    forget = {"tab4": cfg.forgets[1], "tab5": cfg.forgets[2]}.get(experiment, main)
    if forget is None:
        return []
    if experiment in ("fig2", "fig3"):
        forget = next(f for f in reversed(cfg.forgets) if f is not None)
    case = forget == main

    def run(seed, method, **kw):
        return run_job(seed, forget, method, case=case, **kw)

    jobs: list[Job] = []
    for seed in seeds:
        if seed is not None:
            jobs.append(_job(f"seed{seed}/prepare", "prepare", seed))
        if experiment not in ("fig2", "fig3"):
            jobs.append(_vanilla_job(seed, forget, case))
        if experiment in ("tab1", "tab4", "tab5", "tab7", "fig5"):
            jobs += [run(seed, m) for m in methods]
        elif experiment == "tab8":
            jobs += [run(seed, m) for m in ("siu", OURS)]
        elif experiment == "tab2":
            for row in cfg.ablations:
                driver, options = ABLATIONS[row]
                jobs.append(run(seed, OURS, subspace=driver.get("subspace"), options=options))
        elif experiment == "tab6":
            for m in cfg.visual_baselines:
                jobs += [run(seed, m), run(seed, m, scope="visual")]  # its default scope, then visual only
            jobs.append(run(seed, OURS))
        elif experiment == "tab9":
            default_scope = get_method(OURS).default_scope
            jobs += [run(seed, OURS, scope=None if s == default_scope else s) for s in cfg.scopes]
        elif experiment in ("fig2", "fig3"):
            for m in cfg.continual_methods:
                name = f"{_seed_tag(seed)}/continual/{forget}/{m}"
                spec = {"forget": forget, "method": m, "n_tasks": cfg.n_tasks, "replay": cfg.continual_replay}
                jobs.append(_job(name, "continual", seed, selected=m == OURS, **spec))
        elif experiment == "fig4":
            default = _default_cvf()
            jobs.append(run(seed, OURS))
            for key, values in ((ALPHA, cfg.alphas), (BETA, cfg.betas)):
                for v in _sweep(values, getattr(default, key)):
                    if v != float(getattr(default, key)):
                        jobs.append(run(seed, OURS, options={key: v}))
    if experiment == "tab7" and cfg.project_7b and cfg.real is None:
        jobs.append(_job("projection/llava-1.5-7b", "project", None, model="llava-1.5-7b"))
    return jobs


def plan(cfg: PaperConfig, experiments: tuple[str, ...] = EXPERIMENTS) -> list[Job]:
    """Every job of ``experiments`` (the search first), each once, in running order."""
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiment(s) {sorted(unknown)}; experiments: {', '.join(EXPERIMENTS)}")
    jobs = selection_jobs(cfg)
    for e in experiments:
        jobs += experiment_jobs(cfg, e)
    unique: dict[str, Job] = {}
    for j in jobs:
        if unique.setdefault(j.name, j) != j:
            raise AssertionError(f"two different jobs are named {j.name}")
    # preparations first (one world after the other), the rest in plan order
    ordered = list(unique.values())
    return [j for j in ordered if j.kind == "prepare"] + [j for j in ordered if j.kind != "prepare"]


# -- settings and hashes -----------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def seed_settings(cfg: PaperConfig, seed: int | None) -> dict[str, Any]:
    """What a seed's world, base and vanilla depend on (or the real checkpoint and data)."""
    if seed is None:
        assert cfg.real is not None
        return _jsonable({"real": asdict(cfg.real)})
    return _jsonable(
        {"seed": seed, "world": asdict(cfg.world), "sizes": asdict(cfg.sizes), "finetune": asdict(cfg.finetune)}
    )


def job_settings(cfg: PaperConfig, job: Job, selection: dict[str, float] | None) -> dict[str, Any]:
    """Every setting the job's result depends on; its hash keys the result file."""
    s: dict[str, Any] = {"kind": job.kind, "spec": job.params}
    if job.kind == "project":
        return _jsonable(s)
    s["data"] = seed_settings(cfg, job.seed)
    if job.kind in ("vanilla", "run", "continual"):
        s["eval"] = asdict(cfg.eval)
    if job.kind == "vanilla" and job.params.get("case"):
        s["case_items"] = cfg.case_items
    if job.kind in ("run", "continual"):
        # the method's resolved rank: a changed default redoes that method's jobs, not the others'
        rank = cfg.unlearn.rank or get_method(job.params["method"]).default_rank
        s["unlearn"] = {**asdict(cfg.unlearn), "rank": rank}
        s["options"] = method_options(job, selection)
        # the method config's every field, not only the overrides: a changed default of one method
        # (e.g. cvf_ncu's relearn_sim) changes that method's jobs, which a kept folder then refuses
        s["method_config"] = resolved_method_config(job.params["method"], s["options"])
        if job.params.get("case"):
            s["case_items"] = cfg.case_items
    return _jsonable(s)


def method_options(job: Job, selection: dict[str, float] | None) -> dict[str, Any]:
    """The method config's overrides: the selection (for CVF-NCU jobs that take it), then the job's own."""
    opts = dict(selection or {}) if job.selected else {}
    opts.update(job.params.get("options") or {})
    return opts


def resolved_method_config(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every field of ``method``'s config with ``options`` applied (what its run is made with)."""
    cls = get_method(method)
    return cls(cls.config_class(**options)).config_dict()


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


class SettingsChanged(ValueError):
    pass


class JobStore:
    """``jobs/<name>.json`` files: a result with the settings (and their hash) it was made with."""

    def __init__(self, root: Path) -> None:
        self.root = root / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, job: Job) -> Path:
        return self.root / job.file

    def get(self, job: Job, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The stored record, None if absent; :class:`SettingsChanged` if made with other settings."""
        p = self.path(job)
        if not p.exists():
            return None
        rec = json.loads(p.read_text())
        if rec["hash"] != settings_hash(settings):
            changes = _diff(rec["settings"], settings)
            raise SettingsChanged(
                f"job {job.name} in {self.root.parent} was run with other settings "
                f"({'; '.join(changes[:6]) or 'hash differs'}); use another --out, or delete {p} to redo it"
            )
        return rec

    def peek(self, job: Job) -> dict[str, Any] | None:
        p = self.path(job)
        return json.loads(p.read_text()) if p.exists() else None

    def put(self, job: Job, settings: dict[str, Any], result: dict[str, Any], wall_s: float) -> dict[str, Any]:
        rec = {
            "name": job.name,
            "kind": job.kind,
            "seed": job.seed,
            "hash": settings_hash(settings),
            "settings": settings,
            "wall_s": round(wall_s, 3),
            "result": result,
        }
        tmp = self.path(job).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1, default=float))
        tmp.replace(self.path(job))
        return rec


# -- running one job ---------------------------------------------------------------------------------


@dataclass
class _Context:
    cfg: PaperConfig
    work: Path
    _data: dict[tuple[Any, str], BenchmarkData] = field(default_factory=dict)

    def seed_dir(self, seed: int) -> Path:
        return self.work / "cache" / f"seed{seed}"

    def data(self, seed: int | None, forget: str) -> BenchmarkData:
        key = (seed, forget)
        if key not in self._data:
            if seed is None:
                from ..data.readers import read_benchmark

                self._data[key] = read_benchmark(self.cfg.real.benchmark, self.cfg.real.data, forget=forget)
            else:
                self._data[key] = read_mllmu(self.seed_dir(seed) / "world", forget=forget)
        return self._data[key]

    def load(self, seed: int | None) -> LoadedModel:
        if seed is None:
            import torch

            r = self.cfg.real
            return load_model(
                r.model,
                device=r.device,
                dtype=getattr(torch, r.dtype),
                trust_remote_code=r.trust_remote_code,
                image_size=r.image_size,
            )
        return load_model(self.seed_dir(seed) / "vanilla")

    def unlearn_config(self, job: Job) -> UnlearnConfig:
        p = job.params
        changes: dict[str, Any] = {"method": p["method"], "seed": job.seed or 0}
        changes["cache_dir"] = str(self.work / "cache" / "ncu")
        for k in ("scope", "subspace"):
            if p.get(k):
                changes[k] = p[k]
        return replace(self.cfg.unlearn, **changes)


def _prepare(ctx: _Context, job: Job) -> dict[str, Any]:
    """World -> base -> vanilla of one seed (each step skipped when its folder exists)."""
    cfg, seed = ctx.cfg, job.seed
    root = ctx.seed_dir(seed)
    root.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.perf_counter()
    world = root / "world"
    if not world.exists():
        make_world(world, replace(cfg.world, seed=seed))
    data = read_mllmu(world, forget=cfg.forgets[0])
    base = root / "base"
    if not base.exists():
        make_tiny_model("llava", base, corpus_for(data, "llava"), sizes=cfg.sizes, seed=seed)
    times["world_and_base_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not (root / "vanilla").exists():
        finetune(load_model(base), data.train, replace(cfg.finetune, seed=seed), root / "vanilla")
    times["finetune_s"] = time.perf_counter() - t0
    return {"paths": {k: str(root / k) for k in ("world", "base", "vanilla")}, "timings": times}


def _case_items(data: BenchmarkData, n: int) -> dict[str, list[Sample]]:
    """Figure 5's items: the first ``n`` open questions (generation items, else MCQs) of each of Forget
    VQA / Forget QA / Retain VQA / Retain QA, in the benchmark's order (the same for every method)."""
    out = {}
    for split in ("forget", "retain"):
        for mod in ("vqa", "qa"):
            pool = [s for s in data.splits.get(split, []) if s.modality == mod]
            gen = [s for s in pool if s.task == "gen"] or [s for s in pool if s.task != "mcq"] or pool
            out[f"{split}_{mod}"] = gen[:n]
    return out


def _case_replies(lm: LoadedModel, data: BenchmarkData, n: int, max_new_tokens: int) -> dict[str, list[dict]]:
    from ..models.scoring import eval_mode

    out: dict[str, list[dict]] = {}
    with eval_mode(lm.model):
        for key, items in _case_items(data, n).items():
            replies = generate(lm, items, [s.question for s in items], max_new_tokens) if items else []
            out[key] = [
                {"id": s.id, "person": s.person, "question": s.question, "answer": s.answer, "reply": r}
                for s, r in zip(items, replies)
            ]
    return out


def _method_config(method: str, options: dict[str, Any]) -> Any:
    return get_method(method).config_class(**options) if options else None


def _run(ctx: _Context, job: Job, options: dict[str, Any]) -> dict[str, Any]:
    p = job.params
    data = ctx.data(job.seed, p["forget"])
    run_cfg = ctx.unlearn_config(job)
    method_cls = get_method(p["method"])
    lm = ctx.load(job.seed)
    t0 = time.perf_counter()
    lm, history = unlearn(lm, data, run_cfg, _method_config(p["method"], options))
    unlearn_s = time.perf_counter() - t0
    forget_pairs = sum(1 for s in data.train if s.person in data.forget_people)
    epochs = run_cfg.steps * run_cfg.batch_size / max(1, forget_pairs) if method_cls.trains else 0.0
    t0 = time.perf_counter()
    metrics = evaluate(lm, data, ctx.cfg.eval)
    result = {
        "metrics": metrics,
        "unlearn_s": unlearn_s,
        "evaluate_s": time.perf_counter() - t0,
        "steps": run_cfg.steps if method_cls.trains else 0,
        "forget_pairs": forget_pairs,
        "epochs": epochs,
        "trains": method_cls.trains,
        "scope": run_cfg.scope or method_cls.default_scope,
        "subspace": run_cfg.subspace or method_cls.default_subspace,
        "options": options,
        "final_log": history[-1] if history else {},
    }
    if p.get("case"):
        result["case"] = _case_replies(lm, data, ctx.cfg.case_items, ctx.cfg.eval.max_new_tokens)
    return result


def _vanilla(ctx: _Context, job: Job) -> dict[str, Any]:
    data = ctx.data(job.seed, job.params["forget"])
    lm = ctx.load(job.seed)
    result = {"metrics": evaluate(lm, data, ctx.cfg.eval)}
    if job.params.get("case"):
        result["case"] = _case_replies(lm, data, ctx.cfg.case_items, ctx.cfg.eval.max_new_tokens)
    return result


def _continual(ctx: _Context, job: Job, options: dict[str, Any]) -> dict[str, Any]:
    from .continual import run_continual

    p = job.params
    data = ctx.data(job.seed, p["forget"])
    folder = ctx.work / "continual" / job.file.removesuffix(".json")
    cfg = ctx.unlearn_config(job)
    # the folder resumes an interrupted run of this job; one left by the job's earlier settings (whose
    # record was deleted to redo it, e.g. after a changed default) is the plan's own scratch: start over
    key = json.dumps(
        {"unlearn": asdict(cfg), "method_config": resolved_method_config(p["method"], options), "params": p},
        sort_keys=True,
        default=str,
    )
    marker = folder / "job_settings.json"
    if folder.exists() and not (marker.is_file() and marker.read_text() == key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)
    state = run_continual(
        ctx.load(job.seed),
        data,
        folder,
        cfg,
        _method_config(p["method"], options),
        n_tasks=p["n_tasks"],
        eval_cfg=ctx.cfg.eval,
        replay=p["replay"],
    )
    return {"matrix": {k: state[k] for k in ("method", "tasks", "replay", "stages", "before")}}


def _project(job: Job) -> dict[str, Any]:
    from .cost import project, trained_methods

    out = {}
    for m in trained_methods():
        c = project(job.params["model"], m)
        out[m] = {"tflop_per_step": c.flops / 1e12, "total_gib": c.total_bytes / 2**30, "scope": c.scope}
    return {"model": job.params["model"], "costs": out}


def execute(ctx: _Context, job: Job, selection: dict[str, float] | None) -> dict[str, Any]:
    if job.kind == "prepare":
        return _prepare(ctx, job)
    if job.kind == "vanilla":
        return _vanilla(ctx, job)
    if job.kind == "run":
        return _run(ctx, job, method_options(job, selection))
    if job.kind == "continual":
        return _continual(ctx, job, method_options(job, selection))
    if job.kind == "project":
        return _project(job)
    raise ValueError(f"unknown job kind {job.kind!r}")


# -- the search --------------------------------------------------------------------------------------


def choose(candidates: dict[float, dict[str, float]], vanilla: dict[str, float], rule: Selection) -> dict[str, Any]:
    """Apply the selection rule to {candidate: mean metrics}; returns the choice and why."""
    floor = {"retain_vqa": rule.retain_ratio * vanilla["retain_vqa"], "real_vqa": rule.real_ratio * vanilla["real_vqa"]}
    ok = [
        v
        for v, m in candidates.items()
        if m["retain_vqa"] >= floor["retain_vqa"] and m["real_vqa"] >= floor["real_vqa"]
    ]
    order = list(candidates)
    utility = {v: candidates[v]["retain_vqa"] + candidates[v]["real_vqa"] for v in order}
    if ok:
        best = min(ok, key=lambda v: (candidates[v]["forget_vqa"], -utility[v], order.index(v)))
        why = "lowest mean Forget VQA among the candidates that keep Retain and Real-world VQA above the floors"
    else:
        best = max(order, key=lambda v: (utility[v], -order.index(v)))
        why = "fallback: no candidate keeps both floors; the highest mean Retain + Real-world VQA"
    return {"value": best, "admissible": ok, "floors": floor, "reason": why, "fallback": not ok}


def _mean(values: list[float]) -> float:
    xs = [v for v in values if not math.isnan(v)]
    return sum(xs) / len(xs) if xs else math.nan


def search(cfg: PaperConfig, run_one: Callable[[Job], dict[str, Any]]) -> dict[str, Any]:
    """The validation search (see :class:`Selection`); ``run_one(job)`` returns the job's record
    (run or found). Returns what ``selection.json`` holds."""
    defaults = asdict(_default_cvf())
    if cfg.given_selection is not None:
        return {
            "source": "given",
            "selected": dict(cfg.given_selection),
            "note": "given (--selection), not searched here"
            + ("" if cfg.given_selection else ": the method's defaults")
            + ("; real data has no validation world" if cfg.real is not None else ""),
        }
    main = cfg.forgets[0]
    for key in cfg.selection.search:
        if key not in defaults:
            raise ValueError(f"cannot search {key!r}: {OURS}'s config has the fields {sorted(defaults)}")
    vanilla = {
        seed: run_one(_vanilla_job(seed, main, case=False))["result"]["metrics"] for seed in cfg.validation_seeds
    }
    vanilla_mean = {k: _mean([vanilla[s][k] for s in cfg.validation_seeds]) for k in VQA}
    chosen: dict[str, float] = {}
    steps = []
    for key, values in cfg.selection.search.items():
        per_candidate: dict[float, dict[str, Any]] = {}
        for v in values:
            opts = {**chosen, key: float(v)}
            per_seed = {
                seed: run_one(run_job(seed, main, OURS, options=opts, selected=False))["result"]["metrics"]
                for seed in cfg.validation_seeds
            }
            per_candidate[float(v)] = {
                "options": opts,
                "per_seed": {str(s): {k: m[k] for k in VQA} for s, m in per_seed.items()},
                "mean": {k: _mean([m[k] for m in per_seed.values()]) for k in VQA},
            }
        pick = choose({v: c["mean"] for v, c in per_candidate.items()}, vanilla_mean, cfg.selection)
        chosen[key] = pick["value"]
        steps.append({"option": key, "candidates": {_fmt(v): c for v, c in per_candidate.items()}, **pick})
    return {
        "source": "validation search",
        "selected": chosen,
        "validation_seeds": list(cfg.validation_seeds),
        "forget": main,
        "vanilla_mean": vanilla_mean,
        "rule": asdict(cfg.selection),
        "method_defaults": defaults,
        "search": steps,
        "note": "validation worlds only; the reporting worlds "
        f"{list(cfg.report_seeds)} were never used for a choice (App. C.3)",
    }


# -- the whole plan ----------------------------------------------------------------------------------


def _release() -> None:
    """Free the last job's model before the next loads its own (a 7B model on a GPU)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _open_work(out: Path, settings: dict[str, Any]) -> Path:
    """The work folder: ``DIR.partial`` (an interrupted run), else a finished ``DIR`` moved back to
    ``DIR.partial`` (to add or redo experiments), else a new one. A ``DIR`` that is not a paper run
    is refused."""
    work = _work_dir(out)
    marker = "paper.json"
    if out.exists():
        if work.exists():
            raise FileExistsError(f"both {out} and {work} exist; remove one")
        if not (out / marker).exists():
            raise FileExistsError(f"{out} exists and is not the output of `mllm-unlearn paper`; choose a new --out")
        out.rename(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / marker).write_text(json.dumps(settings, indent=2, default=str) + "\n")
    return work


def run_paper(
    out_dir: str | Path,
    cfg: PaperConfig = PaperConfig(),
    experiments: tuple[str, ...] = EXPERIMENTS,
    *,
    progress: bool = True,
    keep_models: bool = True,
) -> dict[str, Any]:
    """Run (or resume) ``experiments`` into ``out_dir``; returns ``results.json``'s content.

    ``out_dir.partial`` holds the work (``jobs/``, ``cache/`` with worlds and models, ``continual/``)
    and becomes ``out_dir`` when every job is done and every output is written. A finished
    ``out_dir`` given again is reopened: finished jobs are skipped, new ones run."""
    from tqdm.auto import tqdm

    from .paper_report import write_outputs

    out = Path(out_dir)
    experiments = tuple(dict.fromkeys(experiments))
    jobs = plan(cfg, experiments)
    config_record = _jsonable({"schema": SCHEMA, "config": asdict(cfg), "experiments": list(experiments)})
    # refuse changed settings before any work (and before a finished DIR is reopened), for every job
    # whose settings are known now: all but those that take the search's result
    existing = _work_dir(out) if _work_dir(out).exists() else out
    if (existing / "jobs").is_dir():
        old = JobStore(existing)
        preselect = cfg.given_selection
        for j in jobs:
            if not j.selected or preselect is not None:
                old.get(j, job_settings(cfg, j, preselect))
    work = _open_work(out, config_record)
    store = JobStore(work)
    ctx = _Context(cfg, work)
    timings = {"ran": 0, "skipped": 0, "job_s": {}}

    bar = tqdm(total=len(jobs), desc="paper", dynamic_ncols=True, disable=not progress, position=0)
    done: set[str] = set()

    def run_one(job: Job, selection: dict[str, float] | None = None) -> dict[str, Any]:
        settings = job_settings(cfg, job, selection)
        rec = store.get(job, settings)
        if rec is None:
            bar.set_postfix_str(job.name)
            t0 = time.perf_counter()
            rec = store.put(job, settings, execute(ctx, job, selection), time.perf_counter() - t0)
            _release()
            timings["ran"] += 1
            timings["job_s"][job.name] = rec["wall_s"]
        elif job.name not in done:
            timings["skipped"] += 1
        if job.name not in done:
            done.add(job.name)
            if bar.total < len(done):
                bar.total = len(done)
            bar.update(1)
        return rec

    t_start = time.perf_counter()
    for job in jobs:
        if job.kind == "prepare":
            run_one(job)
    selection = search(cfg, run_one)
    chosen = selection["selected"]
    (work / "selection.json").write_text(json.dumps(selection, indent=2, default=float) + "\n")
    records: dict[str, dict[str, Any]] = {}
    for job in jobs:
        records[job.name] = run_one(job, chosen)
    bar.close()
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    results = write_outputs(work, cfg, experiments, records, selection, timings)
    if not keep_models:
        for seed_dir in (work / "cache").glob("seed*"):
            shutil.rmtree(seed_dir / "base", ignore_errors=True)
    if out.exists():
        raise FileExistsError(f"{out} appeared while the plan ran; the results are in {work}")
    os.replace(work, out)
    return results
