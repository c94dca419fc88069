"""Honour deletion requests: forget people from their own photos, label-free, with a deletion report.

``mllm-unlearn forget --model M --request REQUEST --out RUN`` (:func:`run_forget`):

1. The request (:mod:`mllm_unlearn.data.request`) is read and checked before any model loads. A
   share of each person's photos (``holdout``; or the request's ``verify`` photos, or a ``--verify``
   folder with one sub-folder per name) is held out of training, for the report only; so is a share
   of every retain entry with at least 2 photos.
2. Label-free CVF-NCU. Push / pull (Eq. 4, 6) and L_RET (Eq. 9) need only images. L_GUM (Eq. 10,
   ``-log p(a | v, q)`` on ground-truth retain answers) becomes self-distillation: the reference
   model's own greedy replies to generic prompts (:data:`DISTILL_PROMPTS`) on the retain images are
   generated once (cached in ``RUN/distill.jsonl``) and used as the answers ``a``. The loss is then
   sequence-level knowledge distillation of the reference model (Kim & Rush, 2016); at step 0 the
   unlearned model already produces these replies, so the term only resists drift — the role Eq. 10
   plays with ground-truth answers. No change to the method: these are ordinary retain samples.
3. Verification: identity prompts (:data:`IDENTITY_PROMPTS`) on held-out photos before / after;
   reply agreement with the reference on retain images; bit-identical text-only logits on probe
   prompts (only the vision tower and projector carry adapters); cheap robustness checks (4-bit
   round-to-nearest weights; a short benign LoRA fine-tune) on a merged copy.
4. ``RUN/``: ``adapter/`` (PEFT), ``merged/`` with ``merge``, ``run.json`` (resolved settings, the
   requests with their photo hashes, the training log), ``distill.jsonl``, ``report.json``,
   ``report.md``, ``report.png`` — written atomically: a failed run leaves no ``RUN``.
5. ``resume=RUN``: continual unlearning. The base model gets RUN's adapter back (A stays frozen, B
   carries on) and trains on every person requested so far (replay; earlier request files are
   re-read and their photos' hashes checked), into a new ``out``. Settings must equal RUN's.

Defaults (``ForgetSettings``, :data:`CVF_DEFAULTS`) were tuned on the development worlds of
``tests/test_forget.py`` only (its layout with synthetic-world seeds 0, 1, 2; 2 people forgotten, 10
kept, 2 held-out photos each): with cvf_ncu's own ``lam=1`` the forgotten people's name recall on
held-out photos went 1.00 -> 0.00 / 0.50 / 0.00, with ``lam=3`` (push weighted 3x against pull)
1.00 -> 0.00 / 0.25 / 0.00, retain people's name recall 1.00 -> 1.00 / 1.00 / 0.98. Seed 1's residue
is a conservative count: replies like "Yaram Engstrom" for Bram Engstrom carry his surname (which a
retain person shares). No validation world was kept apart, so these figures are optimistic.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..data.request import Person, Photo, Pool, Request, check_overlaps, read_photos, read_request, sha256
from ..data.sample import DataError, Sample
from ..evaluate.metrics import classify_name as classify
from ..methods import get_method
from ..models.loading import LoadedModel, load_model, torch_dtype
from ..models.quantize import QuantSpec, fake_quantize_
from ..models.scoring import answer_nll, eval_mode, generate
from ..nullspace.lora import FROZEN_ATTR, refreeze
from ..runtime.options import parse_options, shared_fields
from ..runtime.outputs import atomic_dir, check_writable, refuse_existing
from ..train.loop import TrainConfig, run
from ..train.unlearn import UnlearnConfig, attach_adapters, run_record, unlearn_stage

#: prompts whose reference replies on retain images make the self-distillation L_GUM
DISTILL_PROMPTS = ("Describe this image.", "Who is this?", "Who is the person in the image?")
#: prompts asked on held-out photos to see whether the model names the person
IDENTITY_PROMPTS = ("Who is the person in the image?", "Who is this?", "What is the name of this person?")
#: text-only probes (``{name}``: every requested person); their logits must not change
TEXT_PROBES = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 12 times 7?",
    "Who is {name}?",
    "Tell me about {name}.",
)
RUN_FILE, REPORT_JSON, REPORT_MD, REPORT_PNG, DISTILL_FILE = (
    "run.json",
    "report.json",
    "report.md",
    "report.png",
    "distill.jsonl",
)
CHECKS = ("quant", "finetune")
#: cvf_ncu options this command applies before the user's ``--opt`` ones (which win on the same key)
CVF_DEFAULTS = ("lam=3",)


@dataclass
class ForgetSettings:
    """What shapes the unlearned model; a resumed run must use the same values (checked, by name)."""

    model: str = ""
    dtype: str = "fp32"
    image_size: int | None = None
    holdout: float = 0.34  # share of each person's photos held out for the report
    steps: int = 200
    lr: float | None = None  # None: cvf_ncu's default
    rank: int | None = None  # None: cvf_ncu's default (32)
    lora_alpha: float | None = None
    batch_size: int = 8
    ivr_level: str = "projector"
    seed: int = 0
    distill_prompts: tuple[str, ...] = DISTILL_PROMPTS
    distill_tokens: int = 32  # reply length of the self-distillation targets
    method_options: tuple[str, ...] = ()  # cvf_ncu KEY=VALUE options (``--opt``)
    #: NCU's null space from the retain photos and the request's stranger photos (None: cvf_ncu's, on)
    calibrate_strangers: bool | None = None

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        self.distill_prompts = tuple(self.distill_prompts)
        self.method_options = tuple(self.method_options)

    def unlearn_config(self, cache_dir: str | None = None) -> UnlearnConfig:
        return UnlearnConfig(**{**shared_fields(UnlearnConfig, self), "method": "cvf_ncu", "cache_dir": cache_dir})


@dataclass
class ReportOptions:
    """What only the report and the outputs depend on (free to change on resume)."""

    identity_prompts: tuple[str, ...] = IDENTITY_PROMPTS
    max_new_tokens: int = 24
    checks: tuple[str, ...] = CHECKS
    benign_steps: int = 20
    benign_lr: float = 2e-4
    merge: bool = False
    device: str = "cpu"
    known_names: tuple[str, ...] = ()
    eval_batch: int = 16
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.checks) - set(CHECKS))
        if unknown:
            raise ValueError(f"unknown check(s) {unknown}; available: {', '.join(CHECKS)} (or none)")


def method_config(settings: ForgetSettings, resumed: dict[str, Any] | None = None) -> Any:
    """cvf_ncu's config: :data:`CVF_DEFAULTS`, then the user's options; on resume the config the resumed
    run recorded (``resumed``: its ``run.json``; the ``method_config`` in it) as it was, so a default
    changed by a later version of this library does not change how the next request is trained (fields
    the record lacks, added since, take today's defaults)."""
    cls = get_method("cvf_ncu").config_class
    if resumed is not None:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in resumed["method_config"].items() if k in known})
    return parse_options(cls, CVF_DEFAULTS + tuple(settings.method_options))


