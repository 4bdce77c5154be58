"""ruff and mypy --strict on edge/ and cloud_bridge/ run with the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, check=False, capture_output=True, text=True, timeout=900
    )


def test_ruff() -> None:
    r = _run("ruff", "check", "edge", "cloud_bridge", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict() -> None:
    r = _run("mypy", "--strict", "edge", "cloud_bridge")
    assert r.returncode == 0, r.stdout + r.stderr
