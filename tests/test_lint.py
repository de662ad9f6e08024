"""Lint and types, in `make test`: ruff (pycodestyle, pyflakes, import order, bugbear) and
mypy over extauthz/, as pyproject.toml configures them (generated protos aside)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing() -> None:
    done = run("ruff", "check", "extauthz", "tests/lanes.py", "tests/test_lint.py")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_nothing() -> None:
    done = run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
