"""The client for the plane's REST API (``/api/v1/``): one method per thing an API user does.

Answers are the API's JSON objects, as documented at ``/api/docs/``. Errors are exceptions
from ``edgefleet_client.errors`` carrying the server's reason.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import httpx

from edgefleet_client import errors

Json = dict[str, Any]
# Called with (bytes sent so far, total bytes) while a file uploads.
Progress = Callable[[int, int], None]

# Connection troubles and these statuses are worth another try; anything else is an answer.
RETRY_STATUSES = frozenset({502, 503, 504})
UPLOAD_ANSWER_SECONDS = 600.0


class Client:
    """A plane at ``url`` (e.g. ``http://localhost:8000``), signed in with an API token."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/").removesuffix("/api/v1")
        self.token = token
        self.sleep = sleep
        headers = {"Accept": "application/json", "User-Agent": "edgefleet-client/0.1"}
        if token:
            headers["Authorization"] = f"Token {token}"
        self.http = httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # --- HTTP ----------------------------------------------------------------------

    def request(self, method: str, path: str, *, json: Any = None, params: Any = None, **kwargs: Any) -> Any:
        """One call; the decoded JSON answer (None for 204), or an ``errors.EdgefleetError``."""
        try:
            response = self.http.request(method, path, json=json, params=_params(params), **kwargs)
        except httpx.TimeoutException as exc:
            raise errors.Unreachable(
                f"the plane at {self.url} did not answer {method} {path} in time ({type(exc).__name__}). "
                "Is it overloaded, or is the URL right?"
            ) from exc
        except httpx.TransportError as exc:
            raise errors.Unreachable(
                f"cannot reach the plane at {self.url}: {exc or type(exc).__name__}. "
                "Check that it is running and that the URL (--url, EDGEFLEET_URL or the profile) is right."
            ) from exc
        return self._answer(method, path, response)

    def _answer(self, method: str, path: str, response: httpx.Response) -> Any:
        if response.is_success and (response.status_code == 204 or not response.content):
            return None
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.is_success:
            if not isinstance(body, dict | list):
                raise errors.ApiError(method, path, response.status_code, "the answer is not JSON: is this a plane?")
            return body
        raise errors.api_error(method, path, response.status_code, _plain(body))

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body if body is not None else {})

    def pages(self, path: str, *, limit: int | None = None, **params: Any) -> Iterator[Json]:
        """Every item of a paginated list, following ``next`` (at most ``limit`` items)."""
        params = {**params, "limit": min(limit, 1000) if limit else 1000}
        page: Json = self.get(path, **params)
        count = 0
        while True:
            for item in page["results"]:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield item
            if not page.get("next"):
                return
            page = self.request("GET", page["next"])

    # --- Sign-in ---------------------------------------------------------------------

    def login(self, username: str, password: str) -> str:
        """Exchange a username and password for an API token (and use it from now on)."""
        try:
            answer = self.request("POST", "/auth/token/", json={"username": username, "password": password})
        except errors.ValidationFailed as exc:
            raise errors.AuthenticationFailed(exc.method, exc.path, exc.status, exc.reason, exc.body) from None
        self.token = str(answer["token"])
        self.http.headers["Authorization"] = f"Token {self.token}"
        return self.token

    def signing_key(self) -> Json:
        """The public key that signs every published file's manifest (agents' ``plane_public_key``)."""
        return cast(Json, self.get("/signing-key/"))

    # --- Models and versions ---------------------------------------------------------

    def list_models(self, *, name: str | None = None, limit: int | None = None) -> list[Json]:
        return list(self.pages("/models/", name=name, limit=limit))

    def get_model(self, name: str) -> Json:
        return cast(Json, self.get(f"/models/{name}/"))

    def create_model(self, name: str, description: str = "") -> Json:
        return cast(Json, self.post("/models/", {"name": name, "description": description}))

    def list_versions(
        self, *, model: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[Json]:
        return list(self.pages("/versions/", model=model, status=status, limit=limit, ordering="-id"))

    def get_version(self, ref: int | str) -> Json:
        """A version by id, ``model:number`` or ``model:alias``."""
        return cast(Json, self.get(f"/versions/{ref}/"))

    def create_version(self, model: str, **fields: Any) -> Json:
        """A draft version of ``model``: notes, task, pooling, normalize, max_length, quality_threshold, parent."""
        return cast(Json, self.post("/versions/", {"model": model, **fields}))

    def publish_version(self, ref: int | str) -> Json:
        return cast(Json, self.post(f"/versions/{self.version_id(ref)}/publish/"))

    def archive_version(self, ref: int | str, *, reason: str = "") -> Json:
        return cast(Json, self.post(f"/versions/{self.version_id(ref)}/archive/", {"reason": reason}))

    def set_version_tags(self, ref: int | str, tags: dict[str, str]) -> Json:
        return cast(Json, self.request("PUT", f"/versions/{self.version_id(ref)}/tags/", json={"tags": tags}))

    def version_id(self, ref: int | str) -> int:
        """The id of a version named by id, ``model:number`` or ``model:alias``."""
        if isinstance(ref, int) or str(ref).isdigit():
            return int(ref)
        return int(self.get_version(ref)["id"])

    def upload_artifact(
        self,
        version: int | str,
        path: str | Path,
        *,
        role: str = "model",
        precision: str = "",
        hardware_class: str = "any",
        format: str = "onnx",
        progress: Progress | None = None,
        retries: int = 3,
    ) -> Json:
        """Upload one file to a draft version, retrying on connection trouble and 502/503/504.

        A retry first asks whether the file arrived after all (same sha256 on the version), so an
        upload whose answer was lost is not sent twice.
        """
        version_id = self.version_id(version)
        path = Path(path)
        digest = sha256_of(path)
        fields = {"role": role, "precision": precision, "hardware_class": hardware_class, "format": format}
        for attempt in range(retries + 1):
            if attempt:
                found = self.get("/artifacts/", version=version_id, sha256=digest)["results"]
                if found:
                    return cast(Json, found[0])
            try:
                with path.open("rb") as raw:
                    stream = ProgressReader(raw, path.stat().st_size, progress)
                    files = {"file": (path.name, stream, "application/octet-stream")}
                    # The plane checks a model file (loads it) before it answers: give a big one time.
                    timeout = httpx.Timeout(self.http.timeout.connect, read=UPLOAD_ANSWER_SECONDS)
                    endpoint = f"/versions/{version_id}/artifacts/"
                    return cast(Json, self.request("POST", endpoint, data=fields, files=files, timeout=timeout))
            except (errors.Unreachable, errors.ServerError) as exc:
                if attempt == retries or (isinstance(exc, errors.ServerError) and exc.status not in RETRY_STATUSES):
                    raise
                self.sleep(min(2**attempt, 30))
        raise AssertionError("unreachable")  # the loop returns or raises

    def wait_artifact(self, artifact_id: int, *, timeout: float = 600, interval: float = 1.0) -> Json:
        """Poll until the plane has hashed the artifact; ``ApiError`` if it failed."""
        deadline = time.monotonic() + timeout
        while True:
            artifact: Json = self.get(f"/artifacts/{artifact_id}/")
            if artifact["status"] == "failed":
                name = f"artifact {artifact_id} ({artifact['filename']})"
                raise errors.EdgefleetError(f"{name} failed: {artifact['error']}")
            if artifact["status"] == "ready":
                return artifact
            if time.monotonic() >= deadline:
                status = artifact["status"]
                raise errors.EdgefleetError(f"artifact {artifact_id} is still {status} after {timeout:.0f} s")
            self.sleep(interval)

    def optimize_version(
        self, ref: int | str, *, variants: list[str] | None = None, int4_block_size: int | None = None
    ) -> Json:
        """Start the pipeline that builds and evaluates int8/int4/fp16 variants; answers the pipeline."""
        body: Json = {}
        if variants:
            body["variants"] = variants
        if int4_block_size:
            body["int4_block_size"] = int4_block_size
        return cast(Json, self.post(f"/versions/{self.version_id(ref)}/optimize/", body))

    def get_pipeline(self, pipeline_id: int) -> Json:
        return cast(Json, self.get(f"/pipelines/{pipeline_id}/"))

    def wait_pipeline(self, pipeline_id: int, *, timeout: float = 1800, interval: float = 2.0) -> Json:
        """Poll until the pipeline succeeds or fails; answers it either way (check ``state``)."""
        deadline = time.monotonic() + timeout
        while True:
            pipeline = self.get_pipeline(pipeline_id)
            if pipeline["state"] in ("succeeded", "failed") or time.monotonic() >= deadline:
                return pipeline
            self.sleep(interval)

    # --- Aliases ---------------------------------------------------------------------

    def list_aliases(self, model: str) -> list[Json]:
        return cast(list[Json], self.get(f"/models/{model}/aliases/"))

    def get_alias(self, model: str, name: str) -> Json:
        return cast(Json, self.get(f"/models/{model}/aliases/{name}/"))

    def set_alias(self, model: str, name: str, version: int | str, *, reason: str = "") -> Json:
        """Point ``model:name`` at a published version (id, ``model:number`` or another alias)."""
        body = {"version": self.version_id(version), "reason": reason}
        return cast(Json, self.request("PUT", f"/models/{model}/aliases/{name}/", json=body))

    def alias_history(self, model: str, name: str) -> list[Json]:
        return cast(list[Json], self.get(f"/models/{model}/aliases/{name}/history/"))

    # --- Devices ---------------------------------------------------------------------

    def list_devices(
        self,
        *,
        tag: str | None = None,
        online: bool | None = None,
        hardware_class: str | None = None,
        model: str | None = None,
        limit: int | None = None,
    ) -> list[Json]:
        params = {"tag": tag, "online": online, "hardware_class": hardware_class, "model": model}
        return list(self.pages("/devices/", limit=limit, **params))

    def get_device(self, device_id: str) -> Json:
        return cast(Json, self.get(f"/devices/{device_id}/"))

    def set_device_tags(self, device_id: str, tags: list[str]) -> Json:
        return cast(Json, self.request("PUT", f"/devices/{device_id}/tags/", json={"tags": tags}))

    def accept_device(self, device_id: str) -> Json:
        return cast(Json, self.post(f"/devices/{device_id}/accept/"))

    def reject_device(self, device_id: str) -> Json:
        return cast(Json, self.post(f"/devices/{device_id}/reject/"))

    def list_deployments(self, *, device: str | None = None, state: str | None = None, limit: int = 100) -> list[Json]:
        return list(self.pages("/deployments/", device=device, state=state, limit=limit, ordering="-id"))

    def get_deployment(self, deployment_id: int) -> Json:
        return cast(Json, self.get(f"/deployments/{deployment_id}/"))

    def assign_version(
        self, ref: int | str, *, devices: list[str] | None = None, tags: list[str] | None = None, reason: str = ""
    ) -> Json:
        body = {"devices": devices or [], "tags": tags or [], "reason": reason}
        return cast(Json, self.post(f"/versions/{self.version_id(ref)}/assign/", body))

    def list_heartbeats(self, *, device: str | None = None, limit: int = 100) -> list[Json]:
        return list(self.pages("/heartbeats/", device=device, limit=limit, ordering="-id"))

    # --- Rollouts --------------------------------------------------------------------

    def list_rollouts(self, *, state: str | None = None, model: str | None = None, limit: int = 100) -> list[Json]:
        return list(self.pages("/rollouts/", state=state, model=model, limit=limit, ordering="-id"))

    def get_rollout(self, rollout_id: int) -> Json:
        return cast(Json, self.get(f"/rollouts/{rollout_id}/"))

    def create_rollout(self, body: Json) -> Json:
        """A draft rollout from the API's body: name, version or alias, selector, stages, ..."""
        return cast(Json, self.post("/rollouts/", body))

    def start_rollout(self, rollout_id: int, *, reason: str = "", supersede: bool = False) -> Json:
        return self._act(rollout_id, "start", {"reason": reason, "supersede": supersede})

    def rollout_progress(self, rollout_id: int) -> Json:
        """Per stage: device counts and each gate's verdict, value and threshold."""
        return cast(Json, self.get(f"/rollouts/{rollout_id}/progress/"))

    def promote_rollout(self, rollout_id: int, *, reason: str = "") -> Json:
        return self._act(rollout_id, "promote", {"reason": reason})

    def pause_rollout(self, rollout_id: int, *, reason: str = "") -> Json:
        return self._act(rollout_id, "pause", {"reason": reason})

    def resume_rollout(self, rollout_id: int, *, reason: str = "") -> Json:
        return self._act(rollout_id, "resume", {"reason": reason})

    def abort_rollout(self, rollout_id: int, *, reason: str = "") -> Json:
        return self._act(rollout_id, "abort", {"reason": reason})

    def rollback_rollout(self, rollout_id: int, *, reason: str = "") -> Json:
        return self._act(rollout_id, "rollback", {"reason": reason})

    def _act(self, rollout_id: int, action: str, body: Json) -> Json:
        return cast(Json, self.post(f"/rollouts/{rollout_id}/{action}/", body))

    # --- Audit and enrollment --------------------------------------------------------

    def list_audit(
        self,
        *,
        action: str | None = None,
        object_type: str | None = None,
        object_id: str | None = None,
        since: str | None = None,
        limit: int = 100,
    ) -> list[Json]:
        params = {"action": action, "object_type": object_type, "object_id": object_id, "since": since}
        return list(self.pages("/audit/", limit=limit, ordering="-id", **params))

    def list_enrollment_tokens(self, *, limit: int | None = None) -> list[Json]:
        return list(self.pages("/enrollment-tokens/", limit=limit))

    def create_enrollment_token(
        self, name: str, *, expires_in_hours: int = 24, auto_approve: bool = False, max_devices: int | None = None
    ) -> Json:
        """A new token; its secret (``token``) is in this answer only."""
        body: Json = {"name": name, "expires_in_hours": expires_in_hours, "auto_approve": auto_approve}
        if max_devices is not None:
            body["max_devices"] = max_devices
        return cast(Json, self.post("/enrollment-tokens/", body))

    def revoke_enrollment_token(self, token_id: int) -> Json:
        return cast(Json, self.post(f"/enrollment-tokens/{token_id}/revoke/"))


class ProgressReader:
    """A file that reports how much of it has been read, for an upload's progress bar."""

    def __init__(self, raw: IO[bytes], total: int, progress: Progress | None) -> None:
        self.raw = raw
        self.total = total
        self.progress = progress
        self.done = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.done += len(data)
        if self.progress is not None:
            self.progress(self.done, self.total)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self.raw.seek(offset, whence)
        if whence == 0 and offset == 0:
            self.done = 0
        return position

    def tell(self) -> int:
        return self.raw.tell()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _params(params: Any) -> Any:
    """Query parameters without the unset ones; booleans as the API spells them."""
    if not isinstance(params, dict):
        return params
    return {key: _param(value) for key, value in params.items() if value is not None}


def _param(value: Any) -> Any:
    return ("true" if value else "false") if isinstance(value, bool) else value


def _plain(body: Any) -> Any:
    # An HTML error page (a proxy's, or Django's debug page) says nothing useful in full.
    if isinstance(body, str) and body.lstrip().startswith("<"):
        return "the server answered with an HTML page, not the API's JSON: is the URL the plane's?"
    return body
