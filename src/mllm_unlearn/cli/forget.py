"""``mllm-unlearn forget``: honour deletion requests from people's own photos, with a deletion report.

Wire into the main parser with ``add_parser(subparsers)``; the sub-command calls :func:`cmd_forget`.
Every check that needs no model (request, photos, output folder, resumed run, settings) runs before
the model is loaded; nothing is written unless the whole run succeeds.
"""

from __future__ import annotations

import argparse

from ..runtime.options import DTYPE_NAMES


def add_parser(subparsers) -> argparse.ArgumentParser:
    sp = subparsers.add_parser(
        "forget",
        help="forget people from their photos (a deletion request) and write a deletion report",
        description="Forget what the people of a request look like (CVF-NCU, label-free), verify it on held-out "
        "photos, and write RUN/adapter, run.json, report.md/json/png. Settings left out take the "
        "defaults, or with --resume the recorded run's values.",
    )
    sp.add_argument(
        "--request",
        action="append",
        required=True,
        metavar="REQUEST",
        help="request file (YAML, or CSV with role,name,path); repeatable",
    )
    sp.add_argument("--out", required=True, help="new run folder (must not exist)")
    sp.add_argument("--model", default=None, help="hub id or local folder (with --resume: the recorded one)")
    sp.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue continual unlearning from RUN: its adapter (A frozen, B carries on), "
        "replaying its requests together with the new ones",
    )
    sp.add_argument(
        "--verify",
        default=None,
        metavar="DIR",
        help="held-out photos: DIR/<person name>/ (instead of holding out a share of their photos)",
    )
    sp.add_argument(
        "--known-names",
        default=None,
        metavar="FILE",
        help="more names the model knows (one per line): a reply naming one is a misidentification",
    )
    sp.add_argument("--holdout", type=float, default=None, help="share of each person's photos held out (0.34)")
    sp.add_argument("--steps", type=int, default=None, help="training steps (200)")
    sp.add_argument("--lr", type=float, default=None, help="learning rate of B (cvf_ncu's default, 3e-2)")
    sp.add_argument("--rank", type=int, default=None, help="null-space LoRA rank (default: cvf_ncu's, 32)")
    sp.add_argument("--lora-alpha", type=float, default=None)
    sp.add_argument("--batch-size", type=int, default=None, help="forget images per step (8)")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument(
        "--calibrate-strangers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NCU's null space from the retain photos and the request's strangers (default: on)",
    )
    sp.add_argument(
        "--opt",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="cvf_ncu option, e.g. --opt alpha=5 (repeatable)",
    )
    dtypes = sorted(DTYPE_NAMES)
    sp.add_argument("--dtype", default=None, choices=dtypes, help="weights' dtype (bf16 for 7B models on a GPU)")
    sp.add_argument("--image-size", type=int, default=None, help="Qwen2-VL/2.5-VL: square image size, e.g. 448")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.add_argument("--merge", action="store_true", help="also write the merged model (safetensors) to RUN/merged")
    sp.add_argument(
        "--checks",
        default="quant,finetune",
        help="robustness checks on a merged copy: quant, finetune, both (default) or none",
    )
    sp.add_argument("--benign-steps", type=int, default=20, help="steps of the benign fine-tune check")
    sp.add_argument("--max-new-tokens", type=int, default=24, help="reply length in the report")
    sp.add_argument(
        "--cache-dir", default=None, help="NCU covariance cache (default: the user cache folder, as for unlearn)"
    )
    sp.set_defaults(fn=cmd_forget)
    return sp


def settings_from_args(args: argparse.Namespace) -> dict:
    """The ForgetSettings the user gave (None = not given)."""
    from ..experiments.forget import ForgetSettings
    from ..runtime.options import shared_fields

    return {**shared_fields(ForgetSettings, args), "method_options": tuple(args.opt) if args.opt else None}


def cmd_forget(args: argparse.Namespace) -> dict:
    from ..experiments.forget import ReportOptions, run_forget
    from ..runtime.options import shared_fields

    checks = () if args.checks.strip() in ("", "none") else tuple(c.strip() for c in args.checks.split(","))
    opts = ReportOptions(**{**shared_fields(ReportOptions, args), "checks": checks, "known_names": ()})
    report = run_forget(
        args.request,
        args.out,
        settings_from_args(args),
        opts,
        resume=args.resume,
        verify_dir=args.verify,
        known_names_file=args.known_names,
        trust_remote_code=args.trust_remote_code,
    )
    s = report["summary"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    print(
        f"forgotten people named on held-out photos: {fmt(s['forget_named_before'])} -> "
        f"{fmt(s['forget_named_after'])} (misidentified after: {fmt(s['forget_misidentified_after'])}); "
        f"retain named: {fmt(s['retain_name_recall_before'])} -> {fmt(s['retain_name_recall_after'])}; "
        f"retain reply agreement {fmt(s['retain_reply_agreement'])}; text logits identical: "
        f"{s['text_logits_identical']}"
    )
    print(f"wrote {args.out}/adapter, run.json, report.md, report.json, report.png")
    return report
