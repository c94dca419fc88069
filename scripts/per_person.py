"""Which forget people does unlearning leave recognisable, and how do they differ? (docs/method.md, fifth pass)

Usage::

    python scripts/per_person.py --cache CACHE --seeds 0,1,2 [--cache CACHE2 --seeds 3,4 ...] [--draws N]
                                 [--opt KEY=VALUE ...]

``CACHE`` is an ``mllm-unlearn audit --seeds`` cache (``seed<N>/world`` and ``seed<N>/vanilla``); several caches
each take their own ``--seeds``. Per world the cached vanilla model is unlearned with cvf_ncu (the audit's
default ``UnlearnConfig``, ``--opt`` method options) ``--draws`` times, draw k with seed = the world's plus k
(other batches and copies, as ``dev_sweep.py``'s ``seed_offset``), and per draw and forget person it prints:

* ``unseen``: forget VQA on their unseen ``Test_Set`` photos after unlearning (the audit's probe 1 per person;
  ``*`` marks the people above chance + 0.15, the audit's ``still_recognised``), and ``train``: the same on the
  photos unlearning trained on;
* ``cos_ref``: mean cosine, over their training photos' visual tokens, between the unlearned and the reference
  model's tokens, both centred on the retain set's mean token (how far the push moved them; 1 = not at all);
* ``signature``: mean cosine between each of their unseen photos' pooled vanilla IVR and the mean pooled IVR of
  their training photos, both centred on the known people's mean (how consistent and distinctive their face is
  across photos; about 0 for a face close to the average);
* ``proto_train`` / ``proto_unseen``: mean cosine between the unlearned model's pooled IVRs of their training /
  unseen photos and their identity prototype (the mean pooled reference IVR of their training photos), both
  centred on the retain set's mean token: how much of the person's shared direction unlearning left (sixth pass;
  ``identity_push`` holds the training photos' at most ``identity_margin``);
* ``null_energy``: the share of their layer-input energy, averaged over the adapted layers, that NCU's frozen A
  lets through (:func:`mllm_unlearn.nullspace.retain_energy` on their covariance), with the retain set's for
  comparison;
* ``twin``: the highest cosine between their mean pooled reference IVR and a retain person's, both centred on
  the known people's mean (how close their face is to someone unlearning must keep recognised; docs/method.md,
  "Who stays recognisable");
* ``oracle``: forget VQA on their unseen photos by the audit's retrained oracle (cached as ``seed<N>/oracle-*``;
  nan without one): whether a model that never saw them can answer about them from their looks alone;
* ``push0``: Eq. 4's mean per-token value on their training photos when unlearning starts (B = 0, so each token
  is its own reference), with the queue's K retain tokens stood for by all of the retain set's (log-sum-exp
  less log(N / K)): how much push their tokens start with when some retain tokens already look like them;
* ``margin``: the vanilla model's MCQ margin on their training photos (the correct option's summed log-probability
  minus the best wrong one's, mean over their questions): how firmly it knew them.

At the end, over every forget person of the worlds asked, with ``unseen`` averaged over the draws: for each
measure that does not depend on the draw (``twin``, ``oracle``, ``push0``, ``null_energy``, ``signature``,
``margin``) its mean over the people still recognised (mean ``unseen`` above chance + 0.15) and over the rest,
and its Spearman rank correlation with ``unseen``, over all people and within a world (mean, and in how many
worlds it is negative).
With several draws, also how many draws leave each person recognised and the draws' rank correlation of ``unseen``
(is "still recognised" the person or the draw?).

After the people, per world (fifteenth pass): the mean pairwise cosine between the forget people's mean shifts of
pooled IVRs (unlearned minus reference, over their training photos; what ``decorrelate`` lowers), the same between
their identity prototypes, and the mean length of a shift over that of the person's mean pooled reference IVR.
"""

from __future__ import annotations

import argparse
import functools
import glob
import itertools
import math

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from mllm_unlearn.evaluate.audit import load_audit_data
from mllm_unlearn.evaluate.audit.common import MCQScores, score_mcqs
from mllm_unlearn.evaluate.audit.unseen import RECOGNISED
from mllm_unlearn.methods import get_method
from mllm_unlearn.methods.base import UnlearnContext, distinct_images
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.nullspace import collect_covariances, lora_A_weights, retain_energy
from mllm_unlearn.runtime.options import parse_options
from mllm_unlearn.train.unlearn import UnlearnConfig, encode_images, split_people, unlearn


