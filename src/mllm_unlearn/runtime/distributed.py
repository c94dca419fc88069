"""Several processes through Hugging Face ``accelerate`` — and nothing at all with one.

Started by ``accelerate launch`` (or ``torchrun``) with more than one process, or with a DeepSpeed or
FSDP config, the helpers below talk to one :class:`accelerate.Accelerator`, created on first use.
Started as a plain command (``mllm-unlearn ...``, the tests) they do nothing: no Accelerator, no
process group, and the training loop runs exactly the single-process code it always did.

One distributed training step (:func:`mllm_unlearn.train.loop.run`):

1. every process draws the SAME global batch (the batch streams are a function of (seed, step)) and
   keeps its contiguous slice of it (:func:`shard`);
2. the loss of that slice is computed inside ONE forward call of the prepared module
   (:class:`LossStep`): DDP (and DeepSpeed, FSDP) arm their gradient all-reduce in the wrapped
   module's forward, while the methods reach the model in many ways (``get_image_features``, the base
   model, the adapter-disabled reference model) and never through a single ``model(...)`` call;
3. DDP averages the gradients over the processes, so every process takes the same optimiser step.

When is that the one-process step? DDP averages with equal weights, ``g = (1/W) sum_r grad L_r``. If
``L_r`` is the mean of a per-sample loss over the ``n_r`` samples of shard ``r`` and every shard has
``n/W`` samples, ``g`` is the gradient of the mean over all ``n`` samples: the one-process gradient up
to float rounding. Hence the requirement: **the global batch size must be a multiple of the number of
processes.** Otherwise (:func:`shard` warns) a sample of shard ``r`` weighs ``1/(W n_r)`` instead of
``1/n``: still a sound gradient, no longer the one-process one; a process left with no sample at all
is an error. Two kinds of loss are not plain per-sample means even with equal shards:

- a mean over *tokens* (the answer NLL) weighs shards by their token counts: divide the shard's token
  sum by the global count (:func:`total`) and multiply by ``W`` (``models.scoring.answer_nll``
  does, for fine-tuning and every method);
- terms built from *batch statistics* (CVF's pull anchor = mean IVR of the retain batch, its queue of
  negatives) would see the shard's statistics: :func:`gather` gives the global batch's (no gradient;
  ``CVFNCU.loss`` uses it).

Measured on the tiny test model (4 steps, tests/test_distributed.py): without these two fixes the
2-process CVF-NCU adapter B differed from the 1-process one by 20-30% (relative norm); with them by
~0.4%, less than a 1-process run with 2 threads differs from one with 1 thread (Adam turns float
noise in B's near-zero gradient entries, the null-space directions, into steps of up to ~lr/10).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_accelerator: Any = None  # the Accelerator, once created
_prepared: list[torch.nn.Module] = []  # modules returned by prepare(), latest last
_TRUE = ("1", "true", "yes")


def launched() -> bool:
    """True when started as one of several processes, or with a DeepSpeed / FSDP accelerate config."""
    env = os.environ
    size = max(int(env.get(k, "1") or 1) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    return size > 1 or any(env.get(k, "").lower() in _TRUE for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))


def accelerator():
    """The process's :class:`accelerate.Accelerator` (created on first call), or None if not launched.

    Without a visible CUDA device the processes run on CPU with the gloo backend (accelerate would
    otherwise treat torchrun-started CPU processes as independent single processes). DDP is told to
    look for unused parameters: a method may leave an adapter without gradient on some batch (e.g. the
    visual LoRA on a text-only batch), which would otherwise stop DDP with an error; the cost is one
    walk over the autograd graph per step (DDP warns once when it found nothing unused).
    """
    global _accelerator
    if _accelerator is None and launched():
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        threads = torch.get_num_threads()  # accelerate resets it for CPU processes; keep the CLI's choice
        _accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        torch.set_num_threads(threads)
        atexit.register(_end)
    return _accelerator


def _launched_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _end() -> None:
    if _launched_group():
        torch.distributed.destroy_process_group()


def leave(code: int) -> None:
    """End a launched process with ``code`` once its command is done: the process group torn down, the
    output flushed, then ``os._exit``, past the interpreter's own teardown. In that teardown one process of a
    2-process CPU run sometimes aborted after a complete run ("terminate called without an active exception":
    a C++ thread destroyed while joinable), so the launcher reported a failure. Returns at once when not
    launched. Objects the command left behind are collected first, so that their finalizers (e.g. the removal
    of spilled reference features) still run."""
    if not _launched_group():
        return
    gc.collect()
    _end()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def active() -> bool:
    """True when training goes through the Accelerator (see :func:`launched`)."""
    return accelerator() is not None


def world_size() -> int:
    acc = accelerator()
    return acc.num_processes if acc is not None else 1


def rank() -> int:
    acc = accelerator()
    return acc.process_index if acc is not None else 0


def is_main() -> bool:
    return rank() == 0


def main_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on the main process only (messages would otherwise repeat once per process)."""
    if is_main():
        print(*args, **kwargs)


