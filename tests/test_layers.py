"""The package's layers import one way: runtime -> data -> models -> nullspace / methods -> train ->
evaluate -> experiments -> cli. A module may import its own layer and any layer below it, never above."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "mllm_unlearn"
#: layer rank: a module of rank r may import packages of rank <= r (methods build on nullspace,
#: never the reverse)
RANK = {
    "runtime": 0,
    "data": 1,
    "models": 2,
    "nullspace": 3,
    "methods": 4,
    "train": 5,
    "evaluate": 6,
    "experiments": 7,
    "cli": 8,
}


def imported_layers(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, top-level package of mllm_unlearn) of every import of the package inside ``path``."""
    package = list(path.relative_to(root).parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            out += [(node.lineno, parts[0])] if parts else [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mllm_unlearn."):
            out.append((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("mllm_unlearn.")]
    return out


def layer_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if len(rel) < 2 or rel[0] not in RANK:
            continue
        for line, target in imported_layers(path, root):
            if target in RANK and RANK[target] > RANK[rel[0]] or (rel[0], target) == ("nullspace", "methods"):
                bad.append(f"{path.relative_to(root)}:{line} imports {target}")
    return bad


def test_every_module_sits_in_a_layer():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(RANK), f"packages without a layer: {sorted(packages - set(RANK))}"


def test_no_import_points_up_the_layers():
    assert layer_violations() == []


def test_the_walker_sees_an_upward_import(tmp_path):
    """The check itself can fail: a runtime module importing train is reported."""
    fake = tmp_path / "mllm_unlearn"
    (fake / "runtime").mkdir(parents=True)
    (fake / "runtime" / "bad.py").write_text("from ..train.loop import run\nfrom mllm_unlearn.cli import main\n")
    assert layer_violations(fake) == ["runtime/bad.py:1 imports train", "runtime/bad.py:2 imports cli"]
