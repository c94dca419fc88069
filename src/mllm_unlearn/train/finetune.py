"""The memorisation fine-tune that makes the *vanilla* model (paper Sec. 4.1, App. C.1).

The base model is trained on every training pair of the benchmark (questions with and without the
image, labels on the answer tokens only — the public MLLMU-Bench code also trains on the question
tokens, a known flaw we do not copy). Tiny models train all weights; real checkpoints train LoRA
adapters on the LLM (MLLMU-Bench's recipe: r=16, lr 2e-5, 5 epochs, batch 4) that are merged into the
saved model, so the vanilla model is a plain checkpoint again.

Output is written to ``<out>.partial/`` (settings, checkpoints, ``log.jsonl``) and moved to ``<out>``
only when complete. An interrupted run given the same ``<out>`` resumes from its newest readable
checkpoint, and only with the settings it started with: anything else would train a model no single
setting describes, under a record that names only the last one. Each checkpoint appears whole or not
at all (written beside its final name, then renamed), and the log is cut back to the checkpoint, so
every step is logged once.

Several processes (``accelerate launch``): each trains on its shard of every global batch, only the
main process writes (checkpoints, log, the final model); every process reads the checkpoint it resumes
from, so the output folder must be on a file system they share.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..data.sample import Sample
from ..models.loading import LoadedModel
from ..models.scoring import answer_nll
from ..nullspace import fingerprint_samples
from ..runtime import distributed
from ..runtime.batching import batches, seed_everything
from ..runtime.outputs import atomic_dir, refuse_existing
from .loop import TrainConfig, run

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"  # optimizer state, step, RNG: tensors and numbers only
SETTINGS_FILE = "finetune_config.json"  # what the run was asked to do; a resumed run must ask the same
LOG_FILE = "log.jsonl"


def finetune(
    lm: LoadedModel,
    train: Sequence[Sample],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    lora_rank: int = 0,
    scope: str = "all",
    checkpoint_every: int = 0,
) -> Path:
    """Fine-tune ``lm`` on ``train`` and save the result (model + processor) to ``out_dir``."""
    out = refuse_existing(out_dir)
    _check_request(train, lora_rank, checkpoint_every)
    work = out.with_name(out.name + ".partial")
    # everything that decides the weights (and log_every, or the log would mix two spacings); a
    # resumed run must match all of it. checkpoint_every may change: it decides nothing.
    settings = {
        **asdict(cfg),
        "lora_rank": lora_rank,
        "scope": scope,
        "n_train": len(train),
        "train_fingerprint": fingerprint_samples(train),
    }
    distributed.on_main(_open_work_folder, work, settings)  # every process then reads what main left
    seed_everything(cfg.seed)

    model = _trainable_model(lm, scope, lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    start, optimizer = _resume(work, model, params, cfg)
    # length proxy for grouping: characters of question + answer, plus the image's tokens
    lengths = [len(s.question) + len(s.answer) + (64 if s.image is not None else 0) for s in train]
    data = batches(list(train), cfg.batch_size, cfg.seed, start_step=start, lengths=lengths)
    work_lm = LoadedModel(model, lm.processor, lm.arch)

    def loss_fn(step: int):
        return answer_nll(work_lm, distributed.shard(next(data))), {}

    def on_step(step: int, opt: torch.optim.Optimizer) -> None:
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            distributed.on_main(_save_checkpoint, work, step, model, opt)

    run(
        params,
        loss_fn,
        cfg,
        desc="finetune",
        log_file=work / LOG_FILE,
        start_step=start,
        optimizer=optimizer,
        on_step=on_step,
        model=model,
    )

    model.eval()
    state = distributed.full_state_dict(model)  # None unless parameters are sharded (ZeRO-3, FSDP)
    if lora_rank > 0:
        model = model.merge_and_unload()
    distributed.on_main(_save_final, out, work, model, state, lm.processor)  # the others wait for it
    lm.model = model
    return out


def _check_request(train: Sequence[Sample], lora_rank: int, checkpoint_every: int) -> None:
    if not train:
        raise ValueError("the training set is empty")
    if distributed.sharded() and (lora_rank > 0 or checkpoint_every):  # ZeRO-3 / FSDP (untested)
        raise ValueError(
            "with sharded parameters (ZeRO-3 / FSDP) finetune supports neither --lora-rank "
            "(merging into sharded weights) nor checkpoints (pass --checkpoint-every 0); "
            "use a DDP or ZeRO-2 config for those"
        )


def _trainable_model(lm: LoadedModel, scope: str, lora_rank: int) -> torch.nn.Module:
    """``lm.model`` on this process's device, in train mode, with only ``scope`` trainable: through
    LoRA adapters of rank ``lora_rank`` on its Linears, or (rank 0) its own weights."""
    model = distributed.place(lm.model)
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        target = lm.arch.scope_pattern(scope)
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=target))
    else:
        select_trainable(model, lm.arch, scope)
    model.train()
    return model


def select_trainable(model: torch.nn.Module, arch, scope: str) -> None:
    """Make exactly the parameters of ``scope`` (``arch.scope_pattern``: llm, visual, projector, all)
    trainable, in place; ``all`` is every parameter, the embeddings and the LM head included."""
    rx = re.compile(arch.scope_pattern(scope))
    owners = {name for name, _ in model.named_modules() if rx.fullmatch(name)}
    for name, p in model.named_parameters():
        p.requires_grad_(scope == "all" or name.rsplit(".", 1)[0] in owners)


# -- the work folder: settings, checkpoints, log --------------------------------------------------


def _open_work_folder(work: Path, settings: dict[str, Any]) -> None:
    """Start ``work`` with ``settings`` recorded, or ready it for resuming: the same settings only, no
    unreadable checkpoint, and the log cut back to the steps the newest checkpoint holds."""
    settings = json.loads(json.dumps(settings))  # as they read back (tuples become lists)
    record = work / SETTINGS_FILE
    if record.exists():
        _refuse_other_settings(json.loads(record.read_text()), settings, work)
    elif work.exists() and any(work.iterdir()):
        raise ValueError(
            f"{work} holds an interrupted fine-tune without recorded settings (an older version "
            "of this package?): delete it to start over"
        )
    else:
        work.mkdir(parents=True, exist_ok=True)
        _write_atomically(record, json.dumps(settings, indent=2))
    done = _drop_unreadable_checkpoints(work)
    log = work / LOG_FILE
    if log.exists():  # rows of steps after the checkpoint will be run, and logged, again
        rows = [line for line in log.read_text().splitlines() if json.loads(line)["step"] < done]
        _write_atomically(log, "".join(row + "\n" for row in rows))


def _refuse_other_settings(old: dict[str, Any], new: dict[str, Any], work: Path) -> None:
    changed = [
        f"{key}: {old.get(key)!r} → {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]
    if changed:
        raise ValueError(
            f"{work} holds an interrupted fine-tune with other settings ({'; '.join(changed)}): "
            f"resume with the same settings, or delete {work} to start over"
        )


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _checkpoints(work: Path) -> list[tuple[int, Path]]:
    """``(steps done, folder)`` of every ``checkpoint-N`` in ``work``, newest first."""
    named = ((re.fullmatch(r"checkpoint-(\d+)", p.name), p) for p in work.glob("checkpoint-*"))
    return sorted(((int(m.group(1)), p) for m, p in named if m), reverse=True)


def _drop_unreadable_checkpoints(work: Path) -> int:
    """Remove, newest first, the checkpoints that do not read back (cut short by a crash of an older
    version, a full disk...) until one does; returns the steps it holds (0: none left)."""
    for steps, folder in _checkpoints(work):
        problem = _checkpoint_problem(folder, steps)
        if problem is None:
            return steps
        warnings.warn(f"removing unreadable checkpoint {folder}: {problem}", stacklevel=2)
        shutil.rmtree(folder)
    return 0


def _checkpoint_problem(folder: Path, steps: int) -> str | None:
    """Why the checkpoint cannot be resumed from, or None. Cheap: the weights' header (safetensors
    checks that the file covers it) and the memory-mapped trainer state, not the tensors themselves."""
    try:
        with safe_open(folder / WEIGHTS_FILE, "pt"):
            pass
        state = torch.load(folder / STATE_FILE, weights_only=True, mmap=True)
    except Exception as exc:  # safetensors, zip and OS errors alike: this one cannot be used
        return str(exc)
    return None if state.get("step") == steps - 1 else f"it holds step {state.get('step')}, not {steps - 1}"


def _resume(
    work: Path, model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: TrainConfig
) -> tuple[int, torch.optim.Optimizer | None]:
    """Load the newest checkpoint into ``model`` and a new optimizer; ``(first step to run, optimizer)``,
    ``(0, None)`` without one. Batches are a function of (seed, step), so nothing else is needed."""
    found = _checkpoints(work)
    if not found:
        return 0, None
    steps, folder = found[0]
    weights = load_file(folder / WEIGHTS_FILE)
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - weights.keys()
    if missing:
        raise ValueError(f"{folder} lacks trained weights {sorted(missing)[:5]}")
    model.load_state_dict(weights, strict=False)
    state = torch.load(folder / STATE_FILE, weights_only=True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return steps, optimizer


def _save_checkpoint(work: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """The state after ``step``, as ``checkpoint-{step + 1}``: built in a temporary folder renamed into
    place when complete; the previous checkpoint is removed only then."""
    path = work / f"checkpoint-{step + 1}"
    with atomic_dir(path) as tmp:
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, tmp / WEIGHTS_FILE)
        torch.save({"optimizer": opt.state_dict(), "step": step, "torch_rng": torch.get_rng_state()}, tmp / STATE_FILE)
    for _, old in _checkpoints(work):
        if old != path:
            shutil.rmtree(old)


def _save_final(out: Path, work: Path, model: torch.nn.Module, state: dict | None, processor: Any) -> None:
    """The fine-tuned model as a plain checkpoint, with the run's settings and log; then ``work`` goes."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
        shutil.copy(work / SETTINGS_FILE, tmp / SETTINGS_FILE)
        shutil.copy(work / LOG_FILE, tmp / LOG_FILE)
    shutil.rmtree(work)
