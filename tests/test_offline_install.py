"""`pip install .` works without the network in a fresh venv, given a wheelhouse (issue 15, §1).

Runs ``scripts/offline_install.sh``: the tracked files copied to a temporary directory, a fresh venv, and
``pip install --no-index --find-links WHEELHOUSE .`` inside ``unshare -rn`` (no network interface) with pip's
configuration ignored, then ``import pyrefusal._core`` and ``pyrefusal doctor``. It needs the wheelhouse that
``scripts/offline_install.sh --prepare`` fills once with network (every build and runtime requirement as a wheel,
llama-cpp-python's copied from pip's wheel cache); without it the test is skipped. About 1 minute on 2 cores
(compiling pyrefusal._core), so it is marked slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = Path(os.environ.get("PYREFUSAL_WHEELHOUSE", Path.home() / ".cache" / "pyrefusal" / "wheelhouse"))


@pytest.mark.slow
def test_pip_install_works_offline_in_a_fresh_venv() -> None:
    if not any(WHEELHOUSE.glob("llama_cpp_python-0.3.36-*.whl")):
        pytest.skip(f"no wheelhouse at {WHEELHOUSE}: run scripts/offline_install.sh --prepare once (needs network)")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the script copies the tracked files)")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "offline_install.sh"), str(WHEELHOUSE)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "offline install OK" in out and "'built_against_llama_cpp_python': '0.3.36'" in out
    if subprocess.run(["unshare", "-rn", "true"], check=False).returncode == 0:
        assert "in unshare -rn" in out  # the install really had no network
