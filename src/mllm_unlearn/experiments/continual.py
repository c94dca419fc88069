"""Continual unlearning (paper Sec. 4.4, App. C.1): forget requests arrive one after another.

The forget set is split into disjoint tasks T_1..T_K. A of every LoRA layer is calibrated on the
retain set once and stays frozen; B trained on T_t initialises T_{t+1}. After each stage every task
(also those not yet requested, as a control) and the shared Retain / Real-world sets are evaluated.

``replay`` (default on): stage t forgets T_1..T_t together, with the same step budget. Training on
T_t alone (the paper's protocol, ``replay=False``) let later stages undo earlier requests on the
demo world: T_1's Forget VQA went 0.5 -> 0.7 -> 1.0 over stages 1-3, since nothing in stage t's loss
keeps T_1 forgotten — unacceptable when each request is a deletion that must stay honoured.

``UnlearnConfig.recalibrate`` (without replay only; not in the paper, off): before each request after the
first, the last stage's edit is folded into the weights and A calibrated again on the retain photos *and the
earlier requests' photos* as the model now encodes them, B starting at zero (Sec. 3.2's lifelong-editing
argument: each edit in the null space of the previous ones). Each ``stage-t/`` then holds that stage's own
adapter, and the run's model is ``merged/``.

Forget VQA of a request is asked on the photos its stage trained on (5 MCQs per person). Given the
audit's view of the world (``unseen``: MLLMU-Bench's ``Test_Set`` photos, which no stage trains on),
each stage also measures every request's Forget VQA on its people's unseen photos (the audit's probe 1,
:mod:`mllm_unlearn.evaluate.audit.unseen`: every image-asked MCQ on each unseen photo, 25 items per
person with the synthetic world's 5 photos): a request whose training photos are forgotten but whose
face is not shows there, and one request's figure rests on 25-50 items instead of 5-10.

Writes ``matrix.json`` (stage x task Forget VQA, per-stage retain / real metrics), ``heatmap.png``
(Fig. 3; a second panel for unseen photos) and ``curves.png`` (Fig. 2). Each completed stage is saved
(adapter + metrics) under ``stage-t/``; an interrupted run given the same output folder resumes after
its last completed stage.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..data.sample import BenchmarkData
from ..evaluate.audit.common import AuditData, score_mcqs
from ..evaluate.harness import EvalConfig, score_items, summarize
from ..methods.base import get_method
from ..models.loading import LoadedModel
from ..runtime import distributed
from ..runtime.outputs import atomic_dir
from ..train.unlearn import UnlearnConfig, attach_adapters, merged, split_people, stranger_samples, unlearn_stage

MATRIX_FILE = "matrix.json"


def split_tasks(people: Sequence[str], n_tasks: int, seed: int = 0) -> list[list[str]]:
    """Randomly partition the forget people into ``n_tasks`` disjoint, non-empty tasks."""
    people = sorted(people)
    if not 1 <= n_tasks <= len(people):
        raise ValueError(f"cannot split {len(people)} forget people into {n_tasks} non-empty tasks")
    random.Random(seed).shuffle(people)
    return [sorted(people[i::n_tasks]) for i in range(n_tasks)]


def _stage_metrics(
    lm: LoadedModel, data: BenchmarkData, tasks: list[list[str]], cfg: EvalConfig, unseen: AuditData | None
) -> dict[str, Any]:
    forget_vqa = [s for s in data.splits["forget"] if s.modality == "vqa" and s.task == "mcq"]
    per_task = []
    for people in tasks:
        items = [s for s in forget_vqa if s.person in people]
        per_task.append(summarize(score_items(lm, "forget", items, cfg), cfg.mcq_mode)["forget_vqa"])
    out: dict[str, Any] = {"forget_vqa_per_task": per_task}
    if unseen is not None:  # one batched pass over every request's unseen photos
        scores = score_mcqs(lm, unseen.unseen_mcqs([p for people in tasks for p in people]))
        out["unseen_forget_vqa_per_task"] = [scores.accuracy(people) for people in tasks]
    other = {}
    for split in ("retain", "real"):
        mcq = [s for s in data.splits[split] if s.task == "mcq"]
        other.update(summarize(score_items(lm, split, mcq, cfg), cfg.mcq_mode))
    return {**out, **{k: other[k] for k in sorted(other)}}


def plot(matrix: dict[str, Any], out: Path) -> None:
    """Fig. 3 (stage x task heatmap of Forget VQA) and Fig. 2 (per-stage curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = matrix["stages"]
    keys = [k for k in ("forget_vqa_per_task", "unseen_forget_vqa_per_task") if k in stages[0]]
    n_tasks = len(matrix["tasks"])
    fig, axes = plt.subplots(
        1, len(keys), figsize=(len(keys) * (1.2 * len(stages) + 2), 1.0 * n_tasks + 1.5), squeeze=False
    )
    for ax, key in zip(axes[0], keys):
        grid = [[s[key][t] for s in stages] for t in range(n_tasks)]
        im = ax.imshow(grid, cmap="Blues", vmin=0, vmax=1)
        for t, row in enumerate(grid):
            for k, v in enumerate(row):
                ax.text(k, t, f"{100 * v:.0f}", ha="center", va="center", color="white" if v > 0.6 else "black")
        ax.set_xticks(range(len(stages)), [str(i + 1) for i in range(len(stages))])
        ax.set_yticks(range(n_tasks), [f"T{t + 1}" for t in range(n_tasks)])
        ax.set_xlabel("unlearning stage")
        ax.set_ylabel("task evaluated")
        ax.set_title("training photos" if key == "forget_vqa_per_task" else "unseen photos")
    replay = "replay of earlier requests" if matrix.get("replay") else "each request alone"
    fig.suptitle(f"Forget VQA accuracy (%) — {matrix['method']}, {replay}")
    fig.colorbar(im, ax=list(axes[0]))
    fig.savefig(out / "heatmap.png", dpi=120)
    plt.close(fig)

    x = list(range(1, len(stages) + 1))
    cumulative = [sum(s["forget_vqa_per_task"][: i + 1]) / (i + 1) for i, s in enumerate(stages)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    panels = [
        (cumulative, "forget", "(a) Forget VQA, tasks so far"),
        ([s["retain_vqa"] for s in stages], "retain", "(b) Retain VQA"),
        ([s["real_vqa"] for s in stages], "real", "(c) Real-world VQA"),
    ]
    for ax, (ys, split, title) in zip(axes, panels):
        ax.plot(x, [100 * y for y in ys], marker="o", label=matrix["method"])
        if split == "forget" and "unseen_forget_vqa_per_task" in stages[0]:
            seen = [sum(s["unseen_forget_vqa_per_task"][: i + 1]) / (i + 1) for i, s in enumerate(stages)]
            ax.plot(x, [100 * y for y in seen], marker="s", label="unseen photos")
        ax.axhline(100 * matrix["before"][f"{split}_vqa"], ls="--", color="grey", label="before")
        ax.set_title(title)
        ax.set_xlabel("unlearning stage")
        ax.set_xticks(x)
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def _save_stage(lm: LoadedModel, stage_dir: Path, state: dict[str, Any], state_file: Path) -> None:
    """A completed stage: its adapter, then the progress file (atomically) that resuming reads."""
    lm.model.save_pretrained(stage_dir)
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_file)


def _save_merged(lm: LoadedModel, path: Path) -> None:
    with atomic_dir(path) as tmp:
        lm.save_pretrained(tmp)


def stage_model(lm: LoadedModel, run: str | Path, stage: int, recalibrated: bool) -> LoadedModel:
    """``lm`` (the model the continual run in ``run`` started from) as it was after ``stage`` >= 1, adapters
    folded in: that stage's adapter (one A, B carried over), or with ``recalibrate`` every stage's adapter up to
    it, in order (each applies to the model the earlier ones left)."""
    from peft import PeftModel

    for k in range(1, stage + 1) if recalibrated else [stage]:
        lm = merged(LoadedModel(PeftModel.from_pretrained(lm.model, Path(run) / f"stage-{k}"), lm.processor, lm.arch))
    return lm


def _save_final(state: dict[str, Any], out: Path) -> None:
    (out / MATRIX_FILE).write_text(json.dumps(state, indent=2))
    plot(state, out)


def run_continual(
    lm: LoadedModel,
    data: BenchmarkData,
    out_dir: str | Path,
    cfg: UnlearnConfig,
    method_cfg: Any = None,
    *,
    n_tasks: int = 5,
    eval_cfg: EvalConfig | None = None,
    replay: bool = True,
    unseen: AuditData | None = None,
) -> dict[str, Any]:
    """Run (or resume) the K-stage continual unlearning experiment into ``out_dir``; with ``unseen``
    (the world as :func:`~mllm_unlearn.evaluate.audit.load_audit_data` reads it) every stage also
    measures each request on its people's unseen photos."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if cfg.distill_steps:
        raise ValueError(
            "distill_steps is for one request: continual unlearning carries the adapters' B from one request to "
            "the next, which a distilled (merged) model no longer has"
        )
    if cfg.recalibrate and replay:
        raise ValueError(
            "recalibrate keeps each new request's edit off the earlier requests' photos; with replay every stage "
            "trains on them again: use it without replay (--no-replay)"
        )
    if cfg.forget_directions:
        raise ValueError(
            "forget_directions fits A to one request; continual unlearning calibrates A once, before the "
            "first request, and keeps it for all of them (Sec. 3.3)"
        )
    eval_cfg = eval_cfg or EvalConfig(mcq_mode="likelihood")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method_cls = get_method(cfg.method)
    tasks = split_tasks(sorted(data.forget_people), n_tasks, cfg.seed)
    _, retain = split_people(data)
    strangers = stranger_samples(data, data.forget_people)
    method_config = method_cls(method_cfg).config_dict()
    state_file = out / "progress.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    if state:
        state.setdefault("unseen_photos", False)  # runs recorded before the key measured none
        state["config"] = {**asdict(UnlearnConfig()), **state["config"]}  # options added since: their defaults
        now = {
            "tasks": tasks,
            "config": asdict(cfg),
            "method_config": method_config,
            "replay": replay,
            "unseen_photos": unseen is not None,
        }
        changed = [k for k, v in now.items() if state.get(k) != v]
        if changed:
            raise ValueError(
                f"{out} holds a continual run with other {', '.join(changed)}; resume with its settings "
                "or choose a new folder"
            )

    before = None if state else _stage_metrics(lm, data, tasks, eval_cfg, unseen)
    if not cfg.recalibrate:  # one A for every request (Sec. 3.2)
        lm = attach_adapters(lm, retain, cfg, method_cls, strangers)
    state = state or {
        "method": cfg.method,
        "tasks": tasks,
        "config": asdict(cfg),
        "method_config": method_config,
        "replay": replay,
        "unseen_photos": unseen is not None,
        "stages": [],
        "before": {
            "forget_vqa": sum(before["forget_vqa_per_task"]) / n_tasks,
            "retain_vqa": before["retain_vqa"],
            "real_vqa": before["real_vqa"],
            **({"unseen_forget_vqa_per_task": before["unseen_forget_vqa_per_task"]} if unseen is not None else {}),
        },
    }
    if state["stages"] and not cfg.recalibrate:  # resume: B of the last completed stage
        last = out / f"stage-{len(state['stages'])}" / "adapter_model.safetensors"
        set_peft_model_state_dict(lm.model, load_file(last))
    elif state["stages"]:  # resume: every completed stage's edit folded in, in order
        lm = stage_model(lm, out, len(state["stages"]), recalibrated=True)
    for t in range(len(state["stages"]), n_tasks):
        requested = {p for task in (tasks[: t + 1] if replay else tasks[t : t + 1]) for p in task}
        forget = [s for s in data.train if s.person in requested]
        # people of later requests are retain people until they ask: kept recognised (L_RET, L_GUM)
        later = {p for task in tasks[t + 1 :] for p in task}
        stage_retain = retain + [s for s in data.train if s.person in later]
        method = method_cls(method_cfg)
        # without replay, the earlier requests' photos are held where this stage found them
        earlier = {p for task in tasks[:t] for p in task} if not replay else set()
        forgotten = [s for s in data.train if s.person in earlier]
        if cfg.recalibrate:  # the last stage's edit folded in; A avoids the earlier requests' photos as they now are
            lm = attach_adapters(merged(lm), retain + forgotten, cfg, method_cls, strangers, cache=t == 0)
        unlearn_stage(
            lm,
            method,
            forget,
            stage_retain,
            cfg,
            desc=f"stage {t + 1}/{n_tasks}",
            strangers=strangers,
            forgotten=forgotten,
        )
        metrics = _stage_metrics(lm, data, tasks, eval_cfg, unseen)
        state["stages"].append(metrics)
        distributed.on_main(_save_stage, lm, out / f"stage-{t + 1}", state, state_file)
        seen = metrics.get("unseen_forget_vqa_per_task")
        distributed.main_print(
            f"stage {t + 1}: forget VQA per task "
            f"{[round(v, 2) for v in metrics['forget_vqa_per_task']]}"
            + (f" (unseen photos {[round(v, 2) for v in seen]})" if seen else "")
            + f", retain VQA {metrics['retain_vqa']:.3f}, real VQA {metrics['real_vqa']:.3f}"
        )
    if cfg.recalibrate:  # the stages' adapters are a chain of edits: the run is carried by the merged model
        distributed.on_main(_save_merged, merged(lm), out / "merged")
    distributed.on_main(_save_final, state, out)
    return state
