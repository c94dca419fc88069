"""What every probe of the audit shares: the audit's view of a world, runs loaded as plain models,
and one scoring pass for multiple-choice items.

:class:`AuditData` adds to the reader's :class:`~mllm_unlearn.data.sample.BenchmarkData` what the
probes need and the reader does not give: every unseen photo of ``Test_Set`` (the reader asks the
first only), the strangers of ``Strangers_Set`` and everyone's name.

MCQs are scored as the harness's ``likelihood`` mode does (the option whose text, closing EOS
included, has the highest summed log-probability given the question), and the same forward pass
also gives each option's per-token probability for the truth ratio (:mod:`.forget_quality`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ...data.mllmu import read_mllmu
from ...data.sample import BenchmarkData, DataError, ImageRef, Sample
from ...models.loading import LoadedModel, load_model
from ...models.scoring import eval_mode, sequence_logprob

#: the accuracy of a 4-option MCQ by guessing
CHANCE = 0.25
STRANGERS_FOLDER = "Strangers_Set"
TEST_FOLDER = "Test_Set"


@dataclass
class Stranger:
    id: str
    name: str
    pretrain: bool  # taught the "I don't know" reply in Pretrain_Data
    photos: list[ImageRef]
    items: list[Sample]  # image-asked MCQ / generation items of its profile, asked on photo 0


@dataclass
class AuditData:
    """A world as the audit sees it (see the module docstring)."""

    root: Path
    bench: BenchmarkData
    forget_split: str
    names: dict[str, str]  # person ID -> name, every known (trained) person: fictitious and real-world
    unseen: dict[str, list[ImageRef]]  # person ID -> its unseen Test_Set photos
    strangers: list[Stranger] = field(default_factory=list)

    @property
    def forget_people(self) -> list[str]:
        return sorted(self.bench.forget_people, key=_id_key)

    def image_mcqs(self, split: str, people: Sequence[str] | None = None) -> list[Sample]:
        """The split's image-asked MCQs (the canonical photo), optionally of some people only."""
        keep = None if people is None else set(people)
        return [s for s in self.bench.items(split, "mcq", "vqa") if keep is None or s.person in keep]

    def unseen_mcqs(self, people: Sequence[str], max_photos: int | None = None) -> list[Sample]:
        """Every image-asked MCQ of ``people`` asked on each of their unseen photos."""
        by_person: dict[str, list[Sample]] = {}
        for split in ("forget", "retain"):
            for s in self.bench.items(split, "mcq", "vqa"):
                by_person.setdefault(s.person, []).append(s)
        out = []
        for person in people:
            for k, photo in enumerate(self.unseen.get(person, [])[:max_photos]):
                out += [
                    Sample(
                        f"unseen/{person}/{k}/{s.id}",
                        person,
                        s.task,
                        s.modality,
                        s.question,
                        s.answer,
                        photo,
                        s.options,
                        s.correct,
                    )
                    for s in by_person.get(person, [])
                ]
        return out

    def training_photos(self, people: Sequence[str]) -> dict[str, list[ImageRef]]:
        """Each person's distinct training photos (from the training pairs asked with an image)."""
        out: dict[str, dict[str, ImageRef]] = {p: {} for p in people}
        for s in self.bench.train:
            if s.person in out and s.image is not None:
                out[s.person].setdefault(s.image.source, s.image)
        return {p: list(photos.values()) for p, photos in out.items()}


def _id_key(person: str) -> tuple[int, str]:
    return (int(person), person) if person.isdigit() else (1 << 60, person)


