"""``mllm-unlearn``: the command-line tool. Each sub-command is a thin wrapper over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..runtime.options import DTYPE_NAMES

# The tiny models run faster on one thread than two on these CPUs; users can override.
_THREADS_ENV = "MLLM_UNLEARN_THREADS"


def _setup(args: argparse.Namespace) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(int(args.threads or os.environ.get(_THREADS_ENV, 1)))
    hf_logging.set_verbosity_error()  # e.g. the torchvision fallback notice of CLIP's image processor


def _say(*args) -> None:
    """The CLI's own messages: once, from the main process, under ``accelerate launch``."""
    from ..runtime.distributed import main_print

    main_print(*args, flush=True)


def _read(args: argparse.Namespace):
    from ..data.readers import read_benchmark

    return read_benchmark(args.benchmark, args.data, forget=args.forget)


def _prepare(args: argparse.Namespace, *, train: bool, eval_cfg=None, outs: tuple = ()):
    """Every check that needs no model, done before any work: the output paths can be written, the
    --model folder is a supported checkpoint, the data reads, and every image the command will
    decode (training pairs when ``train``, the splits of ``eval_cfg``) decodes. Returns the data."""
    from ..data.sample import check_images
    from ..models.loading import check_model_source
    from ..runtime.outputs import check_writable

    for path in outs:
        if path is not None:
            check_writable(path)
    check_model_source(args.model)
    data = _read(args)
    check_images(data, train=train, splits=eval_cfg.splits if eval_cfg is not None else ())
    return data


def _eval_config(args: argparse.Namespace):
    """The one EvalConfig of every command: --mcq-mode, evaluate's --batch-size and --max-new-tokens
    (the harness's defaults elsewhere), and the protocol of --benchmark (UMU-Bench's own for umu)."""
    from ..evaluate.harness import EvalConfig

    return EvalConfig(
        mcq_mode=args.mcq_mode,
        batch_size=getattr(args, "eval_batch_size", EvalConfig.batch_size),
        max_new_tokens=getattr(args, "max_new_tokens", EvalConfig.max_new_tokens),
        protocol="umu" if args.benchmark == "umu" else "mllmu",
    )


def _load(args: argparse.Namespace):
    """The --model checkpoint on --device in --dtype (LoRA adapters stay float32 on a bf16 base)."""
    from ..models import loading

    return loading.load_model(
        args.model,
        device=args.device,
        dtype=loading.torch_dtype(args.dtype),
        trust_remote_code=args.trust_remote_code,
        image_size=args.image_size,
    )


def cmd_make_world(args):
    from ..data.world import WorldConfig, make_world
    from ..runtime.outputs import check_writable

    check_writable(args.out)
    out = make_world(args.out, WorldConfig(n_people=args.people, n_real=args.real, seed=args.seed))
    _say(f"wrote synthetic world to {out}")


def cmd_make_tiny_model(args):
    from ..data.mllmu import read_mllmu
    from ..models.tiny import corpus_for, make_tiny_model
    from ..runtime.outputs import check_writable

    check_writable(args.out)
    corpus = corpus_for(read_mllmu(args.world), args.arch)
    _say(f"wrote tiny {args.arch} model to {make_tiny_model(args.arch, args.out, corpus, seed=args.seed)}")


def cmd_finetune(args):
    from ..train.finetune import finetune
    from ..train.loop import TrainConfig

    cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup, seed=args.seed)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; give the folder to write (or resume) the model in")
    data = _prepare(args, train=True, outs=(args.out,))
    _say(
        f"{len(data.train)} training pairs; {cfg.steps} steps of {cfg.batch_size} = "
        f"{cfg.steps * cfg.batch_size / len(data.train):.1f} epochs"
    )
    lm = _load(args)
    out = finetune(
        lm,
        data.train,
        cfg,
        args.out,
        lora_rank=args.lora_rank,
        scope=args.scope,
        checkpoint_every=args.checkpoint_every,
    )
    _say(f"wrote fine-tuned model to {out}")


def cmd_evaluate(args):
    from ..evaluate.harness import evaluate, markdown_table
    from ..runtime import distributed

    cfg = _eval_config(args)
    if args.out and Path(args.out).is_dir():
        raise IsADirectoryError(f"--out {args.out} is a folder; give the JSON file to write")
    data = _prepare(args, train=False, eval_cfg=cfg, outs=(args.out, args.predictions))
    predictions = Path(args.predictions) if args.predictions else None
    if predictions is not None:
        predictions.parent.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(_load(args), data, cfg, predictions_file=predictions)
    name = args.name or Path(args.model).name
    _say(markdown_table({name: metrics}))
    if args.out:

        def write() -> None:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({name: metrics}, indent=2, sort_keys=True))

        distributed.on_main(write)


