"""The package layout: no import cycle among the project's modules (function-level imports
counted), the layers import downwards only, and every package's public API imports."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "encoding", "genlora_rec", "ctr", "mpe", "baselines", "experiments")
# lower layers first; a module may import its own package and the packages before it
LAYERS = {"data": 0, "encoding": 0, "genlora_rec": 1, "ctr": 2, "mpe": 3, "baselines": 4, "experiments": 5}


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (ast, not executed)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import submodule`` imports the submodule; ``from pkg import name``, pkg itself
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycle() -> None:
    graph = project_imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers_import_downwards() -> None:
    wrong = [f"{m} -> {d}" for m, deps in project_imports().items() for d in deps
             if LAYERS[d.split(".")[0]] > LAYERS[m.split(".")[0]]]
    assert not wrong, "imports that run up the layers: " + ", ".join(sorted(wrong))


@pytest.mark.parametrize("package, names", [
    ("genlora_rec", ["LoRAConfig", "GenLoRAConfig", "LoRALinear", "GenLoRALinear", "inject_adapters",
                     "merge_adapters", "save_adapter", "load_adapter", "build_tower"]),
    ("ctr", ["CTRModel", "FP32Embedding", "ModelConfig", "TrainConfig", "Trainer", "evaluate"]),
    ("mpe", ["MPEConfig", "SearchConfig", "MixedPrecisionEmbedding", "run", "load_served_model", "export_model"]),
    ("data", ["CRITEO", "AVAZU", "get_schema", "PreparedDataset"]),
    ("encoding", ["pack_codes", "unpack_codes", "ef_encode", "ef_decode", "npy_file_bytes", "fp32_table_bytes"]),
])
def test_public_api(package: str, names: list[str]) -> None:
    module = importlib.import_module(package)
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{package} lacks {missing}"
    assert set(names) <= set(module.__all__)


def test_every_package_is_installed() -> None:
    """``pip install .`` ships every package: pyproject's find patterns match them all."""
    import fnmatch

    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    missing = [p for p in PACKAGES if not any(fnmatch.fnmatch(p, pat) for pat in patterns)]
    assert not missing, f"pyproject.toml does not install {missing}"
