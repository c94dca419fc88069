"""The tables, figures, claims and JSON of ``mllm-unlearn paper``, built from its job results.

Every number is the mean over the reporting seeds with the half-width of the 95 % Student-t interval
(:func:`mllm_unlearn.experiments.audit.mean_ci`; one seed: the mean alone). A claim of the paper is
checked by the per-seed (paired) difference of two rows: ``agrees`` when its mean has the paper's sign,
``agrees (CI excludes 0)`` when the whole interval has it; ``contradicts`` likewise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..evaluate.harness import TABLE_COLUMNS
from ..methods import get_method
from .ablations import ABLATIONS
from .audit import mean_ci
from .paper import (
    ALPHA,
    BETA,
    EXPERIMENTS,
    OURS,
    SCHEMA,
    TITLES,
    VQA,
    PaperConfig,
    _default_cvf,
    _seed_tag,
    _sweep,
    _vanilla_job,
    run_job,
)

Records = dict[str, dict[str, Any]]
#: the columns of Figure 5, and what each is
CASE_KEYS = {"forget_vqa": "Forget VQA", "forget_qa": "Forget QA", "retain_vqa": "Retain VQA", "retain_qa": "Retain QA"}


def _seeds(cfg: PaperConfig) -> list[int | None]:
    return [None] if cfg.real is not None else list(cfg.report_seeds)


def _stat(values: list[float]) -> dict[str, Any]:
    return {**mean_ci(values), "values": values}


def _row(records: Records, names: list[str], key: str = "metrics") -> dict[str, Any] | None:
    """Per metric mean / ci95 / n / values over the seeds' jobs (None if a job is missing)."""
    if any(n not in records for n in names):
        return None
    per_seed = [records[n]["result"][key] for n in names]
    keys = sorted({k for m in per_seed for k in m if isinstance(m[k], (int, float))})
    return {k: _stat([float(m.get(k, math.nan)) for m in per_seed]) for k in keys}


def _cell(stat: dict[str, Any] | None, percent: bool = True, digits: int = 1) -> str:
    if not stat or math.isnan(stat["mean"]):
        return "–"
    scale = 100 if percent else 1
    out = f"{scale * stat['mean']:.{digits}f}"
    return out if math.isnan(stat["ci95"]) else out + f" ± {scale * stat['ci95']:.{digits}f}"


