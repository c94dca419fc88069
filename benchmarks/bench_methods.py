"""Step cost of every unlearning method, measured in one run, as ratios to GA_Diff's step.

For each method (cvf_ncu and every baseline, at its default update scope, subspace and batch) a fresh
process loads the model, attaches the adapters the driver would (NCU calibration included), runs the
method's ``setup`` and then the training loop's step — ``method.loss(ctx, step)``, backward, gradient
clipping, AdamW step — ``--warmup`` times untimed and ``--steps`` times timed. Reported per method:

- ms/step: the median over windows of consecutive steps of their mean, a window being the method's
  period: 2 steps (MMUnlearner alternates two kinds), or for cvf_ncu lcm(2, ``relearn_sim_every``)
  (its simulated relearning step comes every k-th step), and its ratio to ga_diff's;
- peak MiB: CUDA: the allocator's peak over the timed steps (reset after setup). CPU: the process's
  peak resident set size (VmHWM) over warm-up and timed steps, reset after setup where the kernel
  allows (``/proc/self/clear_refs``), else the whole process's peak (``ru_maxrss``, setup included);
- tensor MiB: what the step holds by accounting, the same figure on any device: weights, trainable
  parameters with their gradients and AdamW state, and the tensors autograd saves for backward;
- GFLOP/step: one more period of steps counted with ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls, convolutions and attention; untimed), per step;
- forget/s: forget samples per second (``batch_size`` / step time): an epoch over the forget set takes
  (forget samples) / this;
- setup s: the once-per-request work before the first step — LoRA attached (for cvf_ncu the NCU
  calibration, Eq. 12-13, computed here: no cache) and the method's ``setup`` (reference IVRs).

Methods that do not train (MANU prunes once) have no step: their one-off ``apply`` time is shown.

Usage: python benchmarks/bench_methods.py [--model VANILLA --data WORLD] [--steps 20] [--json OUT]
       python benchmarks/bench_methods.py --quick        (a smaller world and model, few steps: a smoke test)
       python benchmarks/bench_methods.py --published llava-1.5-7b --dtype bf16 --batch-size 4 \
           --methods ga_diff cvf_ncu npo kl_min            (on a GPU: the published size, random weights)
Without --model/--data it builds the demo's world and an untrained tiny LLaVA (the demo's sizes) in a
temporary folder: timings do not depend on what the weights know. The NCU calibration figure that
``bench_unlearn.py`` prints stays there.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = "ga_diff"


def _rss_peak_reset() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.utils import logging as hf_logging

    from mllm_unlearn.data.mllmu import read_mllmu
    from mllm_unlearn.methods import get_method
    from mllm_unlearn.methods.base import UnlearnContext
    from mllm_unlearn.models.loading import load_model, torch_dtype
    from mllm_unlearn.nullspace import trainable_parameters
    from mllm_unlearn.train.unlearn import UnlearnConfig, attach_adapters, split_people

    hf_logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # on CUDA the CPU threads go to the calibration's eigendecompositions
    torch.manual_seed(0)
    dtype = torch_dtype(args.dtype)
    data = read_mllmu(args.data)
    forget, retain = split_people(data)
    t = time.perf_counter()
    if args.published:
        from mllm_unlearn.models.published import build_random, published_config
        from mllm_unlearn.models.tiny import corpus_for

        arch = published_config(args.published).model_type
        corpus = corpus_for(data, arch)
        lm = build_random(args.published, corpus, device=device, dtype=dtype, image_size=args.image_size)
    else:
        lm = load_model(args.model, device=device, dtype=dtype, image_size=args.image_size)
    build_s = time.perf_counter() - t
    cls = get_method(args.what)
    batch = {"batch_size": args.batch_size} if args.batch_size else {}
    cfg = UnlearnConfig(method=args.what, cache_dir=None, **batch)
    t = time.perf_counter()
    lm = attach_adapters(lm, retain, cfg, cls)
    attach_s = time.perf_counter() - t
    method = cls()
    ctx = UnlearnContext(lm, forget, retain, cfg.batch_size, cfg.seed, cfg.ivr_level)
    lm.model.train()
    t = time.perf_counter()
    method.setup(ctx)
    out: dict = {
        "method": args.what,
        "scope": cfg.scope or cls.default_scope,
        "subspace": cfg.subspace or cls.default_subspace,
        "batch": cfg.batch_size,
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "dtype": args.dtype,
        "model": args.published or args.model,
        "load_s": build_s,
        "attach_s": attach_s,  # LoRA attached; for a null subspace the NCU calibration (Eq. 12-13)
        "setup_s": time.perf_counter() - t,  # the method's once-per-request work (reference IVRs)
    }
    if cfg.batch_size and hasattr(method.cfg, "retain_batch_size"):
        out["batch"] = f"{cfg.batch_size}+{method.cfg.retain_batch_size}r"
    if not cls.trains:
        t = time.perf_counter()
        method.apply(ctx)
        out["apply_s"] = time.perf_counter() - t
        return out

    params = trainable_parameters(lm.model)
    opt = torch.optim.AdamW(params, lr=cfg.lr or cls.default_lr)
    every = getattr(method.cfg, "relearn_sim_every", 1) if getattr(method.cfg, "relearn_sim", 0) else 1
    period = math.lcm(2, every)
    out["period"] = period

    def step(i: int) -> None:
        loss, _ = method.loss(ctx, i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.synchronize()
    reset = _rss_peak_reset() if device == "cpu" else False
    for i in range(args.warmup):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        t = time.perf_counter()
        step(i)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    windows = [sum(times[i : i + period]) / period for i in range(0, len(times) - period + 1, period)] or times
    out["step_s"] = statistics.median(windows)
    out["forget_samples_per_s"] = cfg.batch_size / out["step_s"]
    if device == "cuda":
        out["peak_bytes"], out["peak_kind"] = torch.cuda.max_memory_allocated(), "cuda allocator, steps"
    elif reset and _vm_hwm_bytes():
        out["peak_bytes"], out["peak_kind"] = _vm_hwm_bytes(), "VmHWM, steps"
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_kind"] = "ru_maxrss, whole process"

    # accounted tensor memory and FLOPs of one more period of steps
    saved: dict[int, int] = {}
    param_storages = {p.untyped_storage()._cdata for p in lm.model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in param_storages:  # weights saved for backward are not activations
            saved.setdefault(storage._cdata, storage.nbytes())
        return t

    flops, acts = [], []
    for i in range(args.warmup + args.steps, args.warmup + args.steps + period):
        saved.clear()
        with FlopCounterMode(display=False) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = method.loss(ctx, i)
            loss.backward()
        opt.zero_grad(set_to_none=True)
        flops.append(counter.get_total_flops())
        acts.append(sum(saved.values()))
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    out["flops"] = sum(flops) / len(flops)
    out["tensor_bytes"] = weights + trainable + state + max(acts)
    out["trainable_params"] = sum(p.numel() for p in params)
    return out


def child(what: str, args: argparse.Namespace) -> dict:
    flags = ["--data", args.data, "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype]
    flags += ["--published", args.published] if args.published else ["--model", args.model]
    flags += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    flags += ["--image-size", str(args.image_size)] if args.image_size else []
    cmd = [sys.executable, __file__, "--child", what, *flags]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["method"] == BASELINE and "step_s" in r), None)
    head = (
        f"{'method':<12} {'scope':<7} {'batch':<7} {'ms/step':>8} {'x ' + BASELINE:>10} {'peak MiB':>9} "
        f"{'x ' + BASELINE:>10} {'tensor MiB':>10} {'x ' + BASELINE:>10} {'GFLOP/step':>10} {'x ' + BASELINE:>10} "
        f"{'forget/s':>8} {'setup s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "step_s" not in r:
            lines.append(
                f"{r['method']:<12} {r['scope']:<7} {'-':<7} no training step (one-off apply: "
                f"{r['apply_s'] * 1000:.0f} ms)"
            )
            continue

        def ratio(key: str, r: dict = r) -> str:
            return f"{r[key] / base[key]:.2f}" if base else "-"

        lines.append(
            f"{r['method']:<12} {r['scope']:<7} {r['batch']!s:<7} {1000 * r['step_s']:>8.1f} "
            f"{ratio('step_s'):>10} {r['peak_bytes'] / 2**20:>9.0f} {ratio('peak_bytes'):>10} "
            f"{r['tensor_bytes'] / 2**20:>10.1f} {ratio('tensor_bytes'):>10} {r['flops'] / 1e9:>10.2f} "
            f"{ratio('flops'):>10} {r['forget_samples_per_s']:>8.2f} {r['attach_s'] + r['setup_s']:>7.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--steps", type=int, default=24, help="timed steps (whole periods of the method count)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", nargs="*", help="default: every registered method")
    p.add_argument("--quick", action="store_true", help="small world and model, 2 warm-up + 4 timed steps")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument(
        "--published",
        help="instead of --model: a published architecture at full size with random weights "
        "(llava-1.5-7b, qwen2-vl-7b; models.published.build_random), built in each method's process",
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights' dtype")
    p.add_argument("--batch-size", type=int, help="UnlearnConfig.batch_size (default: its default, 8)")
    p.add_argument("--image-size", type=int, help="Qwen2-VL: square image size (--published default 448)")
    p.add_argument("--child", dest="what", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.what:
        print(json.dumps(measure(args)))
        return
    from mllm_unlearn.methods import available_methods

    methods = args.methods or available_methods()
    methods = sorted(methods, key=lambda m: (m != BASELINE, m))
    if args.quick:
        args.steps, args.warmup = 4, 2
    with tempfile.TemporaryDirectory() as tmp:
        if not args.data:
            from mllm_unlearn.data.world import WorldConfig, make_world

            world = WorldConfig(n_people=12, n_real=4, seed=0) if args.quick else WorldConfig()
            args.data = str(make_world(Path(tmp) / "world", world))
        if not (args.model or args.published):
            from mllm_unlearn.data.mllmu import read_mllmu
            from mllm_unlearn.models.tiny import TinySizes, corpus_for, make_tiny_model

            sizes = (
                TinySizes(vision_hidden=32, text_hidden=64, text_intermediate=128, vocab_size=400)
                if args.quick
                else TinySizes()
            )
            args.model = str(
                make_tiny_model("llava", Path(tmp) / "tiny", corpus_for(read_mllmu(args.data)), sizes=sizes)
            )
        rows = []
        for m in methods:
            t = time.perf_counter()
            rows.append(child(m, args))
            print(f"  {m}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            if args.json:  # after every method: a run cut short keeps what it measured
                Path(args.json).write_text(
                    json.dumps({"device": rows[0]["device"], "steps": args.steps, "warmup": args.warmup, "rows": rows})
                )
    device = rows[0]["device"] if rows else "?"
    print(
        f"device: {device}; {args.warmup} warm-up + {args.steps} timed steps per method, one process each; "
        f"peak memory: {rows[0].get('peak_kind', '-') if rows else '-'}"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
