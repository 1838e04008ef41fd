"""`pip install ./client` on its own, without the plane's requirements, gives a working `edgefleet`."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.support import REPO


def test_it_installs_alone_into_a_fresh_venv_and_answers_help(tmp_path):
    # A copy: building in place would leave build/ and egg-info in the repository.
    source = shutil.copytree(REPO / "client", tmp_path / "client", ignore=shutil.ignore_patterns("*.egg-info", "build"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr

    help_text = subprocess.run([str(venv / "bin" / "edgefleet"), "--help"], capture_output=True, text=True, timeout=60)
    apply_help = subprocess.run(
        [str(venv / "bin" / "edgefleet"), "rollouts", "apply", "--help"], capture_output=True, text=True, timeout=60
    )
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout.lower()

    assert help_text.returncode == 0, help_text.stderr
    assert "rollouts" in help_text.stdout and "versions" in help_text.stdout
    assert "--hold-timeout" in apply_help.stdout
    assert "edgefleet-client==" in installed
    for plane_only in ("django", "djangorestframework", "celery", "onnxruntime", "paho-mqtt"):
        assert f"{plane_only}==" not in installed