def metric_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per entry, MCQ accuracies in %, ROUGE-L as fractions, mean ± 95 % CI."""
    cols = [(k, h) for k, h in TABLE_COLUMNS if any(k in r for r in rows.values())]
    lines = ["| method | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [_cell(r.get(k), percent="rougeL" not in k, digits=3 if "rougeL" in k else 1) for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _names(cfg: PaperConfig, make) -> list[str]:
    return [make(seed).name for seed in _seeds(cfg)]


def _forget(cfg: PaperConfig, experiment: str) -> str | None:
    return {"tab4": cfg.forgets[1], "tab5": cfg.forgets[2]}.get(experiment, cfg.forgets[0])


def table_rows(cfg: PaperConfig, experiment: str, records: Records) -> dict[str, dict[str, Any]] | None:
    """{row label: aggregated metrics} of a metric table, None when a job is missing."""
    forget = _forget(cfg, experiment)
    if forget is None:
        return None
    case = forget == cfg.forgets[0]

    def run(method, **kw):
        return _row(records, _names(cfg, lambda s: run_job(s, forget, method, case=case, **kw)))

    rows: dict[str, Any] = {"vanilla": _row(records, _names(cfg, lambda s: _vanilla_job(s, forget, case)))}
    if experiment in ("tab1", "tab4", "tab5"):
        rows.update({m: run(m) for m in cfg.all_methods()})
    elif experiment == "tab8":
        rows.update({"siu (adapted)": run("siu"), f"{OURS} (ours)": run(OURS)})
    elif experiment == "tab2":
        for label in cfg.ablations:
            driver, options = ABLATIONS[label]
            rows[label] = run(OURS, subspace=driver.get("subspace"), options=options)
    elif experiment == "tab6":
        for m in cfg.visual_baselines:
            rows[f"{m} ({get_method(m).default_scope}, its default)"] = run(m)
            rows[f"{m} (visual only)"] = run(m, scope="visual")
        rows[f"{OURS} (ours, visual)"] = run(OURS)
    elif experiment == "tab9":
        default_scope = get_method(OURS).default_scope
        label = {"projector": "projector only", "visual": "vision tower + projector", "all": "all (LLM unfrozen)"}
        for s in cfg.scopes:
            name = label.get(s, s) + (" (ours)" if s == default_scope else "")
            rows[name] = run(OURS, scope=None if s == default_scope else s)
    if any(r is None for r in rows.values()):
        return None
    return rows


def _write(work: Path, name: str, text: str) -> None:
    (work / name).write_text(text.rstrip() + "\n")


def _header(cfg: PaperConfig, experiment: str, selection: dict[str, Any]) -> str:
    seeds = "the given data (one run: no interval)" if cfg.real else f"reporting worlds {list(cfg.report_seeds)}"
    sel = ", ".join(f"{k}={v:g}" for k, v in selection["selected"].items()) or "the method's defaults"
    return (
        f"# {TITLES[experiment]}\n\nMean ± 95 % CI half-width over {seeds}; MCQ accuracy in %, "
        f"ROUGE-L as a fraction. {OURS} with {sel} ({selection['source']}).\n\n"
    )


# -- Table 7 -----------------------------------------------------------------------------------------


def time_rows(cfg: PaperConfig, records: Records) -> dict[str, dict[str, Any]] | None:
    forget = cfg.forgets[0]
    rows = {}
    for m in cfg.all_methods():
        names = _names(cfg, lambda s, m=m: run_job(s, forget, m, case=True))
        if any(n not in records for n in names):
            return None
        res = [records[n]["result"] for n in names]
        per_epoch = [r["unlearn_s"] / r["epochs"] if r["epochs"] else math.nan for r in res]
        rows[m] = {
            "unlearn_s": _stat([r["unlearn_s"] for r in res]),
            "epochs": _stat([r["epochs"] for r in res]),
            "s_per_epoch": _stat(per_epoch),
            "steps": res[0]["steps"],
            "scope": res[0]["scope"],
            "trains": res[0]["trains"],
        }
    return rows


def time_table(rows: dict[str, Any], projection: dict[str, Any] | None) -> str:
    head = "| method | scope | unlearning wall time (s) | epochs | s per epoch |"
    sep = "|---|---|---|---|---|"
    base = projection["costs"].get("ga_diff") if projection else None
    if projection:
        head += f" {projection['model']} TFLOP/step (projected) | × ga_diff |"
        sep += "---|---|"
    lines = [head, sep]
    for m, r in rows.items():
        per_epoch = _cell(r["s_per_epoch"], percent=False, digits=2) if r["trains"] else "– (one-off edit)"
        line = (
            f"| {m} | {r['scope']} | {_cell(r['unlearn_s'], percent=False, digits=2)} | "
            f"{_cell(r['epochs'], percent=False, digits=2)} | {per_epoch} |"
        )
        if projection:
            c = projection["costs"].get(m)
            line += (
                f" {c['tflop_per_step']:.1f} | {c['tflop_per_step'] / base['tflop_per_step']:.2f} |"
                if c and base
                else " – | – |"
            )
        lines.append(line)
    return "\n".join(lines)


# -- Figures 2 and 3 ---------------------------------------------------------------------------------


def continual_data(cfg: PaperConfig, records: Records) -> dict[str, Any] | None:
    forget = next(f for f in reversed(cfg.forgets) if f is not None)
    out = {}
    for m in cfg.continual_methods:
        names = [f"{_seed_tag(s)}/continual/{forget}/{m}" for s in _seeds(cfg)]
        if any(n not in records for n in names):
            return None
        mats = [records[n]["result"]["matrix"] for n in names]
        n_st = len(mats[0]["stages"])
        cumulative = [
            [sum(mt["stages"][i]["forget_vqa_per_task"][: i + 1]) / (i + 1) for i in range(n_st)] for mt in mats
        ]
        out[m] = {
            "forget_cumulative": [_stat([c[i] for c in cumulative]) for i in range(n_st)],
            "retain_vqa": [_stat([mt["stages"][i]["retain_vqa"] for mt in mats]) for i in range(n_st)],
            "real_vqa": [_stat([mt["stages"][i]["real_vqa"] for mt in mats]) for i in range(n_st)],
            "grid": [
                [_stat([mt["stages"][s]["forget_vqa_per_task"][t] for mt in mats]) for s in range(n_st)]
                for t in range(len(mats[0]["tasks"]))
            ],
            "before": {k: _stat([mt["before"][k] for mt in mats]) for k in VQA},
            "replay": mats[0]["replay"],
        }
    return out


def continual_tables(data: dict[str, Any]) -> tuple[str, str]:
    n_st = len(next(iter(data.values()))["retain_vqa"])
    head = "| method | metric | before | " + " | ".join(f"stage {i + 1}" for i in range(n_st)) + " |"
    lines = [head, "|---" * (n_st + 3) + "|"]
    for m, d in data.items():
        for key, label, before in (
            ("forget_cumulative", "Forget VQA, tasks so far ↓", "forget_vqa"),
            ("retain_vqa", "Retain VQA ↑", "retain_vqa"),
            ("real_vqa", "Real VQA ↑", "real_vqa"),
        ):
            lines.append(
                f"| {m} | {label} | {_cell(d['before'][before])} | " + " | ".join(_cell(x) for x in d[key]) + " |"
            )
    fig2 = "\n".join(lines)
    parts = []
    for m, d in data.items():
        parts.append(f"### {m}\n\n| task \\ after stage | " + " | ".join(str(i + 1) for i in range(n_st)) + " |")
        parts.append("|---" * (n_st + 1) + "|")
        parts += [f"| T{t + 1} | " + " | ".join(_cell(x) for x in row) + " |" for t, row in enumerate(d["grid"])]
        parts.append("")
    return fig2, "\n".join(parts)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(stats: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    return [100 * s["mean"] for s in stats], [0.0 if math.isnan(s["ci95"]) else 100 * s["ci95"] for s in stats]


def plot_continual(data: dict[str, Any], work: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(
        axes,
        (
            ("forget_cumulative", "(a) Forget VQA, tasks so far ↓"),
            ("retain_vqa", "(b) Retain VQA ↑"),
            ("real_vqa", "(c) Real-world VQA ↑"),
        ),
    ):
        for m, d in data.items():
            y, e = _err(d[key])
            ax.errorbar(range(1, len(y) + 1), y, yerr=e, marker="o", capsize=3, label=m)
        ax.set_title(title)
        ax.set_xlabel("unlearning stage (task)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 105)
        ax.set_xticks(range(1, len(y) + 1))
    axes[0].legend()
    fig.suptitle("Figure 2: continual unlearning (mean ± 95 % CI over seeds)")
    fig.tight_layout()
    fig.savefig(work / "fig2.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.8), squeeze=False)
    for ax, (m, d) in zip(axes[0], data.items()):
        grid = [[s["mean"] for s in row] for row in d["grid"]]
        im = ax.imshow(grid, cmap="Blues", vmin=0, vmax=1)
        for t, row in enumerate(grid):
            for s, v in enumerate(row):
                ax.text(s, t, f"{100 * v:.0f}", ha="center", va="center", color="white" if v > 0.6 else "black")
        ax.set_xticks(range(len(grid[0])), [str(i + 1) for i in range(len(grid[0]))])
        ax.set_yticks(range(len(grid)), [f"T{t + 1}" for t in range(len(grid))])
        ax.set_xlabel("unlearning stage")
        ax.set_ylabel("task evaluated")
        ax.set_title(m)
    fig.colorbar(im, ax=list(axes[0]))
    fig.suptitle("Figure 3: Forget VQA (%) per task after each stage (mean over seeds)")
    fig.savefig(work / "fig3.png", dpi=110)
    plt.close(fig)


# -- Figure 4 ----------------------------------------------------------------------------------------


def sweep_data(cfg: PaperConfig, records: Records) -> dict[str, Any] | None:
    default = _default_cvf()
    main = cfg.forgets[0]
    out = {}
    for key, values in ((ALPHA, cfg.alphas), (BETA, cfg.betas)):
        pts = {}
        for v in _sweep(values, getattr(default, key)):
            opts = {} if v == float(getattr(default, key)) else {key: v}
            row = _row(records, _names(cfg, lambda s, o=opts: run_job(s, main, OURS, options=o, case=True)))
            if row is None:
                return None
            pts[f"{v:g}"] = {k: row[k] for k in VQA}
        out[key] = {"default": float(getattr(default, key)), "points": pts}
    return out


def sweep_table(data: dict[str, Any]) -> str:
    lines = []
    for key, d in data.items():
        sym = {"alpha": "α", "ret_weight": "β"}.get(key, key)
        lines += [
            f"### {sym} (`{key}`; default {d['default']:g})",
            "",
            "| value | Forget VQA ↓ | Retain VQA ↑ | Real VQA ↑ |",
        ]
        lines.append("|---|---|---|---|")
        for v, m in d["points"].items():
            lines.append(f"| {v} | " + " | ".join(_cell(m[k]) for k in VQA) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_sweep(data: dict[str, Any], work: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 3.8), squeeze=False)
    for ax, (key, d) in zip(axes[0], data.items()):
        xs = [float(v) for v in d["points"]]
        for k, label in zip(VQA, ("Forget VQA ↓", "Retain VQA ↑", "Real-world VQA ↑")):
            y, e = _err([m[k] for m in d["points"].values()])
            ax.errorbar(xs, y, yerr=e, marker="o", capsize=3, label=label)
        ax.axvline(d["default"], ls=":", color="grey")
        ax.set_xlabel({"alpha": "α (weight of L_CVF)", "ret_weight": "β (weight of L_RET)"}.get(key, key))
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 105)
    axes[0][0].legend()
    fig.suptitle("Figure 4: sensitivity to α and β (mean ± 95 % CI; dotted: default)")
    fig.tight_layout()
    fig.savefig(work / "fig4.png", dpi=110)
    plt.close(fig)


# -- Figure 5 ----------------------------------------------------------------------------------------


def case_data(cfg: PaperConfig, records: Records) -> dict[str, Any] | None:
    """Replies of the vanilla model and every method on the first reporting world's items."""
    seed, main = _seeds(cfg)[0], cfg.forgets[0]
    jobs = {"vanilla": _vanilla_job(seed, main, True)}
    jobs.update({m: run_job(seed, main, m, case=True) for m in cfg.all_methods()})
    if any(j.name not in records for j in jobs.values()):
        return None
    cases = {m: records[j.name]["result"]["case"] for m, j in jobs.items()}
    out: dict[str, list[dict[str, Any]]] = {}
    for key in CASE_KEYS:
        items = cases["vanilla"].get(key, [])
        out[key] = [
            {
                "id": it["id"],
                "question": it["question"],
                "answer": it["answer"],
                "replies": {m: c[key][i]["reply"] for m, c in cases.items()},
            }
            for i, it in enumerate(items)
        ]
    return {"seed": seed, "items": out}


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def case_markdown(data: dict[str, Any]) -> str:
    lines = []
    for key, label in CASE_KEYS.items():
        for it in data["items"][key]:
            lines += [f"### {label}: {_md(it['question'])}", "", f"Ground truth: {_md(it['answer'])}", ""]
            lines += ["| model | reply |", "|---|---|"]
            lines += [f"| {m} | {_md(r)} |" for m, r in it["replies"].items()]
            lines.append("")
    return "\n".join(lines)


