"""Projected cost of one unlearning step of every method on real-size models (no GPU, no download).

Builds each published configuration (``configs/models/``) on the meta device in bf16, puts LoRA on
each method's default update scope, and runs one step's structure forward and backward under
``torch.utils.flop_counter.FlopCounterMode``; memory = bf16 weights + fp32 LoRA with gradient and
AdamW state + the tensors saved for backward + method state. See ``mllm_unlearn.experiments.cost``
for what a step's structure is, and ``docs/cost.md`` for the tables.

Usage: python benchmarks/project_cost.py [--models llava-1.5-7b qwen2-vl-7b] [--methods ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    import torch
    from transformers.utils import logging as hf_logging

    from mllm_unlearn.experiments.cost import Shapes, format_table, project, trained_methods
    from mllm_unlearn.models.published import PUBLISHED

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=sorted(PUBLISHED))
    p.add_argument("--methods", nargs="*", help="default: every method that trains")
    p.add_argument("--text-tokens", type=int, default=Shapes.text_tokens)
    p.add_argument("--answer-tokens", type=int, default=Shapes.answer_tokens)
    p.add_argument("--batch-size", type=int, default=Shapes.batch_size)
    p.add_argument(
        "--cvf-opt",
        action="append",
        default=[],
        help="what-if: an option of CVF-NCU's config, KEY=VALUE as unlearn's --opt (repeatable)",
    )
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    methods = args.methods or trained_methods()
    methods = sorted(methods, key=lambda m: (m != "ga_diff", m))
    shapes = Shapes(
        text_tokens=args.text_tokens,
        answer_tokens=args.answer_tokens,
        batch_size=args.batch_size,
        cvf_options=tuple(args.cvf_opt),
    )
    print(f"shapes: {asdict(shapes)}")
    out = {"shapes": asdict(shapes), "models": {}}
    for name in args.models:
        costs = []
        for m in methods:
            t = time.perf_counter()
            costs.append(project(name, m, shapes))
            print(f"  {name} {m}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        print(format_table(name, costs))
        base = next((c for c in costs if c.method == "ga_diff"), None)
        cvf = next((c for c in costs if c.method == "cvf_ncu"), None)
        if base and cvf:
            print(
                f"cvf_ncu / ga_diff: FLOPs {cvf.flops / base.flops:.2f}, "
                f"memory {cvf.total_bytes / base.total_bytes:.2f}"
            )
        print()
        out["models"][name] = [
            {
                **{k: v for k, v in asdict(c).items() if k != "passes"},
                "passes": [[asdict(x) for x in kind] for kind in c.passes],
                "total_bytes": c.total_bytes,
                "dominant": c.dominant,
            }
            for c in costs
        ]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