def load_audit_data(root: str | Path, forget: str = "forget_15") -> AuditData:
    """Read an MLLMU-Bench folder for the audit; ``Strangers_Set`` and ``world.json`` are optional."""
    root = Path(root)
    bench = read_mllmu(root, forget=forget)
    names = _names(root, bench)
    unseen = read_unseen(root)
    strangers = []
    if (root / STRANGERS_FOLDER).is_dir():
        world_names = _world_names(root, "strangers")
        for r in _rows(root / STRANGERS_FOLDER, None):
            sid = str(r["ID"])
            photos = [
                ImageRef(bytes(img["bytes"]), f"{root / STRANGERS_FOLDER} ID={sid} images[{k}]")
                for k, img in enumerate(r["images"])
            ]
            if not photos:
                raise DataError(f"{root / STRANGERS_FOLDER}: stranger {sid} has no photo")
            strangers.append(
                Stranger(
                    sid,
                    world_names.get(sid, ""),
                    bool(r.get("Pretrain")),
                    photos,
                    _profile_items(r, photos[0], STRANGERS_FOLDER),
                )
            )
    return AuditData(root, bench, forget, names, unseen, strangers)


def read_unseen(root: str | Path) -> dict[str, list[ImageRef]]:
    """Person ID -> every photo of their ``Test_Set`` row (photos no training pair shows)."""
    root = Path(root)
    return {
        str(r["ID"]): [
            ImageRef(bytes(img["bytes"]), f"{root / TEST_FOLDER} ID={r['ID']} images[{k}]")
            for k, img in enumerate(r["images"] or [])
        ]
        for r in _rows(root / TEST_FOLDER, ["ID", "images"])
    }


def _rows(folder: Path, columns: list[str] | None) -> list[dict]:
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise DataError(f"{folder}: no parquet file")
    return [row for f in files for row in pq.read_table(f, columns=columns).to_pylist()]


def _world_names(root: Path, key: str) -> dict[str, str]:
    summary = root / "world.json"
    if not summary.is_file():
        return {}
    return {str(p["ID"]): p["name"] for p in json.loads(summary.read_text()).get(key, [])}


def _names(root: Path, bench: BenchmarkData) -> dict[str, str]:
    """Known people's names: ``world.json``, else the answer of each profile's name MCQ."""
    names = _world_names(root, "people")
    if names:
        return names
    for split in ("forget", "retain", "real"):
        for s in bench.items(split, "mcq", "vqa"):
            if "name" in s.question.lower():
                names.setdefault(s.person, s.answer)
    return names


def _profile_items(row: dict, photo: ImageRef, folder: str) -> list[Sample]:
    """A profile row's image-asked MCQs and generation items, on ``photo`` (strangers' profiles)."""
    items = []
    for k, q in enumerate(row["Classification_Task"]["Image_Textual_Questions"]):
        options = {letter: text for letter, text in q["Options"].items() if text is not None}
        items.append(
            Sample(
                f"{folder}/{row['ID']}/mcq-vqa/{k}",
                str(row["ID"]),
                "mcq",
                "vqa",
                q["Question"],
                options[q["Correct_Answer"]],
                photo,
                options,
                q["Correct_Answer"],
            )
        )
    for k, g in enumerate(x for x in row["Generation_Task"] if x["Type"] == "Image_Textual"):
        items.append(
            Sample(
                f"{folder}/{row['ID']}/gen-vqa/{k}",
                str(row["ID"]),
                "gen",
                "vqa",
                g["Question"],
                g["Ground_Truth"],
                photo,
            )
        )
    return items


def with_image(samples: Sequence[Sample], photo: ImageRef, tag: str) -> list[Sample]:
    return [
        Sample(f"{tag}/{s.id}", s.person, s.task, s.modality, s.question, s.answer, photo, s.options, s.correct)
        for s in samples
    ]


# ------------------------------------------------------------------------------------------ models


