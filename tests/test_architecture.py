"""Dependencies point one way: clipseg_model <- finetune <- backend. An AST walk over every module (imports inside
functions and TYPE_CHECKING blocks count too), so a reverse import fails here the day it is written."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "clipseg_model": {"backend", "finetune", "flask", "werkzeug", "gunicorn", "redis", "rq", "label_studio_sdk"},
    "finetune": {"backend", "flask", "werkzeug", "gunicorn", "label_studio_sdk"},
}
# The Label Studio layer is formats only: no web framework, no Redis, no torch.
LABEL_STUDIO_LAYER = ROOT / "backend" / "labelstudio"
LABEL_STUDIO_FORBIDDEN = {"flask", "werkzeug", "gunicorn", "redis", "rq", "torch", "finetune.jobs", "finetune.training"}


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def violations(files: list[Path], forbidden: set[str], root: Path = ROOT) -> list[str]:
    found = []
    for path in files:
        for line, module in imported_modules(path, root):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    assert violations(files, FORBIDDEN[package]) == []


def test_label_studio_layer_is_formats_only():
    files = sorted(LABEL_STUDIO_LAYER.rglob("*.py"))
    assert {p.stem for p in files} >= {"config", "prompts", "image_refs", "results", "rle", "webhooks", "protocol"}
    assert violations(files, LABEL_STUDIO_FORBIDDEN) == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    """The check itself can fail: a reverse import hidden in a function body is found (the probe is written under
    tmp_path, never into the source tree)."""
    module = tmp_path / "finetune" / "_probe_reverse_import.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from backend.settings import Settings\n    return Settings\n")
    assert violations([module], FORBIDDEN["finetune"], root=tmp_path) == [
        "finetune/_probe_reverse_import.py:2 imports backend.settings"]


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports (anywhere in the file), over every .py under root/package."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for _, imported in imported_modules(path, root):
            while imported and imported not in modules:  # `from a.b import c`: c may be a name, a.b the module
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):  # a package's own __init__
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_circles():
    assert cycles(import_graph(ROOT, ("backend", "finetune", "clipseg_model"))) == []


def test_the_circle_check_can_fail(tmp_path):
    pkg = tmp_path / "backend"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from backend.b import x\n")
    (pkg / "b.py").write_text("def f():\n    import backend.a\n")
    (pkg / "c.py").write_text("import backend.a\n")
    assert cycles(import_graph(tmp_path, ("backend",))) == [["backend.a", "backend.b"]]


MAX_LINES = 500
MAX_TOP_LEVEL_BACKEND_MODULES = 8


def test_no_module_over_500_lines_and_backend_is_rooms():
    long = {str(p.relative_to(ROOT)): n for package in ("backend", "finetune", "clipseg_model")
            for p in sorted((ROOT / package).rglob("*.py")) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split by concern: {long}"
    top = sorted(p.name for p in (ROOT / "backend").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_BACKEND_MODULES, top


# Environment reads that are not configuration: each with its reason.
NOT_CONFIGURATION = {
    "backend/cli/serve.py",  # hands its environment on to the worker and scheduler it starts
    "finetune/distributed.py",  # torchrun's LOCAL_RANK / WORLD_SIZE protocol
    "finetune/worker.py",  # a worker hands its WorkerContext to a spawned work horse (like RQ's RQ_JOB_ID)
}


def test_only_backend_settings_reads_the_environment():
    readers = []
    for package in ("backend", "clipseg_model", "finetune"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            if ("os.environ" in text or "os.getenv" in text) and path != ROOT / "backend" / "settings.py":
                readers.append(str(path.relative_to(ROOT)))
    assert sorted(set(readers) - NOT_CONFIGURATION) == [], "environment read outside backend/settings.py"
