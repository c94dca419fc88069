"""Which forget people does unlearning leave recognisable, and how do they differ? (docs/method.md, fifth pass)

Usage::

    python scripts/per_person.py --cache CACHE --seeds 0,1,2 [--seed-offset K] [--opt KEY=VALUE ...]

``CACHE`` is an ``mllm-unlearn audit --seeds`` cache (``seed<N>/world`` and ``seed<N>/vanilla``). Per world the
cached vanilla model is unlearned with cvf_ncu (the audit's default ``UnlearnConfig``, seed = the world's plus
``--seed-offset``: another draw of batches and copies, as ``dev_sweep.py``'s ``seed_offset``; ``--opt`` method
options), and per forget person it prints:

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
  blank without one): whether a model that never saw them can answer about them from their looks alone.

At the end, over every forget person of the worlds asked: the mean ``twin`` of the people still recognised on
their unseen photos and of the rest, and the rank correlation of ``twin`` with ``unseen``.

After the people, per world (fifteenth pass): the mean pairwise cosine between the forget people's mean shifts of
pooled IVRs (unlearned minus reference, over their training photos; what ``decorrelate`` lowers), the same between
their identity prototypes, and the mean length of a shift over that of the person's mean pooled reference IVR.
"""

from __future__ import annotations

import argparse
import glob
import itertools

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from mllm_unlearn.evaluate.audit import load_audit_data
from mllm_unlearn.evaluate.audit.common import score_mcqs
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


def null_energy(lm, plain, images) -> float:
    """Share of the images' layer-input energy inside A, averaged over the adapted layers."""
    A = lora_A_weights(lm.model)
    inputs = [encode_images(plain, images).inputs]
    cov = collect_covariances(
        plain.model, list(A), inputs, forward=lambda m, x: plain.arch.image_features(m, x), progress=False
    )
    return sum(retain_energy(A[n], cov[n].cov) for n in A) / len(A)


def world(cache: str, seed: int, opts: list[str], offset: int = 0) -> list[dict]:
    root = f"{cache}/seed{seed}"
    audit = load_audit_data(f"{root}/world", "forget_15")
    data = audit.bench
    people = audit.forget_people
    plain = load_model(f"{root}/vanilla")
    forget, retain = split_people(data)
    method_cfg = parse_options(get_method("cvf_ncu").config_class, opts)
    oracles = glob.glob(f"{root}/oracle-*")
    oracle = score_mcqs(load_model(oracles[0]), audit.unseen_mcqs(people)) if len(oracles) == 1 else None
    lm, _ = unlearn(load_model(f"{root}/vanilla"), data, UnlearnConfig(seed=seed + offset), method_cfg)
    unseen = score_mcqs(lm, audit.unseen_mcqs(people))
    train = score_mcqs(lm, audit.image_mcqs("forget", people))
    ctx = UnlearnContext(lm, forget, retain, batch_size=8, seed=0)
    retain_images = distinct_images(retain)
    with torch.no_grad():
        ref = ctx.visual_tokens(retain_images, reference=True)
    center = ref.reshape(-1, ref.shape[-1]).mean(0)
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
                "oracle": oracle.accuracy([p]) if oracle else float("nan"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--opt", action="append", default=[], help="a cvf_ncu option KEY=VALUE")
    parser.add_argument("--seed-offset", type=int, default=0, help="unlearning seed = the world's + this (a draw)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| world | person | unseen ↓ | train ↓ | cos_ref | signature | proto_train | proto_unseen | null_energy "
        "| twin | oracle |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    shapes, people = [], []
    for seed in map(int, args.seeds.split(",")):
        for r in world(args.cache, seed, args.opt, args.seed_offset):
            if r["person"] == "shifts":
                shapes.append(r)
                continue
            if r["person"] == "retain":
                print(f"| {seed} | retain set | | | | | | | {r['null_energy']:.4f} | | |")
                continue
            people.append(r)
            mark = "*" if r["unseen"] > RECOGNISED else ""
            print(
                f"| {seed} | {r['person']} | {r['unseen']:.2f}{mark} | {r['train']:.2f} | {r['cos_ref']:.2f} | "
                f"{r['signature']:.2f} | {r['proto_train']:.2f} | {r['proto_unseen']:.2f} | {r['null_energy']:.4f} | "
                f"{r['twin']:.2f} | {r['oracle']:.2f} |"
            )
    print("\n| world | people's shifts: pairwise cosine | prototypes: pairwise cosine | shift / reference IVR length |")
    print("|---|---|---|---|")
    for r in shapes:
        print(f"| {r['seed']} | {r['shift_cos']:.2f} | {r['proto_cos']:.2f} | {r['shift_length']:.1f} |")
    recognised = [r["twin"] for r in people if r["unseen"] > RECOGNISED]
    rest = [r["twin"] for r in people if r["unseen"] <= RECOGNISED]
    rho = spearmanr([r["twin"] for r in people], [r["unseen"] for r in people]).statistic
    print(
        f"\ntwin: {sum(recognised) / max(len(recognised), 1):.3f} for the {len(recognised)} people still recognised, "
        f"{sum(rest) / max(len(rest), 1):.3f} for the other {len(rest)}; Spearman rho(twin, unseen) = {rho:.2f}"
    )
    judged = [r for r in people if r["oracle"] == r["oracle"]]  # the worlds with a cached oracle
    if judged:
        hard = [r["oracle"] for r in judged if r["unseen"] > RECOGNISED]
        easy = [r["oracle"] for r in judged if r["unseen"] <= RECOGNISED]
        rho = spearmanr([r["oracle"] for r in judged], [r["unseen"] for r in judged]).statistic
        print(
            f"oracle: {sum(hard) / max(len(hard), 1):.3f} for the people still recognised, "
            f"{sum(easy) / max(len(easy), 1):.3f} for the others; Spearman rho(oracle, unseen) = {rho:.2f}"
        )


if __name__ == "__main__":
    main()