def _unlearn_config(args: argparse.Namespace):
    """The driver's config from the arguments of the same names (the rest keep their defaults)."""
    from ..runtime.options import shared_fields
    from ..train.unlearn import UnlearnConfig

    return UnlearnConfig(**shared_fields(UnlearnConfig, args))


def _unseen_photos(args: argparse.Namespace, data):
    """MLLMU-Bench's ``Test_Set`` photos of the forget people (none of them trained on), for the
    continual run's per-request unseen-photo Forget VQA; every one decoded now, before any training.
    None for the other benchmarks, whose test splits hold no further photos of the same people."""
    from ..evaluate.audit.common import TEST_FOLDER, AuditData, read_unseen

    if args.benchmark != "mllmu" or not (Path(args.data) / TEST_FOLDER).is_dir():
        _say("no Test_Set photos: continual requests are measured on their training photos only")
        return None
    unseen = read_unseen(args.data)
    for person in data.forget_people:
        for photo in unseen.get(person, []):
            photo.load()
    return AuditData(Path(args.data), data, args.forget, {}, unseen)  # the data already read, no names


def _distill_images(args: argparse.Namespace) -> list:
    """``--distill-images``: every image file of the folder, each decoded now (a bad one is refused naming
    its file before any training), as image-only samples."""
    from ..data.request import read_photos
    from ..data.sample import Sample

    if args.distill_images is None:
        return []
    if not args.distill_steps:
        raise ValueError("--distill-images needs --distill-steps (the images are only used by the distillation)")
    photos = read_photos(Path("."), "--distill-images", args.distill_images)
    return [Sample(f"distill/{ph.sha256[:16]}", "", "gen", "vqa", "", "", ph.image) for ph in photos]


def cmd_unlearn(args):
    from ..evaluate.harness import evaluate, markdown_table
    from ..experiments.continual import run_continual
    from ..methods import get_method
    from ..runtime.options import parse_options
    from ..runtime.outputs import refuse_existing
    from ..train.unlearn import run_record, save_run, unlearn

    method_cls = get_method(args.method)
    method_cfg = parse_options(method_cls.config_class, args.opt)
    cfg, eval_cfg = _unlearn_config(args), _eval_config(args)
    continual = args.tasks > 1  # the forget split becomes a sequence of requests; --out is resumable
    distill_images = _distill_images(args)
    if not continual:
        refuse_existing(args.out)
    evaluates = continual or not args.no_eval
    data = _prepare(args, train=True, eval_cfg=eval_cfg if evaluates else None, outs=(args.out, args.cache_dir))
    unseen = _unseen_photos(args, data) if continual else None
    lm = _load(args)
    if continual:
        run_continual(
            lm,
            data,
            args.out,
            cfg,
            method_cfg,
            n_tasks=args.tasks,
            eval_cfg=eval_cfg,
            replay=not args.no_replay,
            unseen=unseen,
        )
        _say(f"wrote {args.out}/matrix.json, heatmap.png, curves.png")
        return
    lm, history = unlearn(lm, data, cfg, method_cfg, distill_images=distill_images)
    metrics = {}
    if evaluates:
        metrics = evaluate(lm, data, eval_cfg)
        _say(markdown_table({args.method: metrics}))
    record = run_record(
        cfg, method_cls(method_cfg), history, lm, model=args.model, data=args.data, forget=args.forget, metrics=metrics
    )
    # a method that edits base weights (MANU) is carried only by the merged model
    _say(f"wrote {save_run(lm, args.out, record, merge=args.merge or not method_cls.trains)}")


def cmd_ablations(args):
    from ..experiments.ablations import run_ablations
    from ..runtime.outputs import refuse_existing

    args.method = "cvf_ncu"
    cfg, eval_cfg = _unlearn_config(args), _eval_config(args)
    refuse_existing(args.out)
    data = _prepare(args, train=True, eval_cfg=eval_cfg, outs=(args.out, args.cache_dir))
    run_ablations(lambda: _load(args), data, args.out, cfg, eval_cfg)


def cmd_demo(args):
    from ..experiments.demo import DemoConfig, run_demo
    from ..runtime.outputs import check_writable

    check_writable(args.out)
    cfg = DemoConfig(seed=args.seed, forget=args.forget)
    if args.no_audit:
        cfg.audit = None
    cfg.parallel_oracle = not args.oracle_in_process
    if args.methods == "all":
        from ..methods import report_order

        cfg.methods = ("vanilla", *report_order())
    elif args.methods:
        cfg.methods = tuple(m.strip() for m in args.methods.split(","))
    run_demo(args.out, cfg)


