"""Which continual requests miss the goal, against the people a static run leaves recognisable (docs/method.md,
"Still recognised: the person more than the draw" and the twenty-second pass's held-out report).

Usage::

    python scripts/per_person.py --cache C --seeds 3,4,5 --draws 3 > pp.md
    python scripts/continual_misses.py --per-person pp.md --world 3 c_3_s0_replay c_3_s0_paper ... \
        [--world 4 c_4_s0_replay ...] [--draws-hard 2]

Each ``--world N`` is followed by that world's continual run folders (``unlearn --tasks``; their ``matrix.json``).
A person is *hard* when ``per_person.py`` puts them above chance + 0.15 (0.40, the continual goal) on their unseen
photos in at least ``--draws-hard`` of its draws; a request *misses* when its unseen-photo forget VQA after the last
stage is above 0.40. Printed: how many requests miss, how many of those were already above 0.40 right after their
own stage, and the miss rate of requests that hold a hard person against those that do not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GOAL = 0.40  # chance + 0.15: the continual goal and the audit's "still recognised"


def per_person_unseen(path: str | Path) -> dict[tuple[int, str], list[float]]:
    """``{(world, person): [unseen VQA per draw]}`` from ``per_person.py``'s printed tables."""
    out: dict[tuple[int, str], list[float]] = {}
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0].isdigit() and cells[1].isdigit():
            out.setdefault((int(cells[0]), cells[1]), []).append(float(cells[2].rstrip("*")))
    return out


def count(unseen: dict[tuple[int, str], list[float]], runs: dict[int, list[Path]], draws_hard: int) -> dict:
    hard = {k for k, v in unseen.items() if sum(x > GOAL for x in v) >= draws_hard}
    c = {"requests": 0, "misses": 0, "missed_at_own_stage": 0, "hard": [0, 0], "other": [0, 0]}
    for world, folders in runs.items():
        for folder in folders:
            m = json.loads((Path(folder) / "matrix.json").read_text())
            stages = m["stages"]
            for t, people in enumerate(m["tasks"]):
                missed = stages[-1]["unseen_forget_vqa_per_task"][t] > GOAL + 1e-9
                kind = "hard" if any((world, p) in hard for p in people) else "other"
                c["requests"] += 1
                c["misses"] += missed
                c["missed_at_own_stage"] += missed and stages[t]["unseen_forget_vqa_per_task"][t] > GOAL + 1e-9
                c[kind][0] += missed
                c[kind][1] += 1
    c["hard_people"] = sorted(k for k in hard if k[0] in runs)
    return c


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-person", required=True, help="per_person.py's output (Markdown)")
    parser.add_argument("--world", nargs="+", action="append", required=True, help="N RUN_DIR... (repeatable)")
    parser.add_argument("--draws-hard", type=int, default=2, help="draws above 0.40 that make a person hard")
    args = parser.parse_args(argv)
    runs = {int(w[0]): [Path(f) for f in w[1:]] for w in args.world}
    c = count(per_person_unseen(args.per_person), runs, args.draws_hard)
    print(f"{c['misses']} of {c['requests']} requests end above {GOAL}; {c['missed_at_own_stage']} of them were above")
    print(f"it right after their own stage. Hard people ({len(c['hard_people'])}): {c['hard_people']}")
    for kind, (miss, total) in (("with a hard person", c["hard"]), ("without", c["other"])):
        print(f"requests {kind}: {miss} of {total} miss ({100 * miss / max(total, 1):.0f} %)")


if __name__ == "__main__":
    main()
