"""Cost of CVF-NCU relative to baselines measured in the same run (ratios, not absolute timings).

Every method's step against GA_Diff's: ``bench_methods.py``; projected at 7B: ``project_cost.py``
(``docs/cost.md``). This script keeps the NCU calibration figure.

Prints:
  - unlearning step time and peak memory of ``cvf_ncu`` / a plain retain-NLL LoRA step on the same
    scope, batch and model (peak memory: the GPU allocator's peak on CUDA, else the peak RSS of a
    fresh process per measurement);
  - NCU calibration time / one evaluation pass over the retain set.

Usage: python benchmarks/bench_unlearn.py [--model VANILLA --data WORLD] [--steps 20]
Without --model/--data it builds the demo's world and an (untrained) tiny LLaVA in a temp folder:
timings do not depend on what the weights know.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(args: argparse.Namespace) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    from mllm_unlearn.data.mllmu import read_mllmu
    from mllm_unlearn.evaluate.harness import EvalConfig, score_items
    from mllm_unlearn.methods import get_method
    from mllm_unlearn.methods.base import UnlearnContext
    from mllm_unlearn.methods.cvf_ncu import CVFConfig
    from mllm_unlearn.models.loading import load_model
    from mllm_unlearn.nullspace import trainable_parameters
    from mllm_unlearn.train.unlearn import UnlearnConfig, attach_adapters, split_people

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = read_mllmu(args.data)
    forget, retain = split_people(data)
    lm = load_model(args.model, device=device)
    out: dict = {}
    if args.what == "calibration":
        t = time.perf_counter()
        attach_adapters(lm, retain, UnlearnConfig(cache_dir=None), get_method("cvf_ncu"))
        out["calibration_s"] = time.perf_counter() - t
        lm = load_model(args.model, device=device)
        t = time.perf_counter()
        score_items(lm, "retain", data.splits["retain"], EvalConfig(mcq_mode="likelihood"))
        out["eval_retain_s"] = time.perf_counter() - t
        return out

    subspace = "null" if args.what == "cvf_ncu" else "none"
    lm = attach_adapters(lm, retain, UnlearnConfig(subspace=subspace), get_method("cvf_ncu"))
    ctx = UnlearnContext(lm, forget, retain, batch_size=8, seed=0)
    if args.what == "cvf_ncu":
        method = get_method("cvf_ncu")()
        method.setup(ctx)
        loss_fn = lambda step: method.loss(ctx, step)[0]
    else:  # the plain step: retain answer NLL on a batch as large as CVF's retain batch
        size = CVFConfig().retain_batch_size
        retain_vqa = [s for s in retain if s.image is not None]
        loss_fn = lambda step: ctx.nll(ctx.stream("retain_vqa", lambda: retain_vqa, size))
    opt = torch.optim.AdamW(trainable_parameters(lm.model), lr=1e-3)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 3):
        t = time.perf_counter()
        loss_fn(step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out["step_s"] = sorted(times[3:])[len(times[3:]) // 2]  # median after warm-up
    out["peak_bytes"] = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return out


def child(what: str, args: argparse.Namespace) -> dict:
    flags = ["--model", args.model, "--data", args.data, "--steps", str(args.steps)]
    cmd = [sys.executable, __file__, "--child", what, *flags]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--child", dest="what", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.what:
        print(json.dumps(measure(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not (args.model and args.data):
            from mllm_unlearn.data.mllmu import read_mllmu
            from mllm_unlearn.data.world import make_world
            from mllm_unlearn.models.tiny import corpus_for, make_tiny_model

            args.data = str(make_world(Path(tmp) / "world"))
            args.model = str(make_tiny_model("llava", Path(tmp) / "tiny", corpus_for(read_mllmu(args.data))))
        plain, ours, calib = child("retain_nll", args), child("cvf_ncu", args), child("calibration", args)
    print(
        f"cvf_ncu step time / retain-NLL step time: {ours['step_s'] / plain['step_s']:.2f} "
        f"({1000 * ours['step_s']:.0f} ms vs {1000 * plain['step_s']:.0f} ms)"
    )
    print(
        f"cvf_ncu peak memory / retain-NLL peak memory: {ours['peak_bytes'] / plain['peak_bytes']:.2f} "
        f"({ours['peak_bytes'] / 2**20:.0f} MiB vs {plain['peak_bytes'] / 2**20:.0f} MiB)"
    )
    print(
        f"NCU calibration time / one evaluation pass over the retain set: "
        f"{calib['calibration_s'] / calib['eval_retain_s']:.2f} "
        f"({calib['calibration_s']:.1f} s vs {calib['eval_retain_s']:.1f} s)"
    )


if __name__ == "__main__":
    main()