# ---------------------------------------------------------------- the parser: shared groups, one part per command

_MCQ_MODES = ["generate", "likelihood", "both"]
_SCOPES = ["llm", "visual", "projector", "all"]


def _data_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--data", required=True, help="benchmark folder (its parquet split folders)")
    sp.add_argument(
        "--benchmark",
        default="mllmu",
        choices=["mllmu", "clear", "umu"],
        help="layout of --data: MLLMU-Bench (and the synthetic world), CLEAR or UMU-Bench",
    )
    sp.add_argument("--forget", default=None, help="forget split folder (default: forget_10; CLEAR: forget05)")


def _model_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--model", required=True, help="local path or hub id")
    sp.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own code")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    sp.add_argument(
        "--dtype", default="fp32", choices=sorted(DTYPE_NAMES), help="weights' dtype (bf16 for 7B models on a GPU)"
    )
    sp.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="Qwen2-VL/2.5-VL: resize images to this square (e.g. 448) so that every image "
        "gives the same number of visual tokens, as CVF-NCU needs",
    )


def _unlearn_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--scope",
        default=None,
        choices=_SCOPES,
        help="update scope (default: the method's: visual for cvf_ncu, llm for baselines)",
    )
    sp.add_argument(
        "--subspace",
        default=None,
        choices=["null", "random", "none"],
        help="LoRA A: null-space basis (NCU), random orthonormal, or trained (plain LoRA)",
    )
    sp.add_argument(
        "--rank", type=int, default=None, help="LoRA rank (default: the method's; 32 for cvf_ncu, 8 otherwise)"
    )
    sp.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    sp.add_argument(
        "--calibrate-strangers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NCU's null space from the retain set and the stranger photos (faces the model does not know); "
        "default: the method's (on for cvf_ncu)",
    )
    sp.add_argument("--steps", type=int, default=200)
    sp.add_argument("--lr", type=float, default=None, help="default: the method's")
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--ivr-level", default="projector")
    sp.add_argument(
        "--cache-dir",
        default=None,
        help="NCU covariance cache (default: $MLLM_UNLEARN_CACHE, else $XDG_CACHE_HOME/mllm-unlearn/ncu, "
        "else ~/.cache/mllm-unlearn/ncu)",
    )
    sp.add_argument("--mcq-mode", default="likelihood", choices=_MCQ_MODES)
    sp.add_argument("--seed", type=int, default=0)


def _model_command(sub, name: str, summary: str) -> argparse.ArgumentParser:
    """A sub-command that reads ``--data`` and loads ``--model``."""
    sp = sub.add_parser(name, help=summary)
    _data_args(sp)
    _model_args(sp)
    return sp


