"""Which weights carry the relearning attack's way back? (docs/method.md, ninth pass)

Usage::

    python scripts/relearn_route.py --cache CACHE --seeds 0,1,2 [--attack-seeds 0,1] [--opt KEY=VALUE ...] \
        [--forget-directions K --forget-ratio RHO]

``CACHE`` is an ``mllm-unlearn audit --seeds`` cache (``seed<N>/world`` and ``seed<N>/vanilla``). Per world the
cached vanilla model is unlearned with cvf_ncu (the audit's default ``UnlearnConfig``, seed = the world's,
``--opt`` method options) and merged; then the audit's relearning attack (probe 3: 60 AdamW steps at 1e-4 on
half A of the forget people's pairs) runs once per attacker below, and the recovery of the other half's forget
VQA is printed (training photos, and unseen photos in brackets), averaged over ``--attack-seeds``:

* ``all``: every weight (the audit's attack);
* ``adapted``: only the weights of the Linear layers the LoRA adapted (what the simulated relearning step of
  ``relearn_sim`` attacks);
* ``visual_rest``: every other vision-tower and projector parameter (patch and position embeddings, layer
  norms, biases);
* ``adapted_null`` / ``adapted_used``: the adapted weights, the change kept after every step inside the span of
  the layer's frozen A (NCU's null space: the input directions the retain photos barely use, where the edit
  is) or outside it (the directions they use).

It also prints, per adapted layer, the share of the ``adapted`` attack's weight change that lies in A's span
(of r of d input directions: r / d if the change had no preferred direction), and the same share for one sign
step on each of ``relearn_sim``'s two attack losses, at the unlearned weights (the shape of its simulated
step): ``sign(grad_W)`` of the answer NLL of 16 of half A's pairs (``relearn_sim_attack=answers``) and of
Eq. 9 between the projector tokens of their photos and the reference model's (``tokens``, the default); the
sizes ||dW|| / ||W|| of the unlearning's edit and of the attack's change, and how specific to the forget
people the directions outside A's span are: the largest and the 8th largest ratio of forget to retain input
energy over directions there (generalised eigenvalues of the forget photos' input covariance against that of
NCU's calibration photos, the retain and stranger photos, on the vanilla model). An edit along a direction of
ratio k reaches the retain photos with 1 / k of the energy it reaches the forget photos with. ``--attackers``
runs a subset of the attackers (``none``: only the per-layer shares).

``--per-person`` prints, for each person of the held-out half, forget VQA on their training and unseen photos
before and after the audit's attack (every weight, mean over ``--attack-seeds``), and how alike they look to the
attacked half in the vanilla model: the largest cosine between their mean pooled projector tokens and an
attacked person's (centred on the mean over the forget and retain people), beside the largest to a retain person.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from mllm_unlearn.data.mllmu import read_mllmu
from mllm_unlearn.evaluate.audit import load_audit_data
from mllm_unlearn.evaluate.audit.common import score_mcqs
from mllm_unlearn.evaluate.audit.relearn import AttackBudget, finetune_copy, halves, relearn_probe
from mllm_unlearn.methods import get_method
from mllm_unlearn.methods.base import distinct_images
from mllm_unlearn.methods.losses import retention_mse
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.models.scoring import answer_nll, eval_mode, image_batches
from mllm_unlearn.nullspace import base_weights, collect_covariances, forget_specific_directions, lora_A_weights
from mllm_unlearn.nullspace.lora import reference_model
from mllm_unlearn.runtime.options import parse_options
from mllm_unlearn.train.finetune import select_trainable
from mllm_unlearn.train.unlearn import UnlearnConfig, merged, split_people, stranger_samples, unlearn

ATTACKERS = ("all", "adapted", "visual_rest", "adapted_null", "adapted_used")


def span_projectors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per adapted layer (keyed by its weight's parameter name): an orthonormal basis (d x r) of A's row space."""
    # zero rows (forget_directions with fewer qualifying directions than asked) span nothing
    return {
        f"{name}.weight": torch.linalg.qr(a[a.norm(dim=1) > 0].T.double())[0].to(a.dtype)
        for name, a in lora_A_weights(model).items()
    }


def span_share(change: torch.Tensor, q: torch.Tensor) -> float:
    """The share of ``change``'s squared norm (out x in) in the input directions spanned by ``q`` (in x r)."""
    change = change.double()
    return ((change @ q.double()).pow(2).sum() / change.pow(2).sum()).item()


def visual_parameters(model: torch.nn.Module, arch) -> set[str]:
    """Names of the vision tower's and projector's parameters (the audit's ``visual`` attack scope)."""
    select_trainable(model, arch, "visual")
    names = {n for n, w in model.named_parameters() if w.requires_grad}
    for w in model.parameters():
        w.requires_grad_(False)
    return names


