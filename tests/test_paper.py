"""``mllm-unlearn paper --quick``: every table, figure and key of the plan; a second call skips every job;
a changed setting (or method default) is refused; the validation search never touches a reporting world."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from mllm_unlearn.cli.paper import add_parser, read_selection
from mllm_unlearn.experiments.paper import (
    EXPERIMENTS,
    PaperConfig,
    Selection,
    SettingsChanged,
    choose,
    plan,
    quick_config,
)
from mllm_unlearn.methods import get_method
from mllm_unlearn.methods.cvf_ncu import CVFConfig

TABLES = ("tab1", "tab2", "tab4", "tab5", "tab6", "tab7", "tab8", "tab9")
FIGURES = ("fig2", "fig3", "fig4", "fig5")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["paper", *argv])
    return args.fn(args)


def test_choose_rule():
    vanilla = {"forget_vqa": 1.0, "retain_vqa": 1.0, "real_vqa": 1.0}
    cands = {
        0.5: {"forget_vqa": 0.5, "retain_vqa": 1.0, "real_vqa": 1.0},
        1.0: {"forget_vqa": 0.3, "retain_vqa": 0.99, "real_vqa": 0.96},
        3.0: {"forget_vqa": 0.1, "retain_vqa": 0.90, "real_vqa": 1.0},  # forgets most, loses retain VQA
    }
    pick = choose(cands, vanilla, Selection())
    assert pick["value"] == 1.0 and pick["admissible"] == [0.5, 1.0] and not pick["fallback"]
    none_ok = {v: {**m, "retain_vqa": 0.5} for v, m in cands.items()}
    assert choose(none_ok, vanilla, Selection())["fallback"]


def test_plan_keeps_validation_and_reporting_worlds_apart():
    cfg = PaperConfig()
    jobs = plan(cfg)
    search = [j for j in jobs if j.kind == "run" and not j.selected and j.params["method"] == "cvf_ncu"]
    assert search and {j.seed for j in search} == set(cfg.validation_seeds)
    reporting = [j for j in jobs if j.kind in ("run", "continual")]
    assert {j.seed for j in reporting if j.selected} == set(cfg.report_seeds)
    assert len({j.name for j in jobs}) == len(jobs)
    with pytest.raises(ValueError, match="both reporting and validation"):
        PaperConfig(report_seeds=(0, 3))


def test_quick_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_UNLEARN_CACHE", str(tmp_path / "ncu"))
    out = tmp_path / "paper"
    assert _cli("--quick", "--out", str(out)) == 0
    assert not (tmp_path / "paper.partial").exists()
    for name in TABLES:
        text = (out / f"{name}.md").read_text()
        assert text.startswith("# Table") and "|---" in text
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 1000
        assert (out / f"{name}.md").read_text().startswith("# Figure")
    assert "## tab2" in (out / "claims.md").read_text()

    results = json.loads((out / "results.json").read_text())
    assert set(results["experiments"]) == set(EXPERIMENTS)
    cfg = quick_config()
    tab1 = results["experiments"]["tab1"]["rows"]
    assert set(tab1) == {"vanilla", *cfg.methods}
    for stat in (tab1["cvf_ncu"]["forget_vqa"], tab1["ga"]["retain_vqa"]):
        assert set(stat) >= {"mean", "ci95", "n", "values"} and stat["n"] == len(cfg.report_seeds)
    assert set(results["experiments"]["tab2"]["rows"]) == {"vanilla", *cfg.ablations}
    assert set(results["experiments"]["tab9"]["rows"]) == {
        "vanilla",
        "projector only",
        "vision tower + projector (ours)",
        "all (LLM unfrozen)",
    }
    assert set(results["experiments"]["tab7"]["rows"]) == set(cfg.methods)
    assert set(results["experiments"]["fig4"]) == {"alpha", "ret_weight"}
    cont = results["experiments"]["fig2"]["methods"]
    assert set(cont) == set(cfg.continual_methods) and len(cont["cvf_ncu"]["retain_vqa"]) == cfg.n_tasks
    cases = results["experiments"]["fig5"]["items"]
    assert set(cases) == {"forget_vqa", "forget_qa", "retain_vqa", "retain_qa"}
    assert set(cases["forget_vqa"][0]["replies"]) == {"vanilla", *cfg.methods}
    assert results["claims"] and all("verdict" in c for c in results["claims"])

    selection = json.loads((out / "selection.json").read_text())
    assert selection["source"] == "validation search" and set(selection["selected"]) == {"lam"}
    assert selection["selected"]["lam"] in cfg.selection.search["lam"]
    assert [str(s) for s in cfg.validation_seeds] == list(selection["search"][0]["candidates"]["1"]["per_seed"])
    assert read_selection(str(out)) == selection["selected"]
    assert results["timings"]["ran"] == len(list((out / "jobs").glob("*.json")))

    # a second call finds every job done and runs none
    assert _cli("--quick", "--out", str(out)) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["timings"]["ran"] == 0 and again["timings"]["skipped"] == results["timings"]["ran"]
    assert again["experiments"]["tab1"] == results["experiments"]["tab1"]

    # a changed setting is refused before any work, naming it; the finished folder stays in place
    with pytest.raises(SettingsChanged, match="unlearn.steps"):
        _cli("--quick", "--out", str(out), "--steps", "4", "--only", "tab8")
    assert (out / "results.json").exists() and not (tmp_path / "paper.partial").exists()

    # so is a changed default of a method's config (an option no job overrides): it names the field
    changed = dataclasses.make_dataclass("Changed", [("relearn_sim", float, 0.0)], bases=(CVFConfig,))
    monkeypatch.setattr(get_method("cvf_ncu"), "config_class", changed)
    with pytest.raises(SettingsChanged, match="method_config.relearn_sim"):
        _cli("--quick", "--out", str(out), "--only", "tab8")
