"""The README's promises: CI runs its exact test command, it stays a front door, the settings table matches the code."""
from __future__ import annotations

import re
from pathlib import Path

from backend.settings import settings_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


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
        assert f"| `{env}` | `{default}` |" in CONFIGURATION, env


def test_readme_is_a_front_door_and_its_links_resolve():
    assert len(README.splitlines()) <= 200
    links = re.findall(r"\]\((docs/[^)#]+)\)", README)
    assert "docs/configuration.md" in links and "docs/architecture.md" in links
    for link in links:
        assert (ROOT / link).is_file(), link
