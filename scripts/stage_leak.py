"""How much does each continual stage's edit reach the earlier requests' photos? (docs/method.md, twelfth pass)

Usage::

    python scripts/stage_leak.py --model VANILLA --data WORLD [--forget forget_15] RUN [RUN ...]

``RUN`` is a finished ``mllm-unlearn unlearn --tasks K`` folder (``progress.json``, ``stage-t/``), with one A
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


def relative_change(dw: torch.Tensor, w: torch.Tensor, cov: torch.Tensor) -> float:
    dw, w, c = (t.to(torch.float64) for t in (dw, w, cov))
    return float(torch.sqrt(torch.trace(dw @ c @ dw.T) / torch.trace(w @ c @ w.T)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the vanilla model the runs started from")
    ap.add_argument("--data", required=True, help="the world (MLLMU-Bench folder)")
    ap.add_argument("--forget", default="forget_15")
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    data = read_mllmu(args.data, forget=args.forget)
    for run in args.runs:
        state = json.loads((run / "progress.json").read_text())
        chained, tasks = bool(state["config"].get("recalibrate")), state["tasks"]
        keys = [k for k in load_file(run / "stage-1" / "adapter_model.safetensors") if "lora_A" in k]
        names = [k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in keys]
        before = stage_model(load_model(args.model), run, 1, chained)
        retain = distinct_images([s for s in data.train if s.person in data.retain_people])
        for t in range(2, len(state["stages"]) + 1):
            after = stage_model(load_model(args.model), run, t, chained)
            w0, w1 = dict(before.model.named_parameters()), dict(after.model.named_parameters())
            sets = {
                "earlier": distinct_images(
                    [s for s in data.train if s.person in {p for q in tasks[: t - 1] for p in q}]
                ),
                "own": distinct_images([s for s in data.train if s.person in tasks[t - 1]]),
                "retain": retain,
            }
            mean = {}
            for label, images in sets.items():
                cov = collect_covariances(
                    before.model,
                    names,
                    image_batches(before, images),
                    forward=before.arch.image_features,
                    progress=False,
                )
                changes = [
                    relative_change(
                        w1[f"{n}.weight"].detach() - w0[f"{n}.weight"].detach(), w0[f"{n}.weight"], cov[n].cov
                    )
                    for n in names
                ]
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
