"""Shared fixtures: tiny worlds and tiny models, built once per session where possible."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers.utils import logging as hf_logging

from mllm_unlearn.data.mllmu import read_mllmu
from mllm_unlearn.data.sample import ImageRef, Sample
from mllm_unlearn.data.world import WorldConfig, make_world
from mllm_unlearn.models.tiny import TinySizes, corpus_for, make_tiny_model

hf_logging.set_verbosity_error()
torch.set_num_threads(1)


#: a tiny LLaVA small enough for many tests (the demo's is larger)
SMALL = TinySizes(vision_hidden=32, text_hidden=64, text_intermediate=128, vocab_size=400)
#: the world the data tests read
WORLD_CONFIG = WorldConfig(n_people=20, n_real=6, seed=0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """NCU covariances go to a per-session folder, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLLM_UNLEARN_CACHE", str(tmp_path_factory.mktemp("ncu_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world") / "mllmu", WORLD_CONFIG)


@pytest.fixture(scope="session")
def summary(world) -> dict:
    import json

    return json.loads((world / "world.json").read_text())


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """(root, world dir, BenchmarkData, tiny model dir): a 10-person world and an untrained tiny LLaVA."""
    root = tmp_path_factory.mktemp("small")
    world = make_world(
        root / "world", WorldConfig(n_people=10, n_real=4, train_photos=2, n_strangers=0, pretrain_strangers=0, seed=3)
    )
    data = read_mllmu(world, forget="forget_10")
    return root, world, data, make_tiny_model("llava", root / "tiny", corpus_for(data), sizes=SMALL)


def png(color: tuple[int, int, int], size: int = 32) -> ImageRef:
    """A flat-colour PNG with a white square whose position depends on the colour (two cues)."""
    img = Image.new("RGB", (size, size), color)
    x = (color[0] // 32) % 3 * (size // 3)
    img.paste((255, 255, 255), (x, 0, x + size // 3, size // 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return ImageRef(buf.getvalue(), f"test image {color}")


PEOPLE = {  # person -> (portrait colour, job)
    "1": ((200, 30, 30), "baker"),
    "2": ((30, 200, 30), "pilot"),
    "3": ((30, 30, 200), "dentist"),
    "4": ((200, 200, 30), "farmer"),
}
JOBS = sorted(job for _, job in PEOPLE.values())


def job_items() -> tuple[list[Sample], list[Sample]]:
    """(training pairs, MCQs) asking each person's job from the portrait."""
    train, mcq = [], []
    for pid, (color, job) in PEOPLE.items():
        img = png(color)
        train.append(Sample(f"t{pid}", pid, "qa", "vqa", "What is this person's job?", job, img))
        options = dict(zip("ABCD", JOBS))
        letter = next(k for k, v in options.items() if v == job)
        mcq.append(Sample(f"m{pid}", pid, "mcq", "vqa", "What is this person's job?", job, img, options, letter))
    return train, mcq


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    from mllm_unlearn.data.prompts import format_mcq

    train, mcq = job_items()
    return [f"USER: <image>\n{format_mcq(s.question, s.options)}\nASSISTANT: {s.correct} {s.answer}" for s in mcq] * 5
