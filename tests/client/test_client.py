"""The client's own logic, on a fake transport (fast): upload retries, error reasons, the rollout file."""

from __future__ import annotations

import json

import httpx
import pytest
from edgefleet_client import Client, cli, errors, spec
from edgefleet_client.watch import HELD, Watch

from tests.support import REPO


class FakePlane:
    """Answers like the plane; the first ``failures`` artifact uploads fail as ``failure`` says."""

    def __init__(self, failures: int, failure: str) -> None:
        self.failures = failures
        self.failure = failure
        self.uploads: list[bytes] = []
        self.stored: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/api/v1/artifacts/":
            found = [a for a in self.stored if a["sha256"] == request.url.params["sha256"]]
            return httpx.Response(200, json={"count": len(found), "next": None, "results": found})
        assert request.url.path == "/api/v1/versions/7/artifacts/"
        body = request.read()
        self.uploads.append(body)
        if self.failures and self.failure == "lost answer":
            self.failures -= 1
            self.stored.append({"id": 1, "sha256": SHA256})
            raise httpx.ReadError("connection reset")
        if self.failures:
            self.failures -= 1
            return httpx.Response(503, text="<html>upstream unavailable</html>")
        self.stored.append({"id": 1, "sha256": SHA256})
        return httpx.Response(201, json={"id": 1, "status": "processing"})


DATA = b"model bytes " * 1000
SHA256 = __import__("hashlib").sha256(DATA).hexdigest()


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(DATA)
    return path


def _client(plane: FakePlane) -> Client:
    return Client("http://plane.test", "t", transport=httpx.MockTransport(plane), sleep=lambda s: None)


def test_it_retries_an_upload_the_plane_could_not_take_and_reports_progress(model_file):
    plane = FakePlane(failures=2, failure="503")
    seen: list[tuple[int, int]] = []

    artifact = _client(plane).upload_artifact(7, model_file, progress=lambda done, total: seen.append((done, total)))

    assert artifact == {"id": 1, "status": "processing"}
    assert len(plane.uploads) == 3 and all(DATA in body for body in plane.uploads)
    assert seen[-1] == (len(DATA), len(DATA))


def test_it_does_not_upload_twice_when_only_the_answer_was_lost(model_file):
    plane = FakePlane(failures=1, failure="lost answer")

    artifact = _client(plane).upload_artifact(7, model_file)

    assert artifact == {"id": 1, "sha256": SHA256}
    assert len(plane.uploads) == 1


def test_it_gives_up_after_its_retries_with_a_message(model_file):
    plane = FakePlane(failures=5, failure="503")

    with pytest.raises(errors.ServerError) as raised:
        _client(plane).upload_artifact(7, model_file, retries=2)

    assert len(plane.uploads) == 3
    assert str(raised.value) == (
        "POST /versions/7/artifacts/ failed (503): the server answered with an HTML page, not the API's JSON: "
        "is the URL the plane's?"
    )


def test_it_flattens_drf_errors_into_one_line():
    body = {"stages": [{}, {"non_field_errors": ["Give each stage a 'percent'."]}], "name": ["Too long."]}

    assert errors.reason_of(body) == "stages 2: Give each stage a 'percent'.; name: Too long."
    assert errors.reason_of({"detail": "Not found."}) == "Not found."


@pytest.mark.parametrize(
    "stages",
    [
        ["stage 2 (quarter): percent: More than 0 and at most 100."],  # a rule of the plane names its stage
        {"1": {"percent": ["A valid number is required."]}},  # a malformed stage, by position from 0
        [{}, {"percent": ["A valid number is required."]}],  # the same, as older planes answer it
    ],
)
def test_the_planes_refusal_of_a_stage_points_at_the_stages_line(stages):
    loaded = spec.load("version: 3\nselector: {tags: [lab]}\nstages:\n  - device_count: 1\n  - percent: 25\n")
    refusal = errors.ValidationFailed("POST", "/rollouts/", 400, "Bad Request", {"stages": stages})

    assert cli._with_lines(refusal, loaded).startswith("line 5: stage 2")


def test_a_rollout_file_becomes_the_apis_body():
    loaded = spec.load(
        "name: r\nversion: embedder:3\nselector: {tags: [lab], hardware_class: linux-x86_64}\nmax_per_minute: 50\n"
        "stages:\n"
        "  - {name: canary, device_count: 1, min_soak_seconds: 60,\n"
        "     gates: {failure: {percent: 0, min_finished: 1}, health: {p95_ratio: 1.2, min_samples: 200}}}\n"
        "  - {percent: 100, gates: {success: {percent: 95}}}\n"
    )

    assert loaded.version == "embedder:3"
    assert loaded.stage_lines == [6, 8]
    assert json.loads(json.dumps(loaded.body)) == {
        "name": "r",
        "selector": {"tags": ["lab"], "hardware_class": "linux-x86_64"},
        "max_per_minute": 50,
        "stages": [
            {"name": "canary", "device_count": 1, "min_soak_seconds": 60, "failure_percent": "0",
             "failure_min_finished": 1, "health_p95_ratio": "1.2", "health_min_samples": 200},
            {"percent": "100", "success_percent": "95"},
        ],
    }  # fmt: skip


