"""The package is mypy clean (STYLE.md: full type hints, mypy clean), checked as the README's
dev set-up installs it: mypy comes with the ``dev`` extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_mypy_reports_no_errors() -> None:
    # From the repository root, so that mypy reads pyproject.toml's settings and checks this
    # checkout's meshmq, not an installed copy.
    result = subprocess.run([sys.executable, "-m", "mypy", "meshmq"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"
