"""Tables of ``dev_sweep.py`` rows over draws: the command behind docs/method.md's and the README's three-draw figures.

Usage::

    python scripts/sweep_table.py held_s3.jsonl held_s4.jsonl held_s5.jsonl
    python scripts/sweep_table.py dev.jsonl held.jsonl --versus 3,4,5,6,7,8    # Welch's t: those worlds vs the rest

Rows are grouped by their settings (method options, driver options and probes: the row's key without the world,
its cache folder and the unlearning seed), so a setting's draws (``seed_offset`` 0, 1, 2) form one group
whatever their variant names, and rows of the same setting from several caches and files pool. Per group and
column: the mean of the draws per world, then the mean over the worlds ± the 95 % Student-t half-width over
them, each world's mean in brackets, and the draws per world. ``--versus SEEDS`` adds Welch's t-test (two-sided
p) between those worlds' means and the other worlds' of the group; ``--spread`` the standard deviation between the
draws of one world, pooled over the worlds (how far one draw of a setting on one world is from its world's mean).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

from scipy.stats import ttest_ind

from mllm_unlearn.experiments.audit import mean_ci

COLUMNS = (
    "forget_vqa",
    "unseen_forget_vqa",
    "still_recognised",
    "real_vqa",
    "relearn_recovery",
    "relearn_unseen_recovery",
    "relearn_recovery_one_way",
    "benign_forget_after",
    "int4_retain_ratio",
    "misid_unseen",
    "summary",
)


def setting_of(key: str) -> str:
    """The row's settings: its key without the world, the world's NCU cache folder and the unlearning seed (world
    seed + ``seed_offset``)."""
    k = json.loads(key)
    k.pop("seed")
    k["unlearn"] = {n: v for n, v in k["unlearn"].items() if n not in ("seed", "cache_dir")}
    return json.dumps(k, sort_keys=True)


def draws_by_world(rows: list[dict], column: str) -> dict[int, list[float]]:
    """world -> the column's value in each of its draws; NaN draws dropped."""
    by_world = defaultdict(list)
    for r in rows:
        v = r["headline"].get(column, math.nan)
        if not math.isnan(v):
            by_world[r["seed"]].append(v)
    return dict(sorted(by_world.items()))


def per_world(rows: list[dict], column: str) -> dict[int, tuple[float, int]]:
    """world -> (mean over its draws, number of draws); NaN draws dropped."""
    return {w: (sum(v) / len(v), len(v)) for w, v in draws_by_world(rows, column).items()}


def draw_spread(rows: list[dict], column: str) -> float:
    """The standard deviation between draws of one world, pooled over the worlds with two or more draws (root mean
    of their sample variances); NaN when none has two."""
    variances = []
    for v in draws_by_world(rows, column).values():
        if len(v) > 1:
            m = sum(v) / len(v)
            variances.append(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return math.sqrt(sum(variances) / len(variances)) if variances else math.nan


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="dev_sweep.py --out files (JSON lines)")
    p.add_argument("--columns", default=",".join(COLUMNS))
    p.add_argument("--versus", default="", help="worlds compared with the others by Welch's t, e.g. 3,4,5")
    p.add_argument("--spread", action="store_true", help="also the standard deviation between draws within a world")
    args = p.parse_args(argv)
    groups: dict[str, list[dict]] = defaultdict(list)
    for f in args.files:
        with open(f) as fh:
            for line in fh:
                row = json.loads(line)
                groups[setting_of(row["key"])].append(row)
    versus = {int(s) for s in args.versus.split(",") if s}
    for rows in groups.values():
        names = ", ".join(dict.fromkeys(r["variant"] for r in rows))
        print(f"== {names}")
        for col in args.columns.split(","):
            worlds = per_world(rows, col)
            if not worlds:
                continue
            m = mean_ci([v for v, _ in worlds.values()])
            each = ", ".join(f"{w}: {v:.3f}" for w, (v, _) in worlds.items())
            draws = sorted({n for _, n in worlds.values()})
            spread = "" if math.isnan(m["ci95"]) else f" ± {m['ci95']:.3f}"  # one world: no interval
            line = f"  {col:20s} {m['mean']:.3f}{spread} ({each}) draws {draws}"
            if args.spread:
                line += f"; SD between draws {draw_spread(rows, col):.3f}"
            a = [v for w, (v, _) in worlds.items() if w in versus]
            b = [v for w, (v, _) in worlds.items() if w not in versus]
            if len(a) > 1 and len(b) > 1:
                line += f"; worlds {sorted(versus)} {sum(a) / len(a):.3f} vs the others {sum(b) / len(b):.3f}, "
                line += f"Welch p = {ttest_ind(a, b, equal_var=False).pvalue:.2f}"
            print(line)


if __name__ == "__main__":
    main()