def place(model: torch.nn.Module) -> torch.nn.Module:
    """Move ``model`` to this process's device (its GPU), before calibration and ``prepare``.
    Single process: the model stays where the caller put it."""
    acc = accelerator()
    return model.to(acc.device) if acc is not None else model


def shard(batch: Sequence[T]) -> Sequence[T]:
    """This process's contiguous share of the global ``batch`` (the whole batch in one process).

    Shards are in rank order, so ``gather`` of per-sample results rebuilds the global batch's order.
    Sizes differ by at most one; unequal sizes (a batch size that is not a multiple of the number of
    processes) are allowed with a warning, since DDP's average then weighs samples unequally (see the
    module docstring). A batch smaller than the number of processes is refused.
    """
    size = world_size()
    if size == 1:
        return batch
    n = len(batch)
    if n < size:
        raise ValueError(
            f"a batch of {n} sample(s) cannot be shared by {size} processes: use fewer "
            "processes, a larger batch size, or more samples in the set it is drawn from"
        )
    if n % size:
        warnings.warn(
            f"a batch of {n} samples is split unevenly over {size} processes: DDP then weighs "
            "samples unequally and the step differs from a one-process step; use a batch size "
            f"that is a multiple of {size}",
            stacklevel=2,
        )
    per, extra = divmod(n, size)
    r = rank()
    start = r * per + min(r, extra)
    return batch[start : start + per + (r < extra)]


class LossStep(torch.nn.Module):
    """A module that owns the trained model and whose forward is a loss closure.

    ``accelerator.prepare`` wraps THIS module, and the loop calls ``prepared(loss_fn, step)``: the
    whole loss computation, however it reaches the model, is one forward of the DDP / DeepSpeed /
    FSDP wrapper, which is what they need to synchronise gradients (DDP's reducer only expects
    gradients after its own forward ran). The model itself stays unwrapped where the methods see it
    (``ctx.lm.model``), so ``reference_model(ctx.lm.model)`` disables the adapters of the plain PEFT
    model, never of a wrapper.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def prepare(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """``accelerator.prepare`` a :class:`LossStep` around ``model`` and ``optimizer`` (together, as FSDP
    needs); returns ``(step_module, optimizer)``: call ``step_module(loss_fn, *args)``.

    Everything that must hold on every process is done BEFORE this call: frozen LoRA A set (and
    broadcast), model on its device. Single process: ``(LossStep(model), optimizer)``, unprepared.
    """
    acc = accelerator()
    if acc is None:
        return LossStep(model), optimizer
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:  # untested here: no DeepSpeed on this machine
        plugin = acc.state.deepspeed_plugin
        if plugin.is_auto("train_micro_batch_size_per_gpu"):  # no DataLoader to infer it from; only
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1  # DeepSpeed's bookkeeping uses it
    step_module, optimizer = acc.prepare(LossStep(model), optimizer)
    _prepared.append(step_module)
    return step_module, optimizer


def backward(loss: torch.Tensor) -> None:
    acc = accelerator()
    if acc is None:
        loss.backward()
    else:
        acc.backward(loss)


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float) -> Any:
    """Clip the (already averaged) gradients; FSDP clips through the latest prepared module, DeepSpeed
    clips by itself (its ``gradient_clipping`` setting)."""
    acc = accelerator()
    if acc is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP and _prepared:
        params = _prepared[-1].parameters()  # accelerate matches the prepared model's full list
    return acc.clip_grad_norm_(params, max_norm)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside a prepared module (or ``model`` itself)."""
    acc = accelerator()
    if acc is not None:
        model = acc.unwrap_model(model)
    return model.wrapped if isinstance(model, LossStep) else model


def mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a (detached) tensor over the processes; ``value`` itself in one process."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value / world_size()


def mean_logs(logs: Mapping[str, float]) -> dict[str, float]:
    """Each logged number averaged over the processes (every process logs the same keys)."""
    if world_size() == 1 or not logs:
        return dict(logs)
    keys = sorted(logs)
    values = mean(torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=accelerator().device))
    return dict(zip(keys, values.tolist()))


def total(count: int) -> int:
    """Sum of an integer over the processes (e.g. the global batch's token count)."""
    if world_size() == 1:
        return count
    t = torch.tensor([count], dtype=torch.int64, device=accelerator().device)
    torch.distributed.all_reduce(t)
    return int(t.item())


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dim 0 in rank order (other dims must agree; dim 0
    may differ, as with uneven shards); no gradient flows through it. With the contiguous shards of
    :func:`shard` this is the global batch's tensor, in the global batch's order."""
    size = world_size()
    if size == 1:
        return tensor
    local = tensor.detach().contiguous()
    counts = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(size)]
    torch.distributed.all_gather(counts, torch.tensor([len(local)], dtype=torch.int64, device=local.device))
    counts = [int(c.item()) for c in counts]
    if len(local) < max(counts):  # all_gather wants equal shapes: pad, then cut the padding off
        local = torch.cat([local, local.new_zeros((max(counts) - len(local), *local.shape[1:]))])
    parts = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(parts, local)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with the main process's values."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)


@contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first, the others after it (e.g. to read what it cached)."""
    acc = accelerator()
    with acc.main_process_first() if acc is not None else nullcontext():
        yield


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn`` on the main process only (writing files); the others wait for it, and raise the same
    exception if it failed, so that every process stops the same way. Returns ``fn``'s result on main,
    None elsewhere."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            error = exc
    message = [error]
    try:
        torch.distributed.broadcast_object_list(message, src=0)
    except Exception:  # an exception that does not pickle: send its text
        message = [RuntimeError(f"main process failed: {error!r}") if is_main() else None]
        torch.distributed.broadcast_object_list(message, src=0)
    if is_main() and error is not None:
        raise error
    if message[0] is not None:
        raise message[0]
    return result


def sharded() -> bool:
    """True when parameters are split over processes (DeepSpeed ZeRO-3, FSDP): a process's own
    ``state_dict()`` is then not the model; use :func:`full_state_dict`."""
    acc = accelerator()
    if acc is None:
        return False
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return True
    return acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of ``model`` (the one given to the latest :func:`prepare`), gathered for the
    main process, in a sharded run; None otherwise (save ``model`` as usual). Call on EVERY process.
    Untested here (no DeepSpeed, no GPUs); ZeRO-3 needs ``zero3_save_16bit_model: true``."""
    if not sharded():
        return None
    step_module = _prepared[-1]
    if unwrap(step_module) is not model:
        raise ValueError("full_state_dict: the model is not the one of the latest prepare()")
    state = accelerator().get_state_dict(step_module, unwrap=False)
    return {k.removeprefix("wrapped."): v for k, v in state.items()}
