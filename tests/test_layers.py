"""The import rules of docs/architecture.md, read off the source with `ast` (nothing is imported).

Each fnlm module may import only from its own layer or the layers below it:

    errors, config, files, params  <  kernels  <  quant  <  models  <  lora
        <  tokenizer, data, hub, default, gguf, load, loss, generate, export  <  train, serve  <  cli

so models never import lora, train, generate or export, and kernels never import quant. Outside
fnlm/kernels/, the kernels are reached through their one door, `fnlm.kernels`, never a kernel
file (`fnlm.kernels.nf4`). No module
inside the package imports its face (`import fnlm`, or `from fnlm import load` where the face has
bound `load` to a function): the face imports everything, so such an import is a cycle waiting to
happen. Function-local imports count too. A module that breaks a rule today and is being fixed is
listed in KNOWN_VIOLATIONS: its case is xfail(strict=True), so it fails once fixed, and the entry
must then be removed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fnlm"

LAYERS = (
    ("errors", "config", "files", "params"),
    ("kernels",),
    ("quant",),
    ("models",),
    ("lora",),
    (
        "tokenizer",
        "data",
        "batches",
        "hub",
        "default",
        "gguf",
        "load",
        "loss",
        "generate",
        "export",
    ),
    ("train", "serve"),
    ("cli",),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}

# module -> why it still breaks a rule (the xfail reason); remove the entry once it is fixed
KNOWN_VIOLATIONS: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_submodule(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def _face_names() -> set[str]:
    """Names fnlm/__init__.py binds to something other than the submodule of that name (e.g.
    `from fnlm.load import load` makes `fnlm.load` the function)."""
    names = set()
    for node in ast.parse((PACKAGE / "__init__.py").read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module != "fnlm":
            names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


FACE_NAMES = _face_names()
MODULES = sorted(
    (_module_name(path), path) for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py"
)


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported fnlm module) for every import in the file, "fnlm" for the face."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "fnlm":
                for alias in node.names:
                    face = alias.name in FACE_NAMES or not _is_submodule(alias.name)
                    found.append((node.lineno, "fnlm" if face else f"fnlm.{alias.name}"))
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if name == "fnlm" or name.startswith("fnlm.")]


def _violations(module: str, path: Path) -> list[str]:
    part = module.split(".")[1]
    problems = []
    for line, name in _imports(module, path):
        where = f"{path.relative_to(PACKAGE.parent)}:{line}"
        if name == "fnlm":
            problems.append(f"{where} imports the package face fnlm; import the submodule instead")
            continue
        target = name.split(".")[1]
        if target == "kernels" and name != "fnlm.kernels" and part != "kernels":
            problems.append(f"{where} imports {name}; call the door, fnlm.kernels, instead")
        if target not in RANK:
            continue  # checked by test_every_module_has_a_layer
        if RANK[target] > RANK[part]:
            problems.append(
                f"{where}: {part} (layer {RANK[part]}) imports {name} (layer {RANK[target]}), "
                "a layer above it"
            )
    return problems


def _case(module: str, path: Path):
    reason = KNOWN_VIOLATIONS.get(module)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(module, path, marks=marks, id=module)


@pytest.mark.parametrize(("module", "path"), [_case(m, p) for m, p in MODULES])
def test_imports_follow_the_layers(module, path):
    problems = _violations(module, path)
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    parts = {module.split(".")[1] for module, _ in MODULES}
    assert parts <= set(RANK), (
        f"{sorted(parts - set(RANK))} have no layer: add them to LAYERS here and to "
        "docs/architecture.md"
    )


def test_the_layers_keep_the_stated_rules():
    """The order of LAYERS is what forbids these; reordering it must not allow them."""
    assert all(RANK[part] > RANK["models"] for part in ("lora", "train", "generate", "export"))
    assert RANK["quant"] > RANK["kernels"]


def test_known_violations_are_modules():
    assert set(KNOWN_VIOLATIONS) <= {module for module, _ in MODULES}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from fnlm import quant", []),
        ("from fnlm import lora", ["imports fnlm.lora (layer 4)"]),
        ("import fnlm", ["imports the package face"]),
        ("from fnlm import load", ["imports the package face"]),  # the function, not the module
        ("def f():\n    from fnlm.train import run", ["imports fnlm.train"]),
        ("from ..lora import tree", ["imports fnlm.lora (layer 4)"]),
        ("from .decoder import forward", []),
        ("from fnlm.quant import linear", []),
        ("from fnlm.kernels import rms_norm", []),
        ("from fnlm.kernels.nf4 import nf4_gemv_fwd", ["call the door"]),
    ],
)
def test_the_checker_sees_what_it_should(monkeypatch, source, expected):
    """A module of `models` with the given source: which rule it breaks."""
    path = PACKAGE / "models" / "_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    problems = _violations("fnlm.models._probe", path)
    assert len(problems) == len(expected)
    for problem, words in zip(problems, expected, strict=True):
        assert words in problem
