"""What end-to-end tests share: processes with their logs, and a model version released through the API."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from django.db import connection
from rest_framework.test import APIClient

from tests.support import REPO, wait_until

# Fields of the one model file release_minilm uploads unless told otherwise.
ANY_INT8 = {"precision": "int8", "hardware_class": "any"}


def database_url() -> str:
    """The test database, for the bridge process; it must be a server both processes reach."""
    assert connection.vendor == "postgresql", "set DATABASE_URL to PostgreSQL (make test does)"
    db = connection.settings_dict
    return f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


class Process:
    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.output()[-3000:]}") from None


def upload_artifact(api: APIClient, version: dict, fields: dict, path: Path) -> dict:
    """Upload one file to a version and wait until the worker has hashed it."""
    with path.open("rb") as f:
        response = api.post(f"/api/v1/versions/{version['id']}/artifacts/", {**fields, "file": f})
    assert response.status_code == 201, response.content
    return wait_until(
        lambda url=response["Location"]: (artifact := api.get(url).json())["status"] == "ready" and artifact,
        timeout=60,
        what="the worker hashing the upload",
    )


def release_minilm(api: APIClient, minilm: dict, variants: Sequence[tuple[dict, Path]] = ()) -> dict:
    """Publish minilm-embedder: its tokenizer and model ``variants`` ((fields, file) pairs), else the int8 file."""
    assert api.post("/api/v1/models/", {"name": "minilm-embedder"}, format="json").status_code == 201
    version = api.post(
        "/api/v1/versions/",
        {"model": "minilm-embedder", "task": "embedding", "pooling": "mean", "normalize": True},
        format="json",
    ).json()
    for fields, path in variants or [(ANY_INT8, minilm["model"])]:
        upload_artifact(api, version, {"role": "model", **fields}, path)
    upload_artifact(api, version, {"role": "tokenizer", "format": "tokenizer.json"}, minilm["tokenizer"])
    response = api.post(f"/api/v1/versions/{version['id']}/publish/")
    assert response.status_code == 200, response.content
    return version


def release_gguf(api: APIClient, gguf: Path, *, model: str, variants: Sequence[str], publish: bool = True) -> dict:
    """What an API client does with a GGUF: a generate version, the GGUF as its source, the
    pipeline that converts and evaluates ``variants``, then (if ``publish``) publish."""
    assert api.post("/api/v1/models/", {"name": model}, format="json").status_code == 201
    version = api.post(
        "/api/v1/versions/",
        {"model": model, "task": "generate", "max_length": 2048, "quality_threshold": 0.9},
        format="json",
    ).json()
    upload_artifact(api, version, {"role": "source", "format": "gguf"}, gguf)
    response = api.post(f"/api/v1/versions/{version['id']}/optimize/", {"variants": list(variants)}, format="json")
    assert response.status_code == 202, response.content
    pipeline = wait_until(
        lambda url=response["Location"]: (p := api.get(url).json())["state"] in ("succeeded", "failed") and p,
        timeout=900,
        interval=1,
        what="the worker converting and evaluating the GGUF",
    )
    assert pipeline["state"] == "succeeded", pipeline
    if publish:
        response = api.post(f"/api/v1/versions/{version['id']}/publish/")
        assert response.status_code == 200, response.content
    return api.get(f"/api/v1/versions/{version['id']}/").json()
