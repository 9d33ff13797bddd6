"""The suite's own rules: in CI a skipped test is a failure (a real component is missing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(test_file: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    """pytest in a child process on `test_file`, with this suite's conftest as a plugin."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest"]
        + ["--rootdir", str(test_file.parent), str(test_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_skip_fails_in_ci_and_only_there(tmp_path: Path):
    test_file = tmp_path / "test_needs_something.py"
    test_file.write_text(
        "import pytest\n\n\ndef test_needs_a_frobnicator():\n"
        "    pytest.skip('no frobnicator installed')\n"
    )
    locally = run_pytest(test_file, ci=False)
    assert locally.returncode == 0, locally.stdout
    assert "1 skipped" in locally.stdout
    in_ci = run_pytest(test_file, ci=True)
    assert in_ci.returncode == 1, in_ci.stdout
    assert "1 failed" in in_ci.stdout
    assert "skipped in CI" in in_ci.stdout and "no frobnicator installed" in in_ci.stdout
