"""``mllm-unlearn paper``: every table and figure of the paper's experimental section from one command.

Built-in worlds (validation worlds choose lambda, reporting worlds give mean ± 95 % CI)::

    mllm-unlearn paper --out paper_out [--seeds 3,4,5] [--validation-seeds 0,1,2] [--only tab1,fig4] [--quick]

Real data (one run per experiment; no validation world, so the selection is given)::

    mllm-unlearn paper --out paper_llava --model llava-hf/llava-1.5-7b-hf --data MLLMU-Bench --benchmark mllmu \\
        --selection paper_out/selection.json --device cuda --dtype bf16

Writes DIR/tab{1,2,4,5,6,7,8,9}.md, fig{2,3,4,5}.{md,png}, claims.md, selection.json, results.json and
jobs/ (the JSON of every run). The work happens in DIR.partial (resumable: finished jobs are skipped,
jobs whose settings changed are refused) and is renamed to DIR when complete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..runtime.options import DTYPE_NAMES


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..experiments.paper import EXPERIMENTS

    sp = subparsers.add_parser(
        "paper",
        help="every table and figure of the paper (built-in worlds, or a real model and benchmark)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("--out", required=True, help="output folder (work in OUT.partial; an OUT of this command reopens)")
    sp.add_argument("--seeds", default=None, help="reporting world seeds (default 3,4,5; --quick: 3,4)")
    sp.add_argument("--validation-seeds", default=None, help="world seeds of the search (default 0,1,2; --quick: 0)")
    sp.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(EXPERIMENTS)}")
    sp.add_argument("--quick", action="store_true", help="the reduced plan of the test suite (numbers mean nothing)")
    sp.add_argument("--methods", default=None, help="comma-separated methods of Tables 1/4/5/7 (default: all)")
    sp.add_argument("--lambdas", default=None, help="candidates of the lambda search (default 0.5,1,2,3,5)")
    sp.add_argument("--steps", type=int, default=None, help="unlearning steps per run (default 200)")
    sp.add_argument(
        "--selection",
        default=None,
        help="skip the search: a selection.json of an earlier run, or KEY=VALUE[,KEY=VALUE] (CVF options)",
    )
    sp.add_argument("--no-projection", action="store_true", help="Table 7 without the 7B FLOP projection (~3 min)")
    real = sp.add_argument_group("real data (instead of the built-in worlds)")
    real.add_argument("--model", default=None, help="the vanilla model: hub id or local folder")
    real.add_argument("--data", default=None, help="the benchmark folder")
    real.add_argument("--benchmark", default="mllmu", choices=("mllmu", "clear", "umu"))
    real.add_argument("--device", default="cpu")
    real.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_NAMES))
    real.add_argument("--image-size", type=int, default=None)
    real.add_argument("--trust-remote-code", action="store_true")
    sp.set_defaults(fn=cmd_paper)
    return sp


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def read_selection(text: str) -> dict[str, float]:
    """``--selection``: a selection.json (its ``selected``) or ``KEY=VALUE,...``."""
    path = Path(text)
    if path.is_dir():
        path = path / "selection.json"
    if path.exists():
        data = json.loads(path.read_text())
        if not isinstance(data.get("selected"), dict):
            raise ValueError(f"{path} has no 'selected' object (a selection.json of `mllm-unlearn paper`?)")
        return {k: float(v) for k, v in data["selected"].items()}
    if "=" not in text:
        raise FileNotFoundError(f"--selection {text}: no such file, and not KEY=VALUE")
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = float(value)
    return out


def build_config(args: argparse.Namespace):
    from dataclasses import replace

    from ..experiments.paper import FORGETS, PaperConfig, RealData, quick_config

    cfg = quick_config() if args.quick else PaperConfig()
    changes: dict = {}
    if args.seeds:
        changes["report_seeds"] = _ints(args.seeds)
    if args.validation_seeds:
        changes["validation_seeds"] = _ints(args.validation_seeds)
    if args.methods:
        changes["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.lambdas:
        changes["selection"] = replace(cfg.selection, search={"lam": _floats(args.lambdas)})
    if args.steps:
        changes["unlearn"] = replace(cfg.unlearn, steps=args.steps)
    if args.selection:
        changes["given_selection"] = read_selection(args.selection)
    if args.no_projection:
        changes["project_7b"] = False
    if args.model or args.data:
        if not (args.model and args.data):
            raise ValueError("real data needs both --model (the vanilla model) and --data (the benchmark folder)")
        from ..evaluate.harness import EvalConfig

        dtype = DTYPE_NAMES[args.dtype]
        changes["real"] = RealData(
            args.model, args.data, args.benchmark, args.device, dtype, args.trust_remote_code, args.image_size
        )
        changes["forgets"] = FORGETS[args.benchmark]
        # the benchmark's own protocol (letters by generation; UMU's option text)
        changes["eval"] = EvalConfig(mcq_mode="generate", protocol="umu" if args.benchmark == "umu" else "mllmu")
        changes["project_7b"] = False
        changes.setdefault("given_selection", {})
    return replace(cfg, **changes)


def cmd_paper(args: argparse.Namespace) -> int:
    from ..experiments.paper import EXPERIMENTS, run_paper

    experiments = EXPERIMENTS
    if args.only:
        experiments = tuple(e.strip() for e in args.only.split(",") if e.strip())
        unknown = set(experiments) - set(EXPERIMENTS)
        if unknown:
            raise ValueError(f"--only: unknown experiment(s) {sorted(unknown)}; experiments: {', '.join(EXPERIMENTS)}")
    cfg = build_config(args)
    if cfg.real is not None:
        from ..models.loading import check_model_source

        check_model_source(cfg.real.model)
    results = run_paper(args.out, cfg, experiments)
    print((Path(args.out) / "claims.md").read_text())
    t = results["timings"]
    print(f"{t['ran']} jobs run, {t['skipped']} found done, {t['total_s']:.0f} s; outputs in {args.out}")
    return 0