def resolve_settings(given: dict[str, Any], recorded: dict[str, Any] | None, source: str = "") -> ForgetSettings:
    """Settings from the command line (``None`` = not given) over the defaults, or over a resumed run's
    recorded settings, where every given value must equal the recorded one (mismatches are named)."""
    names = {f.name for f in fields(ForgetSettings)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"unknown forget setting(s) {unknown}")
    if recorded is None:
        return ForgetSettings(**{k: v for k, v in given.items() if v is not None})
    base = ForgetSettings(**{k: v for k, v in recorded.items() if k in names})
    mismatch = []
    for key, value in given.items():
        if value is None:
            continue
        value = tuple(value) if isinstance(value, list) else value
        if value != getattr(base, key):
            mismatch.append(f"{key}={value!r} (recorded: {getattr(base, key)!r})")
    if mismatch:
        raise ValueError(
            f"--resume {source}: settings differ from the recorded run: {'; '.join(mismatch)}. "
            "Continue with the recorded settings (leave them out) or start a new run"
        )
    return base


def _rates(labels: Sequence[str]) -> dict[str, float]:
    n = max(1, len(labels))
    return {
        "named": labels.count("named") / n,
        "misidentified": labels.count("other") / n,
        "neither": labels.count("neither") / n,
    }


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .!")


# -- data ----------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything decided before the model loads."""

    requests: list[Request]
    people: list[Person]
    train: dict[str, list[Photo]]
    heldout: dict[str, list[Photo]]
    retain_train: list[tuple[Pool, Photo]]
    retain_eval: list[tuple[Pool, Photo]]
    retain_eval_seen: bool  # True when no retain photo could be held out (then evaluated on training ones)
    strangers: list[Photo]
    known_names: list[str]
    dropped_retain: list[str] = field(default_factory=list)
    #: per request, its people's photo hashes as its file defines them (before ``--verify`` adds any)
    request_hashes: list[dict[str, list[str]]] = field(default_factory=list)


def _order(photos: Sequence[Photo], seed: int) -> list[Photo]:
    """A fixed order independent of file names: by a seeded hash of the content."""
    return sorted(photos, key=lambda p: sha256(f"{seed}:{p.sha256}".encode()))


