"""The README's steps, as a newcomer takes them, in a fresh clone of this repository.

The clone holds what git would give (tracked files, and untracked ones git does not ignore):
no .venv, node_modules, database or secret key. Its `./bin/run` must prepare all of that
itself, start the demo, print a login that works, and the README's curl recipe, pasted as it
is (the password and port filled in), must log in and send a command. The README's second
command, `./bin/test`, is what CI runs in a clean clone (`.ci/run`), so it is covered there.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.gateway import ROOT
from tests.support.servers import free_port
from tests.test_demo import DEADLINE, run_demo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SETUP_ALLOWANCE = 400.0  # seconds: pip and npm install everything the clone needs
#: pip and npm as the clone's set-up runs them, from this checkout's local copies of the same
#: pinned packages (`bin/setup`'s wheelhouse, npm's cache): the suite needs no network, and
#: `.ci/run` in a clean clone proves the same commands against the registries themselves.
OFFLINE = {
    "PIP_NO_INDEX": "1",
    "PIP_FIND_LINKS": str(ROOT / ".venv" / "wheelhouse"),
    "npm_config_offline": "true",
}


def fresh_clone(dest: Path) -> Path:
    """Copy what a clone of this checkout would hold, once committed, to `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():  # deleted, or a developer's link
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def readme_recipe(port: int, password: str) -> str:
    """The README's curl recipe against the demo, with the port and the password filled in."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    recipe = next(b for b in blocks if "/accounts/login/" in b and "curl" in b)
    assert "B=http://127.0.0.1:8000" in recipe and "PASSWORD='the password" in recipe, recipe
    recipe = recipe.replace("B=http://127.0.0.1:8000", f"B=http://127.0.0.1:{port}")
    return re.sub(r"PASSWORD='[^']*'", f"PASSWORD={shlex.quote(password)}", recipe)


def test_the_two_commands_are_the_readmes_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"## Two commands\n\n```sh\n(.*?)```", readme, re.S)
    assert first is not None
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines()]
    assert commands == ["./bin/run", "./bin/test"]
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("exec ./bin/test")


def test_bin_run_in_a_fresh_clone_prepares_everything_and_the_readme_recipe_works(tmp_path):
    clone = fresh_clone(tmp_path / "clone")
    assert not (clone / ".venv").exists() and not (clone / "node_modules").exists()
    answers: list[str] = []

    def paste_the_recipe(user: str, password: str, port: int) -> None:
        assert user == "demo"  # the recipe logs in as the user the demo prints
        done = subprocess.run(
            ["bash", "-c", readme_recipe(port, password)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answers.extend(done.stdout.strip().splitlines())

    mqtt_port = free_port()
    text = run_demo(
        tmp_path, f"mqtt://127.0.0.1:{mqtt_port}", ctrl_c=True, root=clone,
        logged_in=paste_the_recipe, deadline_s=DEADLINE + SETUP_ALLOWANCE, env_extra=OFFLINE,
    )  # fmt: skip
    assert "setup: creating .venv" in text and "setup: npm ci" in text, text[:3000]
    assert (clone / ".venv" / "bin" / "python").exists() and (clone / "node_modules").is_dir()
    assert (clone / "db.sqlite3").exists() and (clone / ".secret_key").exists()
    assert answers[0] == "login: 302 (302 = logged in, 200 = wrong password)", answers
    command = json.loads(answers[-1])
    assert command["device"] == "sim-0001" and command["name"] == "set_interval", command
    assert command["status"] in ("pending", "sent", "acked"), command
