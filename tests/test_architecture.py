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


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
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


def violations(files: list[Path], forbidden: set[str]) -> list[str]:
    found = []
    for path in files:
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
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
    """The check itself can fail: a reverse import hidden in a function body is found."""
    module = ROOT / "finetune" / "_probe_reverse_import.py"
    module.write_text("def f():\n    from backend.settings import Settings\n    return Settings\n")
    try:
        assert violations([module], FORBIDDEN["finetune"]) == ["finetune/_probe_reverse_import.py:2 imports backend.settings"]
    finally:
        module.unlink()


# Environment reads that are not configuration: each with its reason.
NOT_CONFIGURATION = {
    "backend/cli/serve.py",  # hands its environment on to the worker and scheduler it starts
    "finetune/distributed.py",  # torchrun's LOCAL_RANK / WORLD_SIZE protocol
}


def test_only_backend_settings_reads_the_environment():
    readers = []
    for package in ("backend", "clipseg_model", "finetune"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            if ("os.environ" in text or "os.getenv" in text) and path != ROOT / "backend" / "settings.py":
                readers.append(str(path.relative_to(ROOT)))
    assert sorted(set(readers) - NOT_CONFIGURATION) == [], "environment read outside backend/settings.py"
