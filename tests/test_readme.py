"""The README's promises: CI runs its exact test command, its settings table matches the code."""
from __future__ import annotations

import re
from pathlib import Path

from backend.settings import settings_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(b.strip() for b in _code_blocks() if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_install_command_pins_the_cpu_torch_build():
    install = _code_blocks()[0]
    assert "torch==2.13.0" in install and "clipseg serve" in install


def test_settings_table_matches_the_code():
    for env, default, _help in settings_table():
        assert f"| `{env}` | `{default}` |" in README, env