def _split(photos: Sequence[Photo], share: float, seed: int) -> tuple[list[Photo], list[Photo]]:
    k = min(len(photos) - 1, max(1, round(share * len(photos))))
    order = _order(photos, seed)
    return order[k:], order[:k]


def _read_known_names(path: str | Path | None) -> list[str]:
    if not path:
        return []
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{p}: cannot read the --known-names file ({exc})") from exc
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def plan(
    requests: Sequence[Request],
    settings: ForgetSettings,
    *,
    verify_dir: str | Path | None = None,
    known_names_file: str | Path | None = None,
) -> Plan:
    """Held-out splits, the retain pool of all requests, cross-request checks. No model involved.

    Across requests a person may be requested only once and no photo may be a person's in one
    request and someone else's in another; a retain photo of an earlier request that is now a
    person's photo, or a retain entry named like a requested person, leaves the retain pool."""
    people: list[Person] = []
    owner: dict[str, str] = {}
    hashes = [req.photo_hashes() for req in requests]
    for req in requests:
        for person in req.forget:
            clash = next((p for p in people if p.name.casefold() == person.name.casefold()), None)
            if clash is not None:
                raise DataError(
                    f"{req.source}: forget ({person.name}) field 'name': already requested earlier "
                    "in this run's history"
                )
            if verify_dir and not person.verify and (Path(verify_dir) / person.name).is_dir():
                person.verify = read_photos(Path(verify_dir), f"--verify {verify_dir} ({person.name})", person.name)
                check_overlaps(req)
            for ph in person.photos + person.verify:
                if ph.sha256 in owner and owner[ph.sha256] != person.name:
                    raise DataError(
                        f"{req.source}: forget ({person.name}) field 'photos': {ph.path} has the same "
                        f"bytes as a photo of {owner[ph.sha256]} from an earlier request"
                    )
                owner[ph.sha256] = person.name
            people.append(person)
    train, heldout = {}, {}
    for person in people:
        if person.verify:
            train[person.name], heldout[person.name] = list(person.photos), list(person.verify)
        else:
            train[person.name], heldout[person.name] = _split(person.photos, settings.holdout, settings.seed)
    forgotten = {p.name.casefold() for p in people}
    retain_train, retain_eval, dropped, seen = [], [], [], set()
    for req in requests:
        for pool in req.retain:
            if pool.name and pool.name.casefold() in forgotten:
                dropped.append(f"{req.source}: retain entry {pool.name!r} (now requested to be forgotten)")
                continue
            photos = [ph for ph in pool.photos if ph.sha256 not in owner and ph.sha256 not in seen]
            dropped += [f"{ph.path} (a requested person's photo)" for ph in pool.photos if ph.sha256 in owner]
            seen.update(ph.sha256 for ph in photos)
            if len(photos) >= 2:
                keep, held = _split(photos, settings.holdout, settings.seed)
                retain_train += [(pool, ph) for ph in keep]
                retain_eval += [(pool, ph) for ph in held]
            else:
                retain_train += [(pool, ph) for ph in photos]
    if not retain_train:
        raise DataError(f"{requests[-1].source}: field 'retain' holds no images left to keep")
    retain_eval_seen = not retain_eval
    if retain_eval_seen:
        retain_eval = list(retain_train)
    strangers = [ph for req in requests for pool in req.strangers for ph in pool.photos if ph.sha256 not in owner]
    names = [p.name for p in people] + [pool.name for pool, _ in retain_train + retain_eval if pool.name]
    names += _read_known_names(known_names_file)
    return Plan(
        list(requests),
        people,
        train,
        heldout,
        retain_train,
        retain_eval,
        retain_eval_seen,
        strangers,
        list(dict.fromkeys(names)),
        dropped,
        hashes,
    )


def _image_sample(photo: Photo, person: str, question: str = "", answer: str = "", tag: str = "img") -> Sample:
    return Sample(f"{tag}/{photo.sha256[:16]}", person, "qa", "vqa", question, answer, photo.image)


# -- model work ----------------------------------------------------------------------------------
def replies(
    lm: LoadedModel, photos: Sequence[Photo], prompts: Sequence[str], max_new_tokens: int, batch: int = 16
) -> list[list[str]]:
    """Greedy replies: ``out[i][j]`` is the reply to ``prompts[j]`` on ``photos[i]``."""
    flat = [(ph, q) for ph in photos for q in prompts]
    out: list[str] = []
    with eval_mode(lm.model):
        for i in range(0, len(flat), batch):
            chunk = flat[i : i + batch]
            out += generate(lm, [_image_sample(ph, "") for ph, _ in chunk], [q for _, q in chunk], max_new_tokens)
    k = len(prompts)
    return [out[i * k : (i + 1) * k] for i in range(len(photos))]


