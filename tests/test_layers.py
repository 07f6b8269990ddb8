"""The package's layers: each imports only the ones below it, and no module imports itself back in a cycle.

errors, logs -> run_dir -> config -> models -> data -> dpo -> train -> launch (torch-free), tools -> dev -> cli
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "silkie"
LAYERS = {
    "errors": 0,
    "logs": 0,
    "run_dir": 1,
    "config": 2,
    "models": 3,
    "data": 4,
    "dpo": 5,
    "train": 6,
    "launch": 7,
    "tools": 7,
    "dev": 8,
    "cli": 9,
    "__main__": 10,
}
TORCH_FREE = {"errors", "logs", "run_dir", "config", "launch"}  # the launcher checks recipes without torch
LAUNCH_MAY_IMPORT = {"errors", "logs", "run_dir", "config", "launch"}
TORCHRUN = "silkie.launch.torchrun_entry"  # torchrun itself, in a process of its own: it may import torch


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file (module level or inside functions), relative ones
    resolved; `from pkg import name` also counts as importing `pkg.name` (it may be a module)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def _component(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def layer_violations(root: Path = PACKAGE) -> list[str]:
    """Every import that points up (or sideways into another component of the same layer), and torch in the
    torch-free layers."""
    wrong = []
    for path in root.rglob("*.py"):
        name = _module_name(path, root)
        here = _component(name)
        if here == "__init__":
            continue
        for target, line in _imports(path, root):
            if target.split(".")[0] == "torch" and here in TORCH_FREE and name != TORCHRUN:
                wrong.append(f"{name}:{line} imports torch (this layer is torch-free)")
            if not target.startswith("silkie.") or _component(target) == here or _component(target) not in LAYERS:
                continue
            there = _component(target)
            if LAYERS[there] >= LAYERS[here] or (here == "launch" and there not in LAUNCH_MAY_IMPORT):
                wrong.append(f"{name}:{line} imports {target} ({here} may not import {there})")
    return sorted(set(wrong))


def import_cycles(root: Path = PACKAGE) -> list[str]:
    """Each cycle of imports between modules of the package, as `a -> b -> a`."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph = {name: {t for t, _ in _imports(path, root) if t in modules and t != name} for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_every_component_has_a_layer():
    components = {_component(_module_name(p)) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert components <= set(LAYERS), components - set(LAYERS)


def test_imports_only_point_down_the_layers():
    assert layer_violations() == []


def test_no_import_cycles():
    assert import_cycles() == []


def test_the_checks_see_a_wrong_import_and_a_cycle(tmp_path):
    """Both checks must be able to fail."""
    fake = tmp_path / "silkie"
    for folder in ("config", "train", "dev"):
        (fake / folder).mkdir(parents=True)
    (fake / "config" / "bad.py").write_text("from silkie.train import run\nimport torch\n")
    (fake / "train" / "run.py").write_text("x = 1\n")
    (fake / "dev" / "a.py").write_text("def f():\n    from silkie.dev import b\n")
    (fake / "dev" / "b.py").write_text("from silkie.dev.a import f\n")
    assert layer_violations(fake) == [
        "silkie.config.bad:1 imports silkie.train (config may not import train)",
        "silkie.config.bad:1 imports silkie.train.run (config may not import train)",
        "silkie.config.bad:2 imports torch (this layer is torch-free)",
    ]
    assert import_cycles(fake) == ["silkie.dev.a -> silkie.dev.b -> silkie.dev.a"]