def load_run(path: str | Path, vanilla: str | Path | None = None) -> LoadedModel:
    """A run as a plain (merged) model: a model folder, a run folder's ``merged/``, or a run folder's
    PEFT ``adapter/`` (or an adapter folder) applied to ``vanilla`` and merged."""
    path = Path(path)
    if (path / "merged" / "config.json").is_file():
        return load_model(path / "merged")
    if (path / "config.json").is_file():
        return load_model(path)
    adapter = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{path}: neither a model (config.json), a run folder (merged/ or adapter/) "
            f"nor a PEFT adapter (adapter_config.json)"
        )
    if vanilla is None:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter}: the adapter names no base model; pass the vanilla model")
        vanilla = base
    from peft import PeftModel

    lm = load_model(vanilla)
    model = PeftModel.from_pretrained(lm.model, str(adapter)).merge_and_unload()
    return LoadedModel(model.eval(), lm.processor, lm.arch)


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class MCQScores:
    """Per item: correct by summed likelihood (the harness's ``likelihood`` mode), and per option the
    summed and per-token log-probabilities (options in sorted letter order)."""

    samples: list[Sample]
    correct: np.ndarray  # (n,) bool
    logp: list[np.ndarray]  # summed log p per option
    logp_norm: list[np.ndarray]  # per-token log p per option

    def accuracy(self, people: Sequence[str] | None = None) -> float:
        keep = None if people is None else set(people)
        hits = [c for s, c in zip(self.samples, self.correct) if keep is None or s.person in keep]
        return float(np.mean(hits)) if hits else float("nan")

    def truth_ratio(self) -> np.ndarray:
        """Per item: the mean per-token probability of the wrong options over that of the right one
        (TOFU's truth ratio, with the MCQ's wrong options as the perturbed answers)."""
        out = []
        for s, lp in zip(self.samples, self.logp_norm):
            letters = sorted(s.options)
            right = letters.index(s.correct)
            wrong = np.delete(lp, right)
            out.append(float(np.mean(np.exp(wrong - lp[right]))))
        return np.array(out)

    def answer_prob(self) -> np.ndarray:
        """Per item: the per-token probability of the right option's text."""
        return np.array(
            [float(np.exp(lp[sorted(s.options).index(s.correct)])) for s, lp in zip(self.samples, self.logp_norm)]
        )


@torch.no_grad()
def score_mcqs(lm: LoadedModel, samples: Sequence[Sample], batch_size: int = 64) -> MCQScores:
    """Score every option of every MCQ in one batched pass (see :class:`MCQScores`)."""
    flat = [(i, text) for i, s in enumerate(samples) for _, text in sorted(s.options.items())]
    sums, norms = np.zeros(len(flat)), np.zeros(len(flat))
    with eval_mode(lm.model):
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            items = [samples[i] for i, _ in chunk]
            batch = lm.arch.encode(lm.processor, items, [s.question for s in items], [text for _, text in chunk]).to(
                lm.model.device
            )
            logits, targets, rows = lm.arch.answer_logits(lm.model, batch)
            logp, lengths = sequence_logprob(logits, targets, rows, len(chunk))
            sums[start : start + len(chunk)] = logp.cpu().numpy()
            norms[start : start + len(chunk)] = (logp / lengths).cpu().numpy()
    correct, per_sum, per_norm, i = [], [], [], 0
    for s in samples:
        k = len(s.options)
        per_sum.append(sums[i : i + k])
        per_norm.append(norms[i : i + k])
        correct.append(sorted(s.options)[int(np.argmax(sums[i : i + k]))] == s.correct)
        i += k
    return MCQScores(list(samples), np.array(correct, dtype=bool), per_sum, per_norm)


@torch.no_grad()
def answer_nll(lm: LoadedModel, samples: Sequence[Sample], batch_size: int = 64) -> np.ndarray:
    """Per-sample mean answer-token negative log-likelihood (the loss of a loss-based MIA)."""
    out = []
    with eval_mode(lm.model):
        for start in range(0, len(samples), batch_size):
            items = samples[start : start + batch_size]
            batch = lm.arch.encode(lm.processor, items, [s.question for s in items], [s.answer for s in items]).to(
                lm.model.device
            )
            logits, targets, rows = lm.arch.answer_logits(lm.model, batch)
            logp, lengths = sequence_logprob(logits, targets, rows, len(items))
            out += (-(logp / lengths)).cpu().tolist()
    return np.array(out)
