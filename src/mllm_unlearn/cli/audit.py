"""``mllm-unlearn audit``: is the forgetting real? Report cards for unlearned runs (see docs/audit.md).

One world::

    mllm-unlearn audit --vanilla VANILLA --data WORLD --runs cvf=RUN_DIR ga=OTHER_RUN \\
        [--oracle ORACLE | --base BASE] --out REPORT_DIR

Several synthetic worlds (world -> vanilla -> oracle -> each method -> audit per seed, all cached)::

    mllm-unlearn audit --seeds 3,4,5 --methods cvf_ncu,ga --cache CACHE --out REPORT_DIR [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    sp = subparsers.add_parser(
        "audit",
        help="report cards: unseen photos, misidentification, relearning, benign fine-tuning, "
        "quantisation, retrained oracle (one world, or several with --seeds)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument(
        "--out",
        required=True,
        help="report folder: report.json, report.md, report.png (with --seeds: seed<N>/ and summary.json / summary.md)",
    )
    one = sp.add_argument_group("one world")
    one.add_argument("--vanilla", help="the vanilla (fine-tuned, not unlearned) model")
    one.add_argument("--data", help="MLLMU-Bench folder (e.g. a world from make-world)")
    one.add_argument(
        "--runs",
        nargs="*",
        default=[],
        help="runs to audit, NAME=PATH or PATH: a run folder (merged/ or adapter/), a PEFT "
        "adapter (applied to --vanilla) or a merged model",
    )
    one.add_argument("--oracle", help="the retrained oracle (vanilla fine-tune without the forget people)")
    one.add_argument(
        "--base",
        help="the base model the vanilla was fine-tuned from: trains the oracle with "
        "the vanilla's finetune_config.json, cached in --cache",
    )
    many = sp.add_argument_group("several synthetic worlds")
    many.add_argument("--seeds", help="comma-separated world seeds, e.g. 3,4,5")
    many.add_argument("--methods", default="cvf_ncu", help="comma-separated methods (or 'all') for --seeds")
    many.add_argument("--quick", action="store_true", help="with --seeds: the tiny, fast variant (tests)")
    sp.add_argument(
        "--cache",
        default=None,
        help="cache folder for oracles (and with --seeds, everything); default: <out>/../.audit_cache",
    )
    sp.add_argument("--forget", default="forget_15")
    sp.add_argument(
        "--probes",
        default=None,
        help="comma-separated subset of unseen,identity,relearn,benign,quantization,oracle (default: all)",
    )
    # the attack budget of probes 3 and 4; an option left out keeps the audit's (--quick: 5 steps, batch 4)
    sp.add_argument("--relearn-steps", type=int, default=None, help="default 60")
    sp.add_argument("--relearn-lr", type=float, default=None, help="default 1e-4")
    sp.add_argument("--relearn-batch-size", type=int, default=None, help="default 8")
    sp.add_argument(
        "--relearn-scope",
        default=None,
        help="weights the relearning and benign fine-tunes train: all (default), llm, visual, projector",
    )
    sp.add_argument(
        "--relearn-both-halves",
        action="store_true",
        help="the relearning probe both ways (attack half A, measure B, and the reverse), pooled: every forget "
        "person measured, about two thirds of one way's spread between draws (off: the protocol's one way)",
    )
    sp.add_argument("--quant", default=None, help="comma-separated specs (default int8,int4,int4-g128,int4-g64)")
    sp.add_argument("--unseen-photos", type=int, default=None, help="at most this many unseen photos per person")
    sp.add_argument("--max-new-tokens", type=int, default=24)
    sp.add_argument("--seed", type=int, default=None, help="seed of the relearning / benign fine-tunes (0)")
    sp.set_defaults(fn=cmd_audit)
    return sp


def _audit_config(args: argparse.Namespace, base=None):
    from dataclasses import replace

    from ..evaluate.audit import AuditConfig

    cfg = base or AuditConfig()
    changes = {
        "forget": args.forget,
        "max_new_tokens": args.max_new_tokens,
        "unseen_photos": args.unseen_photos,
        "relearn_both_halves": args.relearn_both_halves or cfg.relearn_both_halves,
    }
    asked = {
        "steps": args.relearn_steps,
        "lr": args.relearn_lr,
        "batch_size": args.relearn_batch_size,
        "seed": args.seed,
        "scope": args.relearn_scope,
    }
    changes["budget"] = replace(cfg.budget, **{k: v for k, v in asked.items() if v is not None})
    if args.probes:
        changes["probes"] = tuple(p.strip() for p in args.probes.split(",") if p.strip())
    if args.quant:
        changes["quant_specs"] = tuple(q.strip() for q in args.quant.split(",") if q.strip())
    return replace(cfg, **changes)


def _runs(items: list[str]) -> dict[str, str]:
    runs: dict[str, str] = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        if name in runs or name in ("vanilla", "oracle"):
            raise ValueError(f"run name {name!r} is used twice (or is 'vanilla' / 'oracle'); write NAME=PATH")
        runs[name] = path
    return runs


def cmd_audit(args: argparse.Namespace) -> int:
    cache = Path(args.cache) if args.cache else Path(args.out).resolve().parent / ".audit_cache"
    if args.seeds:
        from ..experiments.audit import MultiSeedConfig, quick_config, run_multiseed, summary_markdown

        seeds = tuple(int(s) for s in args.seeds.split(","))
        if args.methods == "all":
            from ..methods import report_order

            methods = tuple(report_order())
        else:
            methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        cfg = quick_config(seeds) if args.quick else MultiSeedConfig(seeds=seeds)
        cfg.methods, cfg.forget = methods, args.forget
        cfg.audit = _audit_config(args, cfg.audit)
        summary = run_multiseed(args.out, cfg, cache)
        print(summary_markdown(summary["runs"], list(seeds)))
        return 0
    if not (args.vanilla and args.data):
        raise ValueError("give --vanilla and --data (one world), or --seeds (several synthetic worlds)")
    from ..experiments.audit import run_audit

    cfg = _audit_config(args)
    oracle = args.oracle
    if oracle is None and args.base and "oracle" in cfg.probes:
        from ..data.mllmu import read_mllmu
        from ..evaluate.audit.oracle import oracle_model
        from ..train.loop import TrainConfig

        known = TrainConfig.__dataclass_fields__
        saved = json.loads((Path(args.vanilla) / "finetune_config.json").read_text())
        train_cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
        oracle = oracle_model(
            args.base,
            read_mllmu(args.data, forget=args.forget),
            train_cfg,
            cache,
            lora_rank=int(saved.get("lora_rank", 0)),
        )
        print(f"oracle: {oracle}")
    report = run_audit(args.vanilla, _runs(args.runs), args.data, args.out, cfg, oracle=oracle)
    print((Path(args.out) / "report.md").read_text())
    print("timings: " + json.dumps(report["timings"]))
    return 0