def _add_make_world(sub) -> None:
    sp = sub.add_parser("make-world", help="write the synthetic world in MLLMU-Bench's layout")
    sp.add_argument("--out", required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--people", type=int, default=50, help="fictitious people")
    sp.add_argument("--real", type=int, default=20, help="separate real-world people (general utility)")
    sp.set_defaults(fn=cmd_make_world)


def _add_make_tiny_model(sub) -> None:
    sp = sub.add_parser("make-tiny-model", help="build a tiny random model whose tokenizer fits a world")
    sp.add_argument("--arch", default="llava")
    sp.add_argument("--world", required=True, help="a world written by make-world (for the tokenizer)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_make_tiny_model)


def _add_finetune(sub) -> None:
    sp = _model_command(sub, "finetune", "memorisation fine-tune: base model -> vanilla model")
    sp.add_argument("--out", required=True)
    sp.add_argument("--steps", type=int, default=1500)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--warmup", type=int, default=50)
    sp.add_argument("--lora-rank", type=int, default=0, help="0 = train all weights in scope (tiny models)")
    sp.add_argument("--scope", default="all", choices=_SCOPES)
    sp.add_argument("--checkpoint-every", type=int, default=500)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_finetune)


def _add_evaluate(sub) -> None:
    sp = _model_command(sub, "evaluate", "Forget / Retain / Real-world x VQA / QA")
    sp.add_argument("--mcq-mode", default="generate", choices=_MCQ_MODES)
    sp.add_argument("--batch-size", dest="eval_batch_size", metavar="BATCH_SIZE", type=int, default=32)
    sp.add_argument("--max-new-tokens", type=int, default=50)
    sp.add_argument("--name", default=None, help="row name in the table (default: the model folder)")
    sp.add_argument("--out", default=None, help="write {name: metrics} JSON here")
    sp.add_argument(
        "--predictions", default=None, metavar="FILE", help="write every item's reply and score here (JSON lines)"
    )
    sp.set_defaults(fn=cmd_evaluate)


def _add_unlearn(sub) -> None:
    sp = _model_command(sub, "unlearn", "forget the --forget people's visual identity")
    sp.add_argument("--method", default="cvf_ncu")
    sp.add_argument(
        "--out", required=True, help="run folder: adapter/ (PEFT), run.json, merged/ with --merge or --distill-steps"
    )
    _unlearn_args(sp)
    sp.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. --opt alpha=1 --opt push=nmse (repeatable)",
    )
    sp.add_argument(
        "--tasks",
        type=int,
        default=1,
        help="continual unlearning: split the forget set into this many sequential requests",
    )
    sp.add_argument(
        "--no-replay",
        action="store_true",
        help="continual: stage t trains on task t only (the paper's protocol) instead of tasks 1..t",
    )
    sp.add_argument(
        "--recalibrate",
        action="store_true",
        help="continual with --no-replay: before each request, fold the last stage in and calibrate a new null "
        "space on the retain set and the earlier requests' photos (docs/method.md, twelfth pass). Default: off",
    )
    sp.add_argument("--no-eval", action="store_true")
    sp.add_argument("--merge", action="store_true", help="also write the merged model")
    sp.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="after unlearning, noise-and-distil the visual module for this many steps (UNDO; e.g. 3000 with "
        "--distill-images; the run is then written as merged/ only; docs/method.md, eighth pass). Default 0: off",
    )
    sp.add_argument("--distill-noise", type=float, default=0.6, help="shrink-and-perturb share a, in [0, 1]")
    sp.add_argument("--distill-lr", type=float, default=3e-3)
    sp.add_argument("--distill-views", type=int, default=2, help="augmented copies per distillation image")
    sp.add_argument(
        "--distill-images",
        default=None,
        metavar="DIR",
        help="a folder of more images to distil on (e.g. a generic face corpus), besides the request's photos",
    )
    sp.set_defaults(fn=cmd_unlearn)


def _add_ablations(sub) -> None:
    sp = _model_command(sub, "ablations", "paper Table 2: every CVF / NCU component switched off, one row each")
    sp.add_argument("--out", required=True)
    _unlearn_args(sp)
    sp.set_defaults(fn=cmd_ablations)


def _add_demo(sub) -> None:
    sp = sub.add_parser("demo", help="the whole pipeline on the built-in synthetic world")
    sp.add_argument("--out", required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--forget",
        default="forget_15",
        help="forget split (default forget_15: 8 of 50 people, 40 image MCQs; forget_10's 25 "
        "items measure accuracy only to about +-0.09)",
    )
    sp.add_argument(
        "--methods",
        default=None,
        help="comma-separated rows, 'all' for every registered method (default: vanilla,cvf_ncu)",
    )
    sp.add_argument("--no-audit", action="store_true", help="skip the audit of the unlearned runs (and the oracle)")
    sp.add_argument(
        "--oracle-in-process",
        action="store_true",
        help="train the audit's oracle in this process after the vanilla model, not in a second process beside "
        "it (same bytes; slower on 2 cores, one process's memory)",
    )
    sp.set_defaults(fn=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    from .audit import add_parser as add_audit_parser
    from .forget import add_parser as add_forget_parser
    from .paper import add_parser as add_paper_parser

    p = argparse.ArgumentParser(prog="mllm-unlearn", description=__doc__)
    p.add_argument("--threads", type=int, default=None, help=f"torch threads (default: ${_THREADS_ENV} or 1)")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _add_make_world,
        _add_make_tiny_model,
        _add_finetune,
        _add_evaluate,
        _add_unlearn,
        _add_ablations,
        _add_demo,
        add_forget_parser,
        add_audit_parser,
        add_paper_parser,
    ):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input (data, paths, options, checkpoints) ends in one message and exit 2."""
    from ..runtime.distributed import leave, main_print

    args = build_parser().parse_args(argv)
    _setup(args)
    code = 0
    try:
        args.fn(args)
    except (OSError, ValueError, FloatingPointError) as exc:  # DataError is a ValueError
        main_print(f"mllm-unlearn {args.command}: error: {exc}", file=sys.stderr)
        code = 2
    leave(code)  # a launched process ends here (see leave); a plain one returns
    return code


if __name__ == "__main__":
    sys.exit(main())