def attacked_parameters(visual: set[str], adapted: set[str]) -> dict[str, Callable[[str], bool]]:
    """Each attacker's predicate over parameter names."""
    return {
        "all": lambda n: True,
        "adapted": lambda n: n in adapted,
        "visual_rest": lambda n: n in visual and n not in adapted,
        "adapted_null": lambda n: n in adapted,
        "adapted_used": lambda n: n in adapted,
    }


def keep_change(start: dict[str, torch.Tensor], bases: dict[str, torch.Tensor], inside: bool):
    """An ``on_step`` hook: after each update every adapted weight W0 + dW of the attacked copy becomes
    W0 + dW Q Q^T (``inside``: the change kept in A's span) or W0 + dW (I - Q Q^T) (kept out of it)."""

    def project(model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, q in bases.items():
                change = params[name] - start[name]
                kept = (change @ q) @ q.T
                params[name].copy_(start[name] + (kept if inside else change - kept))

    return project


def forget_specificity(lm, data, bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per adapted layer: the generalised eigenvalues (descending) of the forget photos' input covariance against
    the calibration photos' (retain + strangers), over the directions outside A's span."""
    _, retain = split_people(data)
    calibration = distinct_images(retain) + distinct_images(stranger_samples(data, data.forget_people))
    forget = distinct_images([s for s in data.train if s.person in data.forget_people])
    names = [name.removesuffix(".weight") for name in bases]
    forward = lambda m, x: lm.arch.image_features(m, x)
    c_r, c_f = (
        collect_covariances(lm.model, names, image_batches(lm, images), forward=forward, progress=False)
        for images in (calibration, forget)
    )
    return {
        name: forget_specific_directions(c_r[layer].cov, c_f[layer].cov, q.T, layer=layer)[0]
        for name, q, layer in zip(bases, bases.values(), names)
    }


def person_means(lm, samples) -> dict[str, torch.Tensor]:
    """Each person's mean pooled projector tokens over their distinct training photos."""
    by_person: dict[str, list] = {}
    for s in distinct_images(samples):
        by_person.setdefault(s.person, []).append(s)
    with torch.no_grad(), eval_mode(lm.model):
        return {
            person: torch.cat(
                [lm.arch.visual_tokens(lm.model, x, "projector").mean(1) for x in image_batches(lm, photos)]
            ).mean(0)
            for person, photos in by_person.items()
        }


def per_person(lm, reference, data, audit, attack: list[str], seeds: list[int]) -> None:
    """``--per-person``: who of the held-out half comes back after the audit's attack, and how alike they look
    to the attacked half in the vanilla model."""
    held = [p for p in audit.forget_people if p not in set(attack)]
    train = [s for s in audit.bench.train if s.person in set(attack)]
    forget, retain_samples = split_people(data)
    means = person_means(reference, forget + retain_samples)
    centre = torch.stack(list(means.values())).mean(0)
    unit = {p: torch.nn.functional.normalize(m - centre, dim=0) for p, m in means.items()}
    retain = sorted({s.person for s in retain_samples})

    def vqa(model) -> dict[str, tuple[float, float]]:
        return {
            p: (
                score_mcqs(model, audit.image_mcqs("forget", [p])).accuracy(),
                score_mcqs(model, audit.unseen_mcqs([p])).accuracy(),
            )
            for p in held
        }

    before = vqa(lm)
    afters = []
    for s in seeds:
        tuned = finetune_copy(lm, train, AttackBudget(seed=s))
        afters.append(vqa(tuned))
        del tuned
    for p in held:
        after = [sum(a[p][i] for a in afters) / len(afters) for i in (0, 1)]
        near_attack = max(float(unit[p] @ unit[q]) for q in attack)
        near_retain = max(float(unit[p] @ unit[q]) for q in retain)
        print(
            f"  held-out {p}: forget VQA {before[p][0]:.2f} -> {after[0]:.2f} (unseen {before[p][1]:.2f} -> "
            f"{after[1]:.2f}); nearest attacked person cos {near_attack:.2f}, nearest retain person {near_retain:.2f}",
            flush=True,
        )


def sign_steps(lm, pairs) -> dict[str, list[torch.Tensor]]:
    """``sign(grad_W)`` of the adapted layers' base weights W under each of ``relearn_sim``'s attack losses on
    ``pairs``, at the adapted (unlearned, not merged) model's weights."""
    inputs = image_batches(lm, distinct_images(pairs))[0]
    with torch.no_grad(), eval_mode(lm.model), reference_model(lm.model):
        target = lm.arch.visual_tokens(lm.model, inputs, "projector")
    losses = {
        "answers": lambda: answer_nll(lm, pairs),
        "tokens": lambda: retention_mse(lm.arch.visual_tokens(lm.model, inputs, "projector"), target),
    }
    weights = base_weights(lm.model)
    for w in weights:
        w.requires_grad_(True)
    try:
        return {name: [g.sign() for g in torch.autograd.grad(loss(), weights)] for name, loss in losses.items()}
    finally:
        for w in weights:
            w.requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--attack-seeds", default="0,1")
    p.add_argument("--forget", default="forget_15")
    p.add_argument("--opt", action="append", default=[], help="cvf_ncu option KEY=VALUE")
    p.add_argument("--forget-directions", type=int, default=0, help="UnlearnConfig.forget_directions of the run")
    p.add_argument("--forget-ratio", type=float, default=4.0, help="UnlearnConfig.forget_ratio of the run")
    p.add_argument("--attackers", default=",".join(ATTACKERS), help="comma-separated subset, or none")
    p.add_argument("--per-person", action="store_true", help="who of the held-out half comes back, and why")
    args = p.parse_args()
    attackers = [a for a in args.attackers.split(",") if a and a != "none"]
    unknown = set(attackers) - set(ATTACKERS)
    if unknown:
        p.error(f"--attackers: unknown {sorted(unknown)}; choose from {', '.join(ATTACKERS)} or none")
    method_cfg = parse_options(get_method("cvf_ncu").config_class, args.opt)
    attack_seeds = [int(s) for s in args.attack_seeds.split(",")]
    table = {a: [] for a in attackers}
    for seed in (int(s) for s in args.seeds.split(",")):
        root = f"{args.cache}/seed{seed}"
        data = read_mllmu(f"{root}/world", forget=args.forget)
        audit = load_audit_data(f"{root}/world", args.forget)
        cfg = UnlearnConfig(
            method="cvf_ncu",
            seed=seed,
            cache_dir=f"{root}/ncu_cache",
            forget_directions=args.forget_directions,
            forget_ratio=args.forget_ratio,
        )
        lm, _ = unlearn(load_model(f"{root}/vanilla"), data, cfg, method_cfg)
        bases = span_projectors(lm.model)
        attack, _ = halves(audit.forget_people)
        train = [s for s in audit.bench.train if s.person in set(attack)]
        steps = sign_steps(lm, train[:16])
        lm = merged(lm)
        start = {n: w.detach().clone() for n, w in lm.model.named_parameters() if n in bases}
        reference = load_model(f"{root}/vanilla")
        vanilla = dict(reference.model.named_parameters())
        specificity = forget_specificity(reference, data, bases)
        missing = set(bases) - set(start)
        if missing:
            raise RuntimeError(f"adapted layers not found in the merged model: {sorted(missing)[:3]}")
        trainable = attacked_parameters(visual_parameters(lm.model, lm.arch), set(bases))
        if args.per_person:
            per_person(lm, reference, data, audit, attack, attack_seeds)
        for attacker in attackers:
            hook = keep_change(start, bases, attacker == "adapted_null") if attacker.startswith("adapted_") else None
            runs = [
                relearn_probe(lm, audit, AttackBudget(seed=s), trainable=trainable[attacker], on_step=hook)
                for s in attack_seeds
            ]
            rec = sum(r["recovery"] for r in runs) / len(runs)
            unseen = sum(r["unseen_recovery"] for r in runs) / len(runs)
            table[attacker].append((rec, unseen))
            print(f"world {seed} {attacker:13s} recovery {rec:+.3f} (unseen photos {unseen:+.3f})", flush=True)
        tuned = finetune_copy(lm, train, AttackBudget(seed=attack_seeds[0]), trainable=trainable["adapted"])
        after = dict(tuned.model.named_parameters())
        for i, (name, q) in enumerate(bases.items()):
            change = after[name].detach() - start[name]
            answers, tokens = (span_share(steps[loss][i], q) for loss in ("answers", "tokens"))
            print(
                f"  {name}: in A's span ({q.shape[1]} of {q.shape[0]} directions) {span_share(change, q):.3f} of "
                f"the attack's change, of a sign step {answers:.3f} (answers) / {tokens:.3f} (tokens); "
                f"||dW|| / ||W||: the edit "
                f"{(start[name] - vanilla[name]).norm() / vanilla[name].norm():.2f}, "
                f"the attack {change.norm() / start[name].norm():.4f}; forget / retain energy outside A's span: "
                f"largest {specificity[name][0]:.1f}, 8th {specificity[name][7]:.1f}"
            )
    print("\n| attacker | relearning recovery (unseen photos) |\n|---|---|")
    for attacker, rows in table.items():
        rec = sum(r for r, _ in rows) / len(rows)
        unseen = sum(u for _, u in rows) / len(rows)
        print(f"| {attacker} | {rec:+.3f} ({unseen:+.3f}) |")


if __name__ == "__main__":
    main()