def pooled(ctx: UnlearnContext, images, reference: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return ctx.visual_tokens(images, reference=reference).mean(1)


def mean_pairwise_cosine(vectors: list[torch.Tensor]) -> float:
    pairs = list(itertools.combinations(vectors, 2))
    return sum(F.cosine_similarity(a, b, dim=0).item() for a, b in pairs) / len(pairs)


def mcq_margin(scores: MCQScores, person: str) -> float:
    """Mean over ``person``'s MCQs of the correct option's summed log-probability minus the best wrong one's."""
    gaps = []
    for sample, logp in zip(scores.samples, scores.logp):
        if sample.person == person:
            right = sorted(sample.options).index(sample.correct)
            gaps.append(logp[right] - max(v for i, v in enumerate(logp) if i != right))
    return sum(gaps) / len(gaps)


def null_energy(lm, plain, images) -> float:
    """Share of the images' layer-input energy inside A, averaged over the adapted layers."""
    A = lora_A_weights(lm.model)
    inputs = [encode_images(plain, images).inputs]
    cov = collect_covariances(
        plain.model, list(A), inputs, forward=lambda m, x: plain.arch.image_features(m, x), progress=False
    )
    return sum(retain_energy(A[n], cov[n].cov) for n in A) / len(A)


@functools.cache
def before_unlearning(root: str) -> tuple[dict[str, float], dict[str, float]]:
    """Per forget person of the world at ``root``, what no draw changes (scored once, however many draws):
    the vanilla model's MCQ margin on their training photos, and the retrained oracle's unseen-photo forget
    VQA (empty without a cached oracle)."""
    audit = load_audit_data(f"{root}/world", "forget_15")
    people = audit.forget_people
    before = score_mcqs(load_model(f"{root}/vanilla"), audit.image_mcqs("forget", people))
    oracles = glob.glob(f"{root}/oracle-*")
    oracle = score_mcqs(load_model(oracles[0]), audit.unseen_mcqs(people)) if len(oracles) == 1 else None
    return {p: mcq_margin(before, p) for p in people}, {p: oracle.accuracy([p]) for p in people} if oracle else {}


def world(cache: str, seed: int, opts: list[str], offset: int = 0) -> list[dict]:
    """Unlearn world ``seed`` of ``cache`` (seed + ``offset``); its rows: the retain set's, one per forget
    person, and the people's shifts."""
    root = f"{cache}/seed{seed}"
    audit = load_audit_data(f"{root}/world", "forget_15")
    data = audit.bench
    people = audit.forget_people
    plain = load_model(f"{root}/vanilla")
    forget, retain = split_people(data)
    method_cfg = parse_options(get_method("cvf_ncu").config_class, opts)
    margins, oracle = before_unlearning(root)
    lm, _ = unlearn(load_model(f"{root}/vanilla"), data, UnlearnConfig(seed=seed + offset), method_cfg)
    unseen = score_mcqs(lm, audit.unseen_mcqs(people))
    train = score_mcqs(lm, audit.image_mcqs("forget", people))
    ctx = UnlearnContext(lm, forget, retain, batch_size=8, seed=0)
    retain_images = distinct_images(retain)
    with torch.no_grad():
        ref = ctx.visual_tokens(retain_images, reference=True)
    center = ref.reshape(-1, ref.shape[-1]).mean(0)
    keys = F.normalize(ref.reshape(-1, ref.shape[-1]) - center, dim=-1)  # every retain token, centred
    queue_offset = math.log(len(keys) / method_cfg.queue_size)
    means = {  # every known person's mean pooled reference IVR over their training photos
        p: pooled(ctx, distinct_images([s for s in data.train if s.person == p]), reference=True).mean(0)
        for p in people + sorted(data.retain_people)
    }
    known_center = torch.stack(list(means.values())).mean(0)
    rows = [{"seed": seed, "person": "retain", "null_energy": null_energy(lm, plain, retain_images[:64])}]
    shifts, protos, lengths = [], [], []
    for p in people:
        images = distinct_images([s for s in data.train if s.person == p])
        with torch.no_grad():
            u, r = ctx.visual_tokens(images), ctx.visual_tokens(images, reference=True)
        unseen_images = distinct_images(audit.unseen_mcqs([p]))
        cos = F.normalize(r.reshape(-1, r.shape[-1]) - center, dim=-1) @ keys.T
        push0 = F.softplus(1 / method_cfg.tau - (torch.logsumexp(cos / method_cfg.tau, -1) - queue_offset)).mean()
        seen = F.normalize(means[p] - known_center, dim=-1)
        twin = max(
            F.cosine_similarity(means[p] - known_center, means[q] - known_center, dim=0).item()
            for q in sorted(data.retain_people)
        )
        others = F.normalize(pooled(ctx, unseen_images, True) - known_center, dim=-1)
        proto = F.normalize(means[p] - center, dim=-1)  # the person's identity prototype (L_ID's)
        shifts.append((u.mean(1) - r.mean(1)).mean(0))
        protos.append(proto)
        lengths.append((shifts[-1].norm() / means[p].norm()).item())
        along = [
            (F.normalize(z - center, dim=-1) @ proto).mean().item() for z in (u.mean(1), pooled(ctx, unseen_images))
        ]
        rows.append(
            {
                "seed": seed,
                "person": p,
                "proto_train": along[0],
                "proto_unseen": along[1],
                "unseen": unseen.accuracy([p]),
                "train": train.accuracy([p]),
                "cos_ref": F.cosine_similarity(u - center, r - center, dim=-1).mean().item(),
                "signature": (others @ seen).mean().item(),
                "null_energy": null_energy(lm, plain, images),
                "twin": twin,
                "oracle": oracle.get(p, float("nan")),
                "push0": push0.item(),
                "margin": margins[p],
            }
        )

    length = sum(lengths) / len(lengths)
    return rows + [
        {
            "seed": seed,
            "person": "shifts",
            "shift_cos": mean_pairwise_cosine(shifts),
            "proto_cos": mean_pairwise_cosine(protos),
            "shift_length": length,
        }
    ]


STATIC = ("twin", "oracle", "push0", "null_energy", "signature", "margin")  # measures that do not depend on the draw


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summary(people: dict[tuple[int, str], list[dict]]) -> None:
    """Over every person (key (world, person), one row per draw): see the module docstring."""
    keys = sorted(people)
    unseen = {k: mean(r["unseen"] for r in people[k]) for k in keys}
    hard = {k for k in keys if unseen[k] > RECOGNISED}
    print(f"\n{len(hard)} of {len(keys)} people still recognised (unseen averaged over the draws)")
    print("\n| measure | still recognised | the others | Spearman rho with unseen | within a world (negative in) |")
    print("|---|---|---|---|---|")
    worlds = sorted({w for w, _ in keys})
    for m in STATIC:
        have = [k for k in keys if people[k][0][m] == people[k][0][m]]  # not nan
        if len(have) < 3:
            continue
        value = {k: people[k][0][m] for k in have}
        rho = spearmanr([value[k] for k in have], [unseen[k] for k in have]).statistic
        within = [
            spearmanr([value[k] for k in have if k[0] == w], [unseen[k] for k in have if k[0] == w]).statistic
            for w in worlds
            if sum(k[0] == w for k in have) > 2
        ]
        within = [x for x in within if x == x]  # a world whose values are all equal has no rank correlation
        print(
            f"| {m} | {mean(value[k] for k in have if k in hard):.4g} "
            f"| {mean(value[k] for k in have if k not in hard):.4g} "
            f"| {rho:+.2f} | {mean(within):+.2f} ({sum(x < 0 for x in within)} of {len(within)}) |"
        )
    draws = len(people[keys[0]])
    if draws > 1:

        def draw_rho(a: int, b: int) -> float:
            return spearmanr([people[k][a]["unseen"] for k in keys], [people[k][b]["unseen"] for k in keys]).statistic

        times = [sum(r["unseen"] > RECOGNISED for r in people[k]) for k in keys]
        print(
            "\nrecognised in n of the draws: "
            + ", ".join(f"{n}: {times.count(n)}" for n in range(draws + 1))
            + "; draws' Spearman rho of unseen: "
            + ", ".join(f"{a}-{b} {draw_rho(a, b):.2f}" for a, b in itertools.combinations(range(draws), 2))
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", action="append", required=True, help="an audit cache (repeatable)")
    parser.add_argument("--seeds", action="append", help="its worlds, e.g. 0,1,2 (one per --cache; default 0,1,2)")
    parser.add_argument("--opt", action="append", default=[], help="a cvf_ncu option KEY=VALUE")
    parser.add_argument("--draws", type=int, default=1, help="unlearning runs per world, seeds the world's + 0, 1, ...")
    args = parser.parse_args()
    seeds = args.seeds or ["0,1,2"]
    if len(seeds) != len(args.cache) or args.draws < 1:
        parser.error("give one --seeds per --cache, and --draws >= 1")
    torch.set_num_threads(1)
    people: dict[tuple[int, str], list[dict]] = {}
    for draw in range(args.draws):
        print(f"\n## draw {draw}\n" if args.draws > 1 else "", end="")
        print(
            "| world | person | unseen ↓ | train ↓ | cos_ref | signature | proto_train | proto_unseen | null_energy "
            "| twin | oracle | push0 | margin |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        shapes = []
        for cache, group in zip(args.cache, seeds):
            for seed in map(int, group.split(",")):
                for r in world(cache, seed, args.opt, draw):
                    if r["person"] == "shifts":
                        shapes.append(r)
                        continue
                    if r["person"] == "retain":
                        print(f"| {seed} | retain set | | | | | | | {r['null_energy']:.4f} | | | | |")
                        continue
                    people.setdefault((seed, r["person"]), []).append(r)
                    mark = "*" if r["unseen"] > RECOGNISED else ""
                    print(
                        f"| {seed} | {r['person']} | {r['unseen']:.2f}{mark} | {r['train']:.2f} | {r['cos_ref']:.2f} | "
                        f"{r['signature']:.2f} | {r['proto_train']:.2f} | {r['proto_unseen']:.2f} | "
                        f"{r['null_energy']:.4f} | {r['twin']:.2f} | {r['oracle']:.2f} | {r['push0']:.3f} | "
                        f"{r['margin']:.2f} |"
                    )
        print("\n| world | people's shifts: pairwise cosine | prototypes: pairwise cosine", end=" ")
        print("| shift / reference IVR length |")
        print("|---|---|---|---|")
        for r in shapes:
            print(f"| {r['seed']} | {r['shift_cos']:.2f} | {r['proto_cos']:.2f} | {r['shift_length']:.1f} |")
    summary(people)


if __name__ == "__main__":
    main()
