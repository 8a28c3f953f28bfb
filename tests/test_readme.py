"""The README's two commands are what CI runs and what a newcomer types."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_has_the_two_commands():
    run, test = _commands()[:2]
    assert run.startswith("python3 -m venv .venv") and "torch==2.13.0" in run and "qviz serve --demo" in run
    assert test.startswith("python3 -m venv .venv") and "torch==2.13.0" in test and "pytest" in test


def test_ci_runs_the_readme_test_command():
    test = _commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()
