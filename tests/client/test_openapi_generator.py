"""Clients in other languages are generated from /api/schema/: a standard generator must take all of it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.django_db


def test_it_generates_a_complete_python_client_with_no_warning(client, tmp_path):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(response.json()))
    # No post hooks: formatting the generated code is not what is under test.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"post_hooks": []}))
    out = tmp_path / "generated"

    result = subprocess.run(
        [_generator(), "generate", "--path", str(schema), "--meta", "none", "--config", str(config),
         "--output-path", str(out), "--fail-on-warning"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower(), output
    # Every /versions/ endpoint is there, with the Version model they answer with.
    endpoints = {p.stem for p in (out / "api" / "v1").glob("v1_versions_*.py")}
    wanted = ["create", "list", "retrieve", "partial_update", "publish_create", "archive_create", "tags_update"]
    assert {f"v1_versions_{name}" for name in wanted} <= endpoints
    assert (out / "models" / "version.py").is_file()


def _generator() -> str:
    # The venv's own, beside this interpreter, even when the venv is not on PATH.
    beside = Path(sys.executable).parent / "openapi-python-client"
    return str(beside) if beside.exists() else shutil.which("openapi-python-client") or "openapi-python-client"