def test_a_stage_still_takes_devices_as_the_former_name_of_device_count_with_a_warning():
    loaded = spec.load("version: 3\nselector: {devices: [edge-1, edge-2]}\nstages:\n  - devices: 1\n  - percent: 100\n")

    assert loaded.body["selector"] == {"devices": ["edge-1", "edge-2"]}
    assert loaded.body["stages"][0] == {"device_count": 1}
    assert loaded.warning_lines("r.yaml") == [
        "r.yaml:4: stages[1].devices: deprecated: write 'device_count', its new name"
    ]
    assert spec.load("version: 3\nselector: {tags: [lab]}\nstages: [{device_count: 1}]\n").warnings == []


def test_a_stage_giving_both_device_count_and_devices_is_refused():
    with pytest.raises(spec.SpecInvalid) as raised:
        spec.load("version: 3\nselector: {tags: [lab]}\nstages:\n  - {device_count: 1, devices: 2}\n")

    assert [p.message for p in raised.value.problems] == ["give 'device_count' alone: 'devices' is its former name"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "rollout.yaml:1: the file is empty"),
        ("version: [1\n", "rollout.yaml:2: not valid YAML"),
        ("alias: m:3\nselector: {tags: [a]}\nstages: [{percent: 9}]\n", "rollout.yaml:1: alias: 'm:3' names"),
        ("version: 1\nselector: {tags: [a]}\nstages: []\n", "rollout.yaml:3: stages: a list of at least one stage"),
        ("version: 1\nselector: {tags: [a]}\nstages: [{percent: 0}]\n", "rollout.yaml:3: stages[1].percent: expected"),
        ("version: 1\nselector: {tags: [a]}\nbaseline: last\nstages: [{percent: 5}]\n", "rollout.yaml:3: baseline:"),
        ("version: 1\nselector: {tags: [a]}\nstages: [{percent: 5, gates: {health: {p95: 2}}}]\n",
         "unknown key 'p95' (did you mean 'p95_ratio'?)"),
    ],
)  # fmt: skip
def test_a_bad_rollout_file_is_refused_with_the_line(text, problem):
    with pytest.raises(spec.SpecInvalid) as raised:
        spec.load(text)

    assert problem in str(raised.value)


def test_a_stage_held_with_its_device_counts_moving_is_not_held_yet():
    now = [0.0]
    watcher = Watch(timeout=None, hold_timeout=10, clock=lambda: now[0])

    def progress(active: int) -> dict:
        gates = [{"gate": "health", "verdict": "inconclusive", "detail": "5 samples; need 100"}]
        stage = {"index": 0, "name": "canary", "status": "running", "soak_remaining_s": 0.0,
                 "counts": {"active": active}, "gates": gates}  # fmt: skip
        return {"state": "running", "current_stage": 0, "stages": [stage]}

    assert watcher.observe(progress(0)) is None
    now[0] = 9
    assert watcher.observe(progress(1)) is None  # a device moved: the hold clock starts again
    now[0] = 18
    assert watcher.observe(progress(1)) is None
    now[0] = 19
    verdict = watcher.observe(progress(1))
    assert verdict is not None and verdict.code == HELD
    assert "held for 10 s" in verdict.message


def test_the_rollout_file_of_docs_cli_md_is_valid():
    text = (REPO / "docs" / "cli.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]

    loaded = spec.load(example, "docs/cli.md")

    assert loaded.version == "minilm-embedder:3"
    assert [stage.get("name") for stage in loaded.body["stages"]] == ["canary", "quarter", "everyone"]


def test_a_stage_the_plane_holds_past_its_deadline_ends_the_watch_with_3_at_once():
    watcher = Watch(timeout=None, hold_timeout=900)
    hold = {"since": "2026-12-07T19:00:00Z", "deadline": "2026-12-07T20:00:00Z",
            "expired_at": "2026-12-07T20:00:05Z", "action": "hold", "reason": "health: 5 of 100 samples"}  # fmt: skip
    stage = {"index": 0, "name": "canary", "status": "held_past_deadline", "soak_remaining_s": 0.0,
             "counts": {"active": 1}, "gates": [], "hold": hold}  # fmt: skip

    verdict = watcher.observe({"state": "running", "current_stage": 0, "stages": [stage]})

    assert verdict is not None and verdict.code == HELD
    assert "held past its deadline (2026-12-07T20:00:05Z): health: 5 of 100 samples" in verdict.message


def test_a_rollout_file_states_the_hold_deadline_and_the_generation_gate():
    loaded = spec.load(
        "version: 3\nselector: {tags: [lab]}\nstages:\n"
        "  - {device_count: 1, hold: {timeout: 600, action: rollback},\n"
        "     gates: {health: {ttft_ratio: 1.5, tps_ratio: 0.8, min_samples: 50}}}\n"
    )

    assert json.loads(json.dumps(loaded.body["stages"][0])) == {
        "device_count": 1, "health_ttft_ratio": "1.5", "health_tps_ratio": "0.8", "health_min_samples": 50,
        "inconclusive_timeout": 600, "inconclusive_action": "rollback",
    }  # fmt: skip
