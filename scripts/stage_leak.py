"""How much does an edit reach the photos it should leave alone, layer by layer? (docs/method.md, twelfth and
thirteenth passes)

Usage::

    python scripts/stage_leak.py --model VANILLA --data WORLD [--forget forget_15] RUN [RUN ...]

``RUN`` is a finished ``mllm-unlearn unlearn`` folder of one request (``merged/``): its weight change against
``VANILLA`` is measured on the null space's calibration photos (the retain people's and the taught strangers',
as cvf_ncu calibrates by default), the forget people's training photos and their unseen photos (``Test_Set``).
Printed per run: the mean over the adapted layers of the relative output change below, and of its square (the
unit of ``CVFConfig.preserve``).

Or ``RUN`` is a finished ``mllm-unlearn unlearn --tasks K`` folder (``progress.json``, ``stage-t/``), with one A
for every request (the default) or one per request (``--recalibrate``: each stage's adapter applies to the
model with the earlier stages folded in). For every stage t >= 2 the script rebuilds the model before and
after it, takes each adapted Linear layer's weight change dW = W_t - W_(t-1), and measures on the model
before the stage how much it changes the layer's output, relative to the output itself, for three sets of
photos: the earlier requests' training photos (which stage t must leave as they are), request t's own
(which it is to change) and the retain people's (the null space's calibration set):
sqrt(trace(dW C dW^T) / trace(W C W^T)) with C = X^T X / n their input covariance at that layer (Eq. 13),
i.e. the root-mean-square of ||dW x|| over their tokens against that of ||W x||.
Printed per run and stage: the mean over the adapted layers for each set, and the quotient earlier / own (0
would be an edit that does not reach the earlier requests at all).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mllm_unlearn.data.mllmu import read_mllmu
from mllm_unlearn.experiments.continual import stage_model
from mllm_unlearn.methods.base import distinct_images
from mllm_unlearn.models.loading import load_model
from mllm_unlearn.models.scoring import image_batches
from mllm_unlearn.nullspace import collect_covariances
from mllm_unlearn.train.unlearn import stranger_samples


def relative_changes(before, after, names: list[str], images: list) -> list[float]:
    """Per layer: trace(dW C dW^T) / trace(W C W^T), dW = W_after - W_before, C the images' input covariance
    at that layer in ``before`` (Eq. 13)."""
    w0, w1 = dict(before.model.named_parameters()), dict(after.model.named_parameters())
    cov = collect_covariances(
        before.model, names, image_batches(before, images), forward=before.arch.image_features, progress=False
    )
    out = []
    for n in names:
        w, c = w0[f"{n}.weight"].detach().double(), cov[n].cov
        dw = w1[f"{n}.weight"].detach().double() - w
        out.append(float(torch.trace(dw @ c @ dw.T) / torch.trace(w @ c @ w.T)))
    return out


def adapted_layers(adapter: Path) -> list[str]:
    """The plain-model paths of the Linears an adapter folder's weights adapt."""
    keys = load_file(adapter / "adapter_model.safetensors")
    return [k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in keys if "lora_A" in k]


def static(args: argparse.Namespace, data, run: Path) -> None:
    names = adapted_layers(run / "adapter")
    before, after = load_model(args.model), load_model(run / "merged")
    forget = data.forget_people
    sets = {
        "calibration": distinct_images([s for s in data.train if s.person in data.retain_people])
        + stranger_samples(data),
        "forget": distinct_images([s for s in data.train if s.person in forget]),
        "unseen": distinct_images([s for s in data.splits["test"] if s.person in forget]),
    }
    for label, images in sets.items():
        sq = relative_changes(before, after, names, images)
        rms, ms = sum(x**0.5 for x in sq) / len(sq), sum(sq) / len(sq)
        print(
            f"{run.name}: {label} photos ({len(images)}): relative output change {rms:.4f}, squared {ms:.4f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the vanilla model the runs started from")
    ap.add_argument("--data", required=True, help="the world (MLLMU-Bench folder)")
    ap.add_argument("--forget", default="forget_15")
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    data = read_mllmu(args.data, forget=args.forget)
    for run in args.runs:
        if not (run / "progress.json").exists():
            static(args, data, run)
            continue
        state = json.loads((run / "progress.json").read_text())
        chained, tasks = bool(state["config"].get("recalibrate")), state["tasks"]
        names = adapted_layers(run / "stage-1")
        before = stage_model(load_model(args.model), run, 1, chained)
        retain = distinct_images([s for s in data.train if s.person in data.retain_people])
        for t in range(2, len(state["stages"]) + 1):
            after = stage_model(load_model(args.model), run, t, chained)
            sets = {
                "earlier": distinct_images(
                    [s for s in data.train if s.person in {p for q in tasks[: t - 1] for p in q}]
                ),
                "own": distinct_images([s for s in data.train if s.person in tasks[t - 1]]),
                "retain": retain,
            }
            mean = {}
            for label, images in sets.items():
                changes = [x**0.5 for x in relative_changes(before, after, names, images)]
                mean[label] = sum(changes) / len(changes)
            print(
                f"{run.name} stage {t}: relative output change, earlier requests' photos {mean['earlier']:.4f}, "
                f"own photos {mean['own']:.4f}, retain photos {mean['retain']:.4f}, "
                f"earlier / own {mean['earlier'] / mean['own']:.3f}",
                flush=True,
            )
            before = after


if __name__ == "__main__":
    main()