@torch.no_grad()
def text_logits(lm: LoadedModel, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Full-vocabulary logits of each text-only prompt (one at a time: no padding involved)."""
    out = []
    with eval_mode(lm.model):
        for q in prompts:
            s = Sample("probe", "", "qa", "qa", q, "")
            batch = lm.arch.encode(lm.processor, [s], [q]).to(lm.model.device)
            out.append(lm.model(**batch.inputs).logits[0].float().cpu())
    return out


def distill_targets(
    lm: LoadedModel,
    photos: Sequence[Photo],
    settings: ForgetSettings,
    cache: dict[tuple[str, str], str],
    batch: int = 16,
) -> dict[tuple[str, str], str]:
    """The reference model's replies to every distillation prompt on every retain photo (cached)."""
    todo = [ph for ph in dict.fromkeys(photos) if any((ph.sha256, q) not in cache for q in settings.distill_prompts)]
    if todo:
        got = replies(lm, todo, settings.distill_prompts, settings.distill_tokens, batch)
        for ph, row in zip(todo, got):
            cache.update({(ph.sha256, q): r for q, r in zip(settings.distill_prompts, row)})
    return cache


def identity_eval(lm: LoadedModel, p: Plan, opts: ReportOptions) -> dict[str, Any]:
    """Replies to the identity prompts on held-out photos of every person, the retain eval photos and
    the strangers; distillation-prompt replies on retain photos too (for agreement)."""
    prompts = opts.identity_prompts
    people = {
        person.name: replies(lm, p.heldout[person.name], prompts, opts.max_new_tokens, opts.eval_batch)
        for person in p.people
    }
    retain_prompts = tuple(dict.fromkeys(prompts + tuple(DISTILL_PROMPTS)))
    retain = replies(lm, [ph for _, ph in p.retain_eval], retain_prompts, opts.max_new_tokens, opts.eval_batch)
    strangers = replies(lm, p.strangers, prompts, opts.max_new_tokens, opts.eval_batch) if p.strangers else []
    return {"people": people, "retain": retain, "retain_prompts": list(retain_prompts), "strangers": strangers}


def _recall_summary(lm: LoadedModel, p: Plan, opts: ReportOptions) -> dict[str, float]:
    """Name recall of the forgotten people (held-out photos) and of named retain entries (identity prompts)."""
    prompts = opts.identity_prompts
    forget = [
        classify(r, person.name, p.known_names)
        for person in p.people
        for row in replies(lm, p.heldout[person.name], prompts, opts.max_new_tokens, opts.eval_batch)
        for r in row
    ]
    named = [(pool, ph) for pool, ph in p.retain_eval if pool.name]
    retain = [
        classify(r, pool.name, p.known_names)
        for (pool, _), row in zip(
            named, replies(lm, [ph for _, ph in named], prompts, opts.max_new_tokens, opts.eval_batch)
        )
        for r in row
    ]
    out = {"forget_named": _rates(forget)["named"], "forget_misidentified": _rates(forget)["misidentified"]}
    if retain:
        out["retain_named"] = _rates(retain)["named"]
    return out


# -- robustness checks ---------------------------------------------------------------------------
def robustness_checks(
    lm: LoadedModel,
    p: Plan,
    opts: ReportOptions,
    retain_samples: Sequence[Sample],
    settings: ForgetSettings,
    *,
    merged_dir: Path | None = None,
) -> dict[str, Any]:
    """On one merged copy of the unlearned model (saved to ``merged_dir`` first when ``opts.merge``):
    a short benign fine-tune (LoRA on every scope, on the self-distillation retain samples, i.e. data
    with nothing of the forgotten people), then 4-bit weights. Returns the checks' results."""
    from peft import LoraConfig, get_peft_model

    results: dict[str, Any] = {}
    merged = copy.deepcopy(lm.model).merge_and_unload()
    merged.eval()
    work = LoadedModel(merged, lm.processor, lm.arch)
    if opts.merge and merged_dir is not None:
        work.save_pretrained(merged_dir)
    if "finetune" in opts.checks:
        t0 = time.perf_counter()
        pattern = lm.arch.scope_pattern("all")
        peft = get_peft_model(merged, LoraConfig(r=8, lora_alpha=8, target_modules=pattern, lora_dropout=0.0))
        ft = LoadedModel(peft, lm.processor, lm.arch)
        gen = torch.Generator().manual_seed(settings.seed)
        bs = min(8, len(retain_samples))

        def loss_fn(step: int):
            idx = torch.randperm(len(retain_samples), generator=gen)[:bs].tolist()
            return answer_nll(ft, [retain_samples[i] for i in idx]), {}

        peft.train()
        run(
            [q for q in peft.parameters() if q.requires_grad],
            loss_fn,
            TrainConfig(
                steps=opts.benign_steps,
                lr=opts.benign_lr,
                batch_size=bs,
                warmup=2,
                seed=settings.seed,
                log_every=max(1, opts.benign_steps),
            ),
            desc="check: benign fine-tune",
        )
        peft.eval()
        results["finetune"] = {
            **_recall_summary(ft, p, opts),
            "steps": opts.benign_steps,
            "lr": opts.benign_lr,
            "what": "LoRA r=8 on vision, projector and LLM; reference replies on retain images",
            "seconds": round(time.perf_counter() - t0, 1),
        }
        merged = peft.unload()  # drop the fine-tune's LoRA, back to the merged unlearned weights
        work = LoadedModel(merged, lm.processor, lm.arch)
    if "quant" in opts.checks:
        t0 = time.perf_counter()
        layers = len(fake_quantize_(merged, QuantSpec(4)))
        results["quant"] = {
            **_recall_summary(work, p, opts),
            "layers": layers,
            "what": "4-bit round-to-nearest, symmetric per output channel, all Linear but lm_head",
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return results


# -- the pipeline --------------------------------------------------------------------------------
def _load_resume(run_dir: Path) -> dict[str, Any]:
    f = run_dir / RUN_FILE
    if not (run_dir / "adapter").is_dir() or not f.is_file():
        raise DataError(f"--resume {run_dir}: not a forget run folder (needs adapter/ and {RUN_FILE})")
    record = json.loads(f.read_text())
    if "forget" not in record:
        raise DataError(f"--resume {run_dir}: {RUN_FILE} holds no 'forget' record (not made by `forget`)")
    if not isinstance(record.get("method_config"), dict):
        raise DataError(f"--resume {run_dir}: {RUN_FILE} holds no 'method_config' (the config to continue with)")
    return record


def _reread(record: dict[str, Any], run_dir: Path) -> list[Request]:
    """The earlier requests, re-read from their files, with every person's photos unchanged."""
    out = []
    for item in record["forget"]["requests"]:
        path = Path(item["path"])
        if not path.is_file():
            raise DataError(
                f"--resume {run_dir}: earlier request file {path} is gone; continual unlearning "
                "replays every earlier request, so keep its files"
            )
        req = read_request(path)
        if req.photo_hashes() != item["photos"]:
            raise DataError(
                f"--resume {run_dir}: the photos of earlier request {path} changed since that run "
                "(field 'photos' of its people)"
            )
        out.append(req)
    return out


def prepare(
    request_paths: Sequence[str | Path],
    out: str | Path,
    given: dict[str, Any],
    *,
    resume: str | Path | None = None,
    verify_dir: str | Path | None = None,
    known_names_file: str | Path | None = None,
) -> tuple[ForgetSettings, Plan, dict | None]:
    """Every check that needs no model: output folder, resumed run, settings, requests, splits."""
    refuse_existing(out)
    check_writable(out)
    record = None
    earlier: list[Request] = []
    if resume is not None:
        record = _load_resume(Path(resume))
        earlier = _reread(record, Path(resume))
    settings = resolve_settings(given, record["forget"]["settings"] if record else None, str(resume))
    if not settings.model:
        raise ValueError("--model is required (a hub id or a local folder)")
    method_config(settings, record)
    if not request_paths:
        raise DataError("--request names no request file")
    new = [read_request(r) for r in request_paths]
    return settings, plan(earlier + new, settings, verify_dir=verify_dir, known_names_file=known_names_file), record


def run_forget(
    request_paths: Sequence[str | Path],
    out: str | Path,
    given: dict[str, Any],
    opts: ReportOptions | None = None,
    *,
    resume: str | Path | None = None,
    verify_dir: str | Path | None = None,
    known_names_file: str | Path | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """The whole pipeline; returns the report (also written to ``out``)."""
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    settings, p, record = prepare(
        request_paths, out, given, resume=resume, verify_dir=verify_dir, known_names_file=known_names_file
    )
    opts = replace(opts or ReportOptions(), known_names=tuple(p.known_names))

    t0 = time.perf_counter()
    dtype = torch_dtype(settings.dtype)
    lm = load_model(
        settings.model,
        device=opts.device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        image_size=settings.image_size,
    )
    timings["load_s"] = time.perf_counter() - t0

    # before: the base model (= the reference model of every run in the history)
    t0 = time.perf_counter()
    probes = [q for q in TEXT_PROBES if "{name}" not in q]
    probes += [q.format(name=person.name) for q in TEXT_PROBES if "{name}" in q for person in p.people]
    logits_before = text_logits(lm, probes)
    cache: dict[tuple[str, str], str] = {}
    if resume is not None and (Path(resume) / DISTILL_FILE).is_file():
        for line in (Path(resume) / DISTILL_FILE).read_text().splitlines():
            row = json.loads(line)
            cache[(row["sha256"], row["prompt"])] = row["reply"]
    distill_targets(lm, [ph for _, ph in p.retain_train], settings, cache, opts.eval_batch)
    before = identity_eval(lm, p, opts)
    timings["before_s"] = time.perf_counter() - t0

    retain_samples = [
        _image_sample(ph, pool.name or "", q, cache[(ph.sha256, q)], tag=f"retain{j}")
        for pool, ph in p.retain_train
        for j, q in enumerate(settings.distill_prompts)
    ]
    forget_samples = [
        _image_sample(ph, person.name, IDENTITY_PROMPTS[0], "", tag="forget")
        for person in p.people
        for ph in p.train[person.name]
    ]

    # the request's strangers: NCU's calibration with ``calibrate_strangers`` and the stranger options
    # (docs/method.md); each photo its own unknown person
    stranger_samples = [_image_sample(ph, f"stranger/{ph.sha256[:16]}", tag="stranger") for ph in p.strangers]

    t0 = time.perf_counter()
    method_cls = get_method("cvf_ncu")
    method = method_cls(method_config(settings, record))
    ucfg = settings.unlearn_config(opts.cache_dir)
    if resume is None:
        lm = attach_adapters(lm, retain_samples, ucfg, method_cls, stranger_samples)
    else:
        lm = _attach_saved(lm, Path(resume) / "adapter", record)
    history = unlearn_stage(lm, method, forget_samples, retain_samples, ucfg, desc="forget", strangers=stranger_samples)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    after = identity_eval(lm, p, opts)
    logits_after = text_logits(lm, probes)
    timings["after_s"] = time.perf_counter() - t0

    requests = [{"path": str(r.source.resolve()), "photos": h} for r, h in zip(p.requests, p.request_hashes)]
    rec = run_record(
        ucfg,
        method,
        history,
        lm,
        forget={
            "settings": asdict(settings),
            "requests": requests,
            "resumed_from": str(resume) if resume else None,
            "heldout": {name: [str(ph.path) for ph in phs] for name, phs in p.heldout.items()},
            "people": [person.name for person in p.people],
        },
    )
    with atomic_dir(out) as tmp:  # everything below lands in ``out`` only if all of it succeeds
        lm.model.save_pretrained(tmp / "adapter")
        (tmp / RUN_FILE).write_text(json.dumps(rec, indent=2, sort_keys=True, default=str))
        with open(tmp / DISTILL_FILE, "w") as fh:
            for (sha, q), r in sorted(cache.items()):
                fh.write(json.dumps({"sha256": sha, "prompt": q, "reply": r}) + "\n")
        t0 = time.perf_counter()
        checks = {}
        if opts.checks or opts.merge:
            checks = robustness_checks(lm, p, opts, retain_samples, settings, merged_dir=tmp / "merged")
        timings["checks_s"] = time.perf_counter() - t0
        report = build_report(p, settings, opts, before, after, probes, logits_before, logits_after, checks)
        timings["total_s"] = time.perf_counter() - t_start
        report["timings"] = {k: round(v, 1) for k, v in timings.items()}
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2))
        (tmp / REPORT_MD).write_text(markdown_report(report))
        plot_report(report, tmp / REPORT_PNG)
    return report


def _attach_saved(lm: LoadedModel, adapter: Path, record: dict) -> LoadedModel:
    """RUN's adapter on the base model: B trainable, A frozen again (null / random subspace)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(lm.model, str(adapter), is_trainable=True)
    subspace = record.get("resolved", {}).get("subspace", "null")
    if subspace in ("null", "random"):
        frozen = frozenset(n for n, _ in model.named_parameters() if ".lora_A." in n)
        setattr(model, FROZEN_ATTR, frozen)
        refreeze(model)
    resolved = record.get("resolved", {})
    adapters = {k: resolved[k] for k in ("rank", "lora_rank") if k in resolved} or None
    return LoadedModel(model, lm.processor, lm.arch, adapters=adapters)


# -- the report ----------------------------------------------------------------------------------
def build_report(
    p: Plan,
    settings: ForgetSettings,
    opts: ReportOptions,
    before: dict,
    after: dict,
    probes: list[str],
    logits_before: list[torch.Tensor],
    logits_after: list[torch.Tensor],
    checks: dict[str, Any],
) -> dict[str, Any]:
    prompts = list(opts.identity_prompts)
    people = []
    for person in p.people:
        rows, lab_b, lab_a = [], [], []
        for ph, rb, ra in zip(p.heldout[person.name], before["people"][person.name], after["people"][person.name]):
            for q, b, a in zip(prompts, rb, ra):
                cb, ca = classify(b, person.name, p.known_names), classify(a, person.name, p.known_names)
                lab_b.append(cb)
                lab_a.append(ca)
                rows.append(
                    {"photo": str(ph.path), "prompt": q, "before": b, "after": a, "before_class": cb, "after_class": ca}
                )
        people.append(
            {
                "name": person.name,
                "train_photos": len(p.train[person.name]),
                "heldout_photos": len(p.heldout[person.name]),
                "before": _rates(lab_b),
                "after": _rates(lab_a),
                "replies": rows,
            }
        )

    rprompts = before["retain_prompts"]
    agree, total = 0, 0
    named: dict[str, dict[str, list[str]]] = {}
    examples = []
    for (pool, ph), rb, ra in zip(p.retain_eval, before["retain"], after["retain"]):
        for q, b, a in zip(rprompts, rb, ra):
            agree += _normalise(b) == _normalise(a)
            total += 1
            if pool.name and q in prompts:
                d = named.setdefault(pool.name, {"before": [], "after": []})
                d["before"].append(classify(b, pool.name, p.known_names))
                d["after"].append(classify(a, pool.name, p.known_names))
            if len(examples) < 12 and q in prompts:
                examples.append({"photo": str(ph.path), "name": pool.name, "prompt": q, "before": b, "after": a})
    retain_people = [{"name": n, "before": _rates(d["before"]), "after": _rates(d["after"])} for n, d in named.items()]
    all_b = [c for d in named.values() for c in d["before"]]
    all_a = [c for d in named.values() for c in d["after"]]
    retain = {
        "images": len(p.retain_eval),
        "heldout": not p.retain_eval_seen,
        "prompts": rprompts,
        "reply_agreement": agree / max(1, total),
        "people": retain_people,
        "name_recall_before": _rates(all_b)["named"] if all_b else None,
        "name_recall_after": _rates(all_a)["named"] if all_a else None,
        "examples": examples,
    }

    def anyone(rows: list[list[str]]) -> float | None:
        labels = [classify(r, None, p.known_names) for row in rows for r in row]
        return _rates(labels)["misidentified"] if labels else None

    strangers = {
        "images": len(p.strangers),
        "named_someone_before": anyone(before["strangers"]),
        "named_someone_after": anyone(after["strangers"]),
    }
    diffs = [
        float((a - b).abs().max()) if a.shape == b.shape else float("inf") for a, b in zip(logits_before, logits_after)
    ]
    text = {
        "prompts": probes,
        "identical": all(torch.equal(a, b) for a, b in zip(logits_before, logits_after)),
        "max_abs_diff": max(diffs) if diffs else 0.0,
    }
    forget_after = [c for person in people for c in (r["after_class"] for r in person["replies"])]
    forget_before = [c for person in people for c in (r["before_class"] for r in person["replies"])]
    return {
        "model": settings.model,
        "identity_prompts": prompts,
        "known_names": p.known_names,
        "requests": [str(r.source) for r in p.requests],
        "dropped_from_retain": p.dropped_retain,
        "summary": {
            "forget_named_before": _rates(forget_before)["named"],
            "forget_named_after": _rates(forget_after)["named"],
            "forget_misidentified_after": _rates(forget_after)["misidentified"],
            "retain_name_recall_before": retain["name_recall_before"],
            "retain_name_recall_after": retain["name_recall_after"],
            "retain_reply_agreement": retain["reply_agreement"],
            "text_logits_identical": text["identical"],
        },
        "people": people,
        "retain": retain,
        "strangers": strangers,
        "text_only": text,
        "checks": checks,
        "settings": asdict(settings),
    }


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _cell(text: str, n: int = 80) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return (text[:n] + "…") if len(text) > n else (text or "(empty)")


def markdown_report(r: dict[str, Any]) -> str:
    s = r["summary"]
    lines = [
        f"# Deletion report — {r['model']}",
        "",
        f"Requests: {', '.join(r['requests'])}. A reply *names* a person when it contains the full name or "
        "the surname (case-insensitive); *misidentified* means it names someone else the model knows "
        f"({len(r['known_names'])} names: the request's and `--known-names`).",
        "",
        "## Summary",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| forgotten people named (held-out photos) | {_pct(s['forget_named_before'])} | "
        f"{_pct(s['forget_named_after'])} |",
        f"| forgotten people misidentified | – | {_pct(s['forget_misidentified_after'])} |",
        f"| retain people named | {_pct(s['retain_name_recall_before'])} | {_pct(s['retain_name_recall_after'])} |",
        f"| retain replies equal to the reference | 100% | {_pct(s['retain_reply_agreement'])} |",
        f"| text-only logits bit-identical | – | {'yes' if s['text_logits_identical'] else 'NO'} |",
        "",
        "## Per person (held-out photos)",
        "",
        "| person | held out | named before | named after | misidentified after | neither after |",
        "|---|---|---|---|---|---|",
    ]
    for p in r["people"]:
        lines.append(
            f"| {p['name']} | {p['heldout_photos']} | {_pct(p['before']['named'])} | "
            f"{_pct(p['after']['named'])} | {_pct(p['after']['misidentified'])} | "
            f"{_pct(p['after']['neither'])} |"
        )
    lines += [
        "",
        "## Retain",
        "",
        f"{r['retain']['images']} {'held-out' if r['retain']['heldout'] else 'training (none held out)'} "
        f"retain images; reply agreement with the reference model over {len(r['retain']['prompts'])} prompts: "
        f"{_pct(r['retain']['reply_agreement'])}.",
        "",
    ]
    if r["retain"]["people"]:
        lines += ["| retain person | named before | named after |", "|---|---|---|"]
        lines += [
            f"| {p['name']} | {_pct(p['before']['named'])} | {_pct(p['after']['named'])} |"
            for p in r["retain"]["people"]
        ]
    st = r["strangers"]
    if st["images"]:
        lines += [
            "",
            f"Strangers ({st['images']} images): a known name given in {_pct(st['named_someone_before'])} "
            f"of replies before, {_pct(st['named_someone_after'])} after.",
        ]
    t = r["text_only"]
    lines += [
        "",
        "## Text-only knowledge",
        "",
        f"{len(t['prompts'])} probe prompts: logits {'bit-identical' if t['identical'] else 'CHANGED'} "
        f"(max |diff| {t['max_abs_diff']:.3g}). Only the vision tower and projector carry adapters, so text "
        "the model reads without an image goes through unchanged weights.",
    ]
    if r["checks"]:
        lines += [
            "",
            "## Robustness checks (merged copy)",
            "",
            "| check | forgotten named | misidentified | retain named | what |",
            "|---|---|---|---|---|",
        ]
        for name, c in r["checks"].items():
            lines.append(
                f"| {name} | {_pct(c['forget_named'])} | {_pct(c['forget_misidentified'])} | "
                f"{_pct(c.get('retain_named'))} | {c['what']} |"
            )
    lines += ["", "## Replies on held-out photos", ""]
    for p in r["people"]:
        lines += [f"### {p['name']}", "", "| photo | prompt | before | after |", "|---|---|---|---|"]
        lines += [
            f"| {Path(x['photo']).name} | {x['prompt']} | {_cell(x['before'])} ({x['before_class']}) | "
            f"{_cell(x['after'])} ({x['after_class']}) |"
            for x in p["replies"]
        ]
        lines.append("")
    if r["retain"]["examples"]:
        lines += ["### Retain examples", "", "| photo | name | prompt | before | after |", "|---|---|---|---|---|"]
        lines += [
            f"| {Path(x['photo']).name} | {x['name'] or ''} | {x['prompt']} | {_cell(x['before'])} | "
            f"{_cell(x['after'])} |"
            for x in r["retain"]["examples"]
        ]
    if r["dropped_from_retain"]:
        lines += ["", "Left out of the retain pool: " + "; ".join(r["dropped_from_retain"])]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in r.get("timings", {}).items()), ""]
    return "\n".join(lines)


def plot_report(r: dict[str, Any], path: Path) -> None:
    """Bars: per forgotten person named / misidentified before and after; retain recall and agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [p["name"] for p in r["people"]]
    groups = [
        [p["before"]["named"] for p in r["people"]],
        [p["after"]["named"] for p in r["people"]],
        [p["after"]["misidentified"] for p in r["people"]],
    ]
    s = r["summary"]
    if s["retain_name_recall_before"] is not None:
        labels.append("retain people")
        groups[0].append(s["retain_name_recall_before"])
        groups[1].append(s["retain_name_recall_after"])
        groups[2].append(0.0)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) + 2), 3.8))
    width = 0.27
    for k, (vals, name) in enumerate(zip(groups, ["named before", "named after", "misidentified after"])):
        ax.bar([i + (k - 1) * width for i in range(len(labels))], [100 * v for v in vals], width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("% of replies (held-out photos)")
    ax.set_ylim(0, 105)
    ax.set_title(
        f"Deletion report — retain reply agreement {_pct(s['retain_reply_agreement'])}, text logits "
        f"{'identical' if s['text_logits_identical'] else 'CHANGED'}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
