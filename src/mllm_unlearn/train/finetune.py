"""The memorisation fine-tune that makes the *vanilla* model (paper Sec. 4.1, App. C.1).

The base model is trained on every training pair of the benchmark (questions with and without the
image, labels on the answer tokens only — the public MLLMU-Bench code also trains on the question
tokens, a known flaw we do not copy). Tiny models train all weights; real checkpoints train LoRA
adapters on the LLM (MLLMU-Bench's recipe: r=16, lr 2e-5, 5 epochs, batch 4) that are merged into the
saved model, so the vanilla model is a plain checkpoint again.

Output is written to ``<out>.partial/`` (checkpoints, ``log.jsonl``) and moved to ``<out>`` only when
complete; an interrupted run resumes from its last checkpoint.

Several processes (``accelerate launch``): each trains on its shard of every global batch, only the
main process writes (checkpoints, log, the final model); every process reads the checkpoint it resumes
from, so the output folder must be on a file system they share.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data.sample import Sample
from ..models.loading import LoadedModel
from ..runtime import distributed
from ..runtime.batching import batches, seed_everything
from .loop import TrainConfig, run

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"  # optimizer state, step, RNG: tensors and numbers only


def nll_loss(lm: LoadedModel, samples: Sequence[Sample]) -> torch.Tensor:
    """Mean answer-token negative log-likelihood of a batch of training pairs.

    With several processes ``samples`` is this process's shard: its token sum is divided by the
    answer-token count of the GLOBAL batch, times the number of processes, so that DDP's average is
    the global batch's token mean (shards hold different numbers of answer tokens)."""
    batch = lm.arch.encode(lm.processor, samples, [s.question for s in samples], [s.answer for s in samples])
    logits, targets, _ = lm.arch.answer_logits(lm.model, batch.to(lm.model.device))
    if distributed.world_size() == 1:
        return torch.nn.functional.cross_entropy(logits.float(), targets)
    token_sum = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return token_sum * distributed.world_size() / distributed.total(targets.numel())


def _latest_checkpoint(work: Path) -> Path | None:
    ckpts = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def finetune(lm: LoadedModel, train: Sequence[Sample], cfg: TrainConfig, out_dir: str | Path, *,
             lora_rank: int = 0, scope: str = "all", checkpoint_every: int = 0) -> Path:
    """Fine-tune ``lm`` on ``train`` and save the result (model + processor) to ``out_dir``."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; choose a new --out")
    if not train:
        raise ValueError("the training set is empty")
    if distributed.sharded() and (lora_rank > 0 or checkpoint_every):  # ZeRO-3 / FSDP (untested)
        raise ValueError("with sharded parameters (ZeRO-3 / FSDP) finetune supports neither --lora-rank "
                         "(merging into sharded weights) nor checkpoints (pass --checkpoint-every 0); "
                         "use a DDP or ZeRO-2 config for those")
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    model = distributed.place(lm.model)
    pattern = lm.arch.scope_pattern(scope)
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=pattern))
    else:
        import re
        rx = re.compile(pattern)
        owners = {name for name, mod in model.named_modules() if rx.fullmatch(name)}
        for name, p in model.named_parameters():
            p.requires_grad = scope == "all" or name.rsplit(".", 1)[0] in owners
    model.train()

    start, optimizer = 0, None
    ckpt = _latest_checkpoint(work)
    params = [p for p in model.parameters() if p.requires_grad]
    if ckpt is not None:  # resume: weights, optimizer state and step; batches are a function of step
        model.load_state_dict(load_file(ckpt / WEIGHTS_FILE), strict=False)
        state = torch.load(ckpt / STATE_FILE, weights_only=True)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"] + 1
        torch.set_rng_state(state["torch_rng"])

    # length proxy for grouping: characters of question + answer, plus the image's tokens
    lengths = [len(s.question) + len(s.answer) + (64 if s.image is not None else 0) for s in train]
    data = batches(list(train), cfg.batch_size, cfg.seed, start_step=start, lengths=lengths)
    work_lm = LoadedModel(model, lm.processor, lm.arch)

    def loss_fn(step: int):
        return nll_loss(work_lm, distributed.shard(next(data))), {}

    def save_checkpoint(path: Path, step: int, opt: torch.optim.Optimizer) -> None:
        path.mkdir(exist_ok=True)
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, path / WEIGHTS_FILE)
        torch.save({"optimizer": opt.state_dict(), "step": step, "torch_rng": torch.get_rng_state()},
                   path / STATE_FILE)
        for old in work.glob("checkpoint-*"):
            if old != path:
                shutil.rmtree(old)

    def on_step(step: int, opt: torch.optim.Optimizer) -> None:
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            distributed.on_main(save_checkpoint, work / f"checkpoint-{step + 1}", step, opt)

    run(params, loss_fn, cfg, desc="finetune", log_file=work / "log.jsonl", start_step=start,
        optimizer=optimizer, on_step=on_step, model=model)

    model.eval()
    state = distributed.full_state_dict(model)  # None unless parameters are sharded (ZeRO-3, FSDP)
    if lora_rank > 0:
        model = model.merge_and_unload()

    def save_final() -> None:
        final = work / "final"
        shutil.rmtree(final, ignore_errors=True)
        model.save_pretrained(final, state_dict=state)
        lm.processor.save_pretrained(final)
        (final / "finetune_config.json").write_text(json.dumps(
            {**asdict(cfg), "lora_rank": lora_rank, "scope": scope, "n_train": len(train)}, indent=2))
        shutil.copy(work / "log.jsonl", final / "log.jsonl")
        final.rename(out)
        shutil.rmtree(work)

    distributed.on_main(save_final)  # the main process writes; the others wait for it
    lm.model = model
    return out
