"""Measure method variants on the audit's worlds: the command behind docs/method.md's dev tables.

Usage::

    mllm-unlearn audit --seeds 0,1,2 --methods cvf_ncu --cache CACHE --out OUT   # builds the worlds
    python scripts/dev_sweep.py --cache CACHE --seeds 0,1,2 --out sweep.jsonl \\
        --variant default --variant "gum4:gum_batch_size=4" --variant "r16:rank=16"

A variant is ``NAME[:KEY=VALUE,...]``: method options (``--opt`` keys of the method's config) and the
driver's ``rank``, ``steps``, ``lr``, ``batch_size`` (forget photos per step), ``scope`` (the adapters'
update scope), ``calibrate_strangers`` (true|false), ``calibrate_views``, ``calibrate_augment``,
``forget_directions``, ``forget_ratio`` (A's request-dependent rows), ``method`` (default ``cvf_ncu``) and
``seed_offset`` (the unlearning run's seed is the world's seed plus it: another draw of batches, views
and the simulated attack on the same world) and ``distill_steps``, ``distill_noise``, ``distill_lr``,
``distill_views`` (the noise-and-distil stage after unlearning), with ``distill_generic=N``: N random faces
(``data.world.generic_faces``, drawn from the run's seed) join its images, a generic face corpus's stand-in.
Per seed the cached vanilla model is unlearned with the variant (the audit's default ``UnlearnConfig``
otherwise), merged, and audited with the chosen probes against the cached vanilla and oracle (the
audit's own code, so its numbers are the audit's). Rows go to ``--out`` (JSON lines; a (seed, variant,
settings) row already there is not redone), and the table of means over the seeds (± 95 % t-interval) is
printed.
``--attack-seeds 0,1`` repeats the relearning and benign probes with other batch orders and averages
them (their spread between batch orders is ±0.2 on one world). ``--attack-scope llm|visual|projector``
trains only those weights in both attacks (``AttackBudget.scope``; default all). ``--relearn-both-halves`` runs the
relearning probe both ways and pools them (``AuditConfig.relearn_both_halves``: every forget person measured).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

from mllm_unlearn.data.mllmu import read_mllmu
from mllm_unlearn.data.world import generic_faces
from mllm_unlearn.evaluate.audit import AuditConfig, audit_model, load_audit_data, prepare_references
from mllm_unlearn.experiments.audit import mean_ci
from mllm_unlearn.methods import get_method
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.runtime.options import parse_options
from mllm_unlearn.train.unlearn import UnlearnConfig, merged, unlearn

DRIVER_KEYS = {
    "rank": int,
    "steps": int,
    "lr": float,
    "batch_size": int,
    "method": str,
    "scope": str,
    "calibrate_strangers": lambda v: v == "true",
    "calibrate_views": int,
    "calibrate_augment": float,
    "seed_offset": int,
    "distill_steps": int,
    "distill_noise": float,
    "distill_lr": float,
    "distill_views": int,
    "distill_generic": int,
    "forget_directions": int,
    "forget_ratio": float,
}
COLUMNS = (
    "forget_vqa",
    "unseen_forget_vqa",
    "still_recognised",
    "retain_vqa",
    "real_vqa",
    "misid_train",
    "misid_unseen",
    "unknown_train",
    "unknown_unseen",
    "relearn_recovery",
    "benign_forget_after",
    "int4_forget_vqa",
    "int4_retain_ratio",
    "summary",
)


def parse_variant(text: str) -> tuple[str, dict[str, str], dict]:
    name, _, rest = text.partition(":")
    opts, driver = {}, {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {text!r}: {item!r} is not KEY=VALUE")
        if key in DRIVER_KEYS:
            driver[key] = DRIVER_KEYS[key](value)
        else:
            opts[key] = value
    return name, opts, driver


def headline_extra(card: dict) -> dict[str, float]:
    """The identity probe's "don't know" shares, and with both relearning ways the protocol's one way alone."""
    ident = card.get("identity", {})
    out = {}
    for key, col in (("forget_train", "unknown_train"), ("forget_unseen", "unknown_unseen")):
        if key in ident:
            out[col] = ident[key]["unknown_reply"] / max(1, ident[key]["n"])
    for way in card.get("relearn", {}).get("ways", [])[:1]:
        out["relearn_recovery_one_way"] = way["recovery"]
        out["relearn_unseen_recovery_one_way"] = way["unseen_recovery"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="an audit --seeds cache (seed<N>/world, vanilla, oracle)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--out", required=True, help="JSON lines, appended")
    p.add_argument("--probes", default="unseen,identity,relearn,benign,quantization")
    p.add_argument("--quant", default="int4")
    p.add_argument("--attack-seeds", default="0")
    p.add_argument("--attack-scope", default="all", help="weights the relearning / benign attacks train")
    p.add_argument(
        "--relearn-both-halves",
        action="store_true",
        help="relearning probe both ways, pooled (AuditConfig.relearn_both_halves)",
    )
    p.add_argument("--forget", default="forget_15")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    attack_seeds = [int(s) for s in args.attack_seeds.split(",")]
    variants = [parse_variant(v) for v in args.variant]
    probes = tuple(args.probes.split(","))
    out = Path(args.out)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    for seed in seeds:
        root = Path(args.cache) / f"seed{seed}"
        refs = data = audit_data = None
        for name, opts, driver in variants:
            method = driver.get("method", "cvf_ncu")
            method_cls = get_method(method)
            method_cfg = parse_options(method_cls.config_class, [f"{k}={v}" for k, v in opts.items()])
            run_cfg = UnlearnConfig(
                method=method,
                seed=seed + driver.get("seed_offset", 0),
                cache_dir=str(root / "ncu_cache"),
                **{k: v for k, v in driver.items() if k not in ("method", "seed_offset", "distill_generic")},
            )
            key = json.dumps(
                {
                    "seed": seed,
                    # rows from before the distill and forget-direction options (both off) keep their keys
                    "unlearn": {
                        k: v
                        for k, v in asdict(run_cfg).items()
                        if (run_cfg.distill_steps or not k.startswith("distill_"))
                        and (run_cfg.forget_directions or not k.startswith("forget_"))
                    },
                    "method_config": asdict(method_cfg),
                    "probes": probes,
                    "quant": args.quant,
                    "attack_seeds": attack_seeds,
                    **({"distill_generic": driver["distill_generic"]} if "distill_generic" in driver else {}),
                    # rows from before the option (every weight attacked) keep their keys
                    **({"attack_scope": args.attack_scope} if args.attack_scope != "all" else {}),
                    **({"relearn_both_halves": True} if args.relearn_both_halves else {}),
                },
                sort_keys=True,
            )
            if key in done:
                continue
            if refs is None:
                data = read_mllmu(root / "world", forget=args.forget)
                audit_data = load_audit_data(root / "world", args.forget)
                cfg = AuditConfig(forget=args.forget, probes=probes + ("oracle",), quant_specs=(args.quant,))
                oracle = next(o for o in sorted(root.glob("oracle-*")) if o.suffix != ".partial")
                refs = prepare_references(load_model(root / "vanilla"), audit_data, cfg, load_model(oracle))
            t0 = time.perf_counter()
            size = next(s.image for s in data.train if s.image is not None).load().size[0]  # the world's photos'
            generic = generic_faces(driver.get("distill_generic", 0), run_cfg.seed, size)
            lm, history = unlearn(load_model(root / "vanilla"), data, run_cfg, method_cfg, distill_images=generic)
            unlearn_s = time.perf_counter() - t0
            lm = merged(lm)
            cards = []
            for k, attack_seed in enumerate(attack_seeds):
                cfg = AuditConfig(
                    forget=args.forget,
                    probes=probes if k == 0 else tuple(p for p in probes if p in ("relearn", "benign")),
                    quant_specs=(args.quant,),
                    budget=replace(AuditConfig().budget, seed=attack_seed, scope=args.attack_scope),
                    relearn_both_halves=args.relearn_both_halves,
                )
                cards.append(audit_model(lm, audit_data, cfg, refs))
            for c in cards:
                c["headline"].update(headline_extra(c))
            headline = dict(cards[0]["headline"])
            for col in (
                "relearn_recovery",
                "relearn_unseen_recovery",
                "relearn_recovery_one_way",
                "relearn_unseen_recovery_one_way",
                "relearn_after",
                "benign_forget_after",
                "benign_unseen_after",
            ):
                vals = [c["headline"][col] for c in cards if not math.isnan(c["headline"].get(col, math.nan))]
                if vals:
                    headline[col] = sum(vals) / len(vals)
            row = {
                "key": key,
                "seed": seed,
                "variant": name,
                "headline": headline,
                "unlearn_s": round(unlearn_s, 1),
                "final_log": history[-1] if history else {},
            }
            done[key] = row
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"seed {seed} {name}: " + ", ".join(f"{c}={headline.get(c, math.nan):.3f}" for c in COLUMNS))
    rows = [r for r in done.values() if r["seed"] in seeds]
    names = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] in {v[0] for v in variants}))
    print("\n| variant | n | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        cells = []
        for col in COLUMNS:
            m = mean_ci([r["headline"].get(col, math.nan) for r in mine])
            cells.append("–" if math.isnan(m["mean"]) else f"{m['mean']:.3f}")
        print(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