def plot_cases(data: dict[str, Any], work: Path) -> None:
    plt = _plt()
    panels = [(label, data["items"][k][0]) for k, label in CASE_KEYS.items() if data["items"][k]]
    lines = 3 + len(panels[0][1]["replies"]) if panels else 3
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.6 + 0.17 * lines * len(panels)), squeeze=False)
    for ax, (label, it) in zip(axes[:, 0], panels):
        ax.axis("off")
        text = [f"{label}: {it['question'][:90]}", f"  ground truth: {str(it['answer'])[:90]}"]
        text += [f"  {m:<12} {str(r)[:90]}" for m, r in it["replies"].items()]
        ax.text(0, 1, "\n".join(text), va="top", ha="left", family="monospace", fontsize=8)
    fig.suptitle("Figure 5: replies of each method to the same items")
    fig.tight_layout()
    fig.savefig(work / "fig5.png", dpi=100)
    plt.close(fig)


# -- claims ------------------------------------------------------------------------------------------


def _paired(a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any]:
    """a - b per seed, aggregated."""
    return _diff_stat(a[metric], b[metric])


def _diff_stat(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    diffs = [x - y for x, y in zip(a["values"], b["values"])]
    return {**mean_ci(diffs), "a_mean": a["mean"], "b_mean": b["mean"]}


def _verdict(d: dict[str, Any], sign: int) -> str:
    """sign 1: the paper says A > B; -1: A < B; 0: A >= B (e.g. "keeps the vanilla's accuracy")."""
    m, h = d["mean"] * (sign or 1), d["ci95"]
    if math.isnan(m):
        return "n/a"
    sure = not math.isnan(h) and abs(d["mean"]) > h
    if sign == 0:
        return "agrees" if m >= 0 else ("contradicts (CI excludes 0)" if sure else "contradicts")
    if m > 0:
        return "agrees (CI excludes 0)" if sure else "agrees"
    if m < 0:
        return "contradicts (CI excludes 0)" if sure else "contradicts"
    return "tie"


def claims(tables: dict[str, Any], cont: dict[str, Any] | None, times: dict[str, Any] | None) -> list[dict]:
    """The paper's claims that the measured experiments can test, each with its verdict and numbers.
    A comparison (row A, row B, metric, sign): the paper says sign * (A - B) > 0."""
    specs: list[tuple[str, str, list[tuple[str, str, str, int]]]] = []
    t1, t2 = tables.get("tab1"), tables.get("tab2")
    ours = OURS
    if t1:
        others = [m for m in t1 if m not in ("vanilla", ours)]
        specs.append(
            ("tab1", "Ours has the lowest Forget VQA of all methods (Sec. 4.2)",
             [(m, ours, "forget_vqa", 1) for m in others])
        )  # fmt: skip
        specs.append(
            ("tab1", "Ours keeps Forget QA and Retain QA at the vanilla's (textual knowledge intact)",
             [(ours, "vanilla", k, 0) for k in ("forget_qa", "retain_qa")])
        )  # fmt: skip
        if "mmunlearner" in t1:
            specs.append(
                ("tab1", "Ours keeps more Retain VQA than MMUnlearner", [(ours, "mmunlearner", "retain_vqa", 1)])
            )
    if t2:
        rows = {k: k for k in t2}
        o = "CVF + NCU (ours)"
        checks = [
            ("push: L_nMSE (Eq. 5)", "The nMSE push forgets less than the CVF push", [("forget_vqa", 1)]),
            ("w/o L_CVF-pull (Eq. 6)", "Without the pull, Retain and Real-world VQA drop",
             [("retain_vqa", -1), ("real_vqa", -1)]),
            ("w/o L_RET (Eq. 9)", "Without L_RET, Retain VQA drops", [("retain_vqa", -1)]),
            ("w/o L_GUM (Eq. 10)", "Without L_GUM, Real-world VQA drops", [("real_vqa", -1)]),
            ("Full CVF-only (no subspace)", "NCU beats no subspace: lower Forget VQA, higher Retain and Real VQA",
             [("forget_vqa", 1), ("retain_vqa", -1), ("real_vqa", -1)]),
            ("CVF + Rand (random subspace)", "NCU beats a random one: lower Forget VQA, higher Retain and Real VQA",
             [("forget_vqa", 1), ("retain_vqa", -1), ("real_vqa", -1)]),
        ]  # fmt: skip
        for row, text, comps in checks:
            if row in rows and o in rows:
                specs.append(("tab2", text, [(row, o, k, s) for k, s in comps]))
    for e, pct in (("tab4", "10 %"), ("tab5", "15 %")):
        t = tables.get(e)
        if t:
            others = [m for m in t if m not in ("vanilla", ours)]
            specs.append((e, f"Ours has the lowest Forget VQA at {pct}", [(m, ours, "forget_vqa", 1) for m in others]))
    t6 = tables.get("tab6")
    if t6:
        for m in ("ga", "ga_diff"):
            own = next((r for r in t6 if r.startswith(f"{m} (") and "visual only" not in r), None)
            vis = f"{m} (visual only)"
            if own and vis in t6:
                specs.append(
                    ("tab6", f"{m} restricted to the visual module forgets more than at its default scope",
                     [(own, vis, "forget_vqa", 1)])
                )  # fmt: skip
                specs.append(
                    ("tab6", f"... but loses Retain and Real-world VQA (visual-only {m} vs ours)",
                     [(f"{ours} (ours, visual)", vis, k, 1) for k in ("retain_vqa", "real_vqa")])
                )  # fmt: skip
    t8 = tables.get("tab8")
    if t8:
        specs.append(
            ("tab8", "Ours: lower Forget VQA, higher Retain VQA and Retain QA than SIU",
             [("siu (adapted)", f"{ours} (ours)", "forget_vqa", 1),
              (f"{ours} (ours)", "siu (adapted)", "retain_vqa", 1),
              (f"{ours} (ours)", "siu (adapted)", "retain_qa", 1)])
        )  # fmt: skip
    t9 = tables.get("tab9")
    if t9:
        vis = next((r for r in t9 if r.endswith("(ours)")), None)
        if vis and "projector only" in t9:
            specs.append(("tab9", "Projector-only forgets less", [("projector only", vis, "forget_vqa", 1)]))
        if vis and "all (LLM unfrozen)" in t9:
            specs.append(
                ("tab9", "Unfreezing the LLM costs retained textual knowledge and general utility",
                 [(vis, "all (LLM unfrozen)", k, 1) for k in ("retain_qa", "forget_qa", "real_vqa")])
            )  # fmt: skip
    out = []
    for exp, text, comps in specs:
        table = tables[exp]
        results = []
        for a, b, metric, sign in comps:
            d = _paired(table[a], table[b], metric)
            results.append({"a": a, "b": b, "metric": metric, "sign": sign, **d, "verdict": _verdict(d, sign)})
        out.append({"experiment": exp, "claim": text, "comparisons": results, "verdict": _overall(results)})
    if cont and OURS in cont:
        others = [m for m in cont if m != OURS]
        comps = []
        # the paper: the others forget less (A - B > 0 on forget) and keep less (A - B < 0 on retain / real)
        for m in others:
            for key, sign in (("forget_cumulative", 1), ("retain_vqa", -1), ("real_vqa", -1)):
                d = _diff_stat(cont[m][key][-1], cont[OURS][key][-1])
                comps.append(
                    {
                        "a": m,
                        "b": OURS,
                        "metric": f"{key} (last stage)",
                        "sign": sign,
                        **d,
                        "verdict": _verdict(d, sign),
                    }
                )
        out.append({
            "experiment": "fig2",
            "claim": "In continual unlearning ours forgets more and degrades Retain / Real VQA less than "
            + ", ".join(others),
            "comparisons": comps,
            "verdict": _overall(comps),
        })  # fmt: skip
    if times and OURS in times:
        trained = [m for m, r in times.items() if r["trains"] and m != OURS]
        comps = []
        for m in trained:
            d = _diff_stat(times[m]["s_per_epoch"], times[OURS]["s_per_epoch"])
            comps.append({"a": m, "b": OURS, "metric": "s_per_epoch", "sign": 1, **d, "verdict": _verdict(d, 1)})
        out.append({
            "experiment": "tab7",
            "claim": "Ours is efficient: less time per epoch than the trained baselines (App. D.3)",
            "comparisons": comps,
            "verdict": _overall(comps),
        })  # fmt: skip
    return out


def _overall(results: list[dict]) -> str:
    v = [r["verdict"] for r in results]
    if not v:
        return "n/a"
    if all(x.startswith("agrees") for x in v):
        return "agrees"
    if all(x.startswith("contradicts") for x in v):
        return "contradicts"
    if all(x == "tie" for x in v):
        return "no difference"
    return f"partly ({sum(x.startswith('agrees') for x in v)} of {len(v)} comparisons agree)"


_SAYS = {1: "A > B", -1: "A < B", 0: "A ≥ B"}


def claims_markdown(items: list[dict]) -> str:
    lines = [
        "# The paper's claims against our measurement",
        "",
        "Each comparison: the per-seed difference A − B (mean ± 95 % CI); the paper's direction is given by its sign.",
        "",
    ]
    for c in items:
        lines += [f"## {c['experiment']}: {c['claim']} — **{c['verdict']}**", ""]
        lines += ["| A | B | metric | A | B | A − B | paper says | verdict |", "|---|---|---|---|---|---|---|---|"]
        for r in c["comparisons"]:
            pct = r["metric"] != "s_per_epoch"
            scale = 100 if pct else 1
            diff = _cell({"mean": r["mean"], "ci95": r["ci95"]}, percent=pct, digits=1 if pct else 2)
            digits = 1 if pct else 2
            lines.append(
                f"| {r['a']} | {r['b']} | {r['metric']} | {scale * r['a_mean']:.{digits}f} | "
                f"{scale * r['b_mean']:.{digits}f} | {diff} | {_SAYS[r['sign']]} | "
                f"{r['verdict']} |"
            )
        lines.append("")
    return "\n".join(lines)


# -- everything --------------------------------------------------------------------------------------


def write_outputs(
    work: Path,
    cfg: PaperConfig,
    experiments: tuple[str, ...],
    records: Records,
    selection: dict[str, Any],
    timings: dict[str, Any],
) -> dict[str, Any]:
    """Write every output whose jobs are all finished (the requested ones always are); return
    ``results.json``'s content."""
    written: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    # also outputs of experiments finished in an earlier call (their records are on disk)
    from .paper import JobStore, experiment_jobs, job_settings

    store = JobStore(work)
    for e in EXPERIMENTS:
        if e in experiments:
            continue
        for j in experiment_jobs(cfg, e):
            if j.name in records:
                continue
            rec = store.peek(j)
            if rec is not None and rec["hash"] == _hash(job_settings(cfg, j, selection["selected"])):
                records[j.name] = rec

    for e in ("tab1", "tab2", "tab4", "tab5", "tab6", "tab8", "tab9"):
        rows = table_rows(cfg, e, records)
        if rows is None:
            continue
        tables[e] = rows
        _write(work, f"{e}.md", _header(cfg, e, selection) + metric_table(rows))
        written[e] = {"rows": rows}
    times = time_rows(cfg, records)
    if times is not None:
        proj = records.get("projection/llava-1.5-7b", {}).get("result")
        note = (
            "\n\nWall time of each unlearning run (adapters, NCU calibration, setup and the steps; the "
            "evaluation excluded) divided by its epochs over the forget set's training pairs "
            "(steps × batch size / forget pairs); every method runs the same steps. MANU edits once."
        )
        if proj:
            note += " The last columns are the cost module's FLOP projection of one step at the paper's scale."
        _write(work, "tab7.md", _header(cfg, "tab7", selection) + time_table(times, proj) + note)
        written["tab7"] = {"rows": times, "projection": proj}
    cont = continual_data(cfg, records)
    if cont is not None:
        fig2, fig3 = continual_tables(cont)
        _write(work, "fig2.md", _header(cfg, "fig2", selection) + fig2)
        _write(work, "fig3.md", _header(cfg, "fig3", selection) + fig3)
        plot_continual(cont, work)
        written["fig2"] = written["fig3"] = {"methods": cont}
    sweep = sweep_data(cfg, records)
    if sweep is not None:
        _write(work, "fig4.md", _header(cfg, "fig4", selection) + sweep_table(sweep))
        plot_sweep(sweep, work)
        written["fig4"] = sweep
    cases = case_data(cfg, records)
    if cases is not None:
        _write(work, "fig5.md", _header(cfg, "fig5", selection) + case_markdown(cases))
        plot_cases(cases, work)
        written["fig5"] = cases
    found = claims(tables, cont, times)
    _write(work, "claims.md", claims_markdown(found))
    results = {
        "schema": SCHEMA,
        "seeds": {"report": list(cfg.report_seeds), "validation": list(cfg.validation_seeds)}
        if cfg.real is None
        else {"report": ["data"]},
        "selection": selection["selected"],
        "experiments": written,
        "claims": found,
        "timings": timings,
    }
    (work / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    return results


def _hash(settings: dict[str, Any]) -> str:
    from .paper import settings_hash

    return settings_hash(settings)
