"""An evaluation set (.npz) that would expand past EVALUATION_SET_MAX_BYTES is refused before it is loaded.

A compressed .npz of 1 MiB can hold 1 GiB of zeros, and numpy allocates an array from
the shape in its header before reading a byte of it. The plane loads a version's set
whenever it builds desired messages, so one upload could exhaust every worker's memory.
"""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from fleet.choices import ArtifactRole, InferenceTask
from fleet.lib import evaluation
from fleet.services import assignments, registry
from fleet.services.desired import _selftest, desired_messages
from tests.fleet.helpers import add_ready_artifact, make_device, make_model, make_version, token_client

GIB = 1024**3


def bomb(path: Path, expands_to: int = GIB) -> Path:
    """An .npz of a few MiB whose one float32 array is ``expands_to`` bytes of zeros."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("output:last_hidden_state.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "<f4", "fortran_order": False, "shape": (expands_to // 4,)}
            )
            block = bytes(1024 * 1024)
            for _ in range(expands_to // len(block)):
                member.write(block)
    return path


def lying_header(path: Path) -> Path:
    """A tiny .npz whose header claims an 8 GiB array: numpy would allocate it before reading."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (GIB,)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("output:x.npy", header.getvalue() + bytes(64))
    return path


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def reset_peak_rss() -> None:
    # Linux: "5" resets the high-water mark to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


def test_it_refuses_a_set_that_expands_past_the_limit_from_its_headers_alone(tmp_path):
    path = bomb(tmp_path / "bomb.npz", expands_to=256 * 1024 * 1024)
    reset_peak_rss()
    before = peak_rss()

    with pytest.raises(evaluation.EvaluationSetRejected, match="expands to more than"):
        evaluation.load_set(path, max_bytes=128 * 1024 * 1024)

    assert path.stat().st_size < 2 * 1024 * 1024
    assert peak_rss() - before < 32 * 1024 * 1024


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"texts": np.array([{"a": 1}], dtype=object)}, "holds Python objects"),
        ({f"input:{n}": np.zeros(1) for n in range(65)}, "at most 64"),
    ],
    ids=["objects", "too-many-arrays"],
)
def test_it_refuses_what_an_evaluation_set_never_holds(tmp_path, arrays, expected):
    path = tmp_path / "set.npz"
    np.savez(path, **arrays)

    with pytest.raises(evaluation.EvaluationSetRejected, match=expected):
        evaluation.check_set(path)


def test_it_refuses_a_header_that_claims_more_than_its_data(tmp_path):
    with pytest.raises(evaluation.EvaluationSetRejected, match="expands to more than"):
        evaluation.load_set(lying_header(tmp_path / "liar.npz"))


def test_it_loads_a_set_the_plane_made(tmp_path):
    path = tmp_path / "set.npz"
    path.write_bytes(evaluation.dump_set({"x": np.ones((2, 3))}, {"y": np.zeros((2, 4))}, texts=["a", "b"]))

    inputs, outputs = evaluation.load_set(path)

    assert (inputs["x"].shape, outputs["y"].shape, evaluation.load_texts(path)) == ((2, 3), (2, 4), ["a", "b"])


@pytest.mark.django_db
@pytest.mark.parametrize("make", [bomb, lying_header], ids=["bomb", "lying-header"])
def test_it_fails_an_uploaded_evaluation_set_that_would_expand_past_the_limit(
    operator, tmp_path, artifact_root, make, django_capture_on_commit_callbacks
):
    data = make(tmp_path / "set.npz").read_bytes()
    version = make_version()
    client = token_client(operator)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            f"/api/v1/versions/{version.pk}/artifacts/",
            {"file": SimpleUploadedFile("set.npz", data), "role": "evaluation", "format": "npz"},
            format="multipart",
        )
    polled = client.get(response.json()["url"]).json()

    assert response.status_code == 201, response.json()
    assert polled["status"] == "failed"
    assert "expands to more than 134217728 bytes (EVALUATION_SET_MAX_BYTES)" in polled["error"]
    assert not [p for p in artifact_root.rglob("*") if p.is_file()]


@pytest.mark.django_db
def test_it_builds_desired_messages_without_expanding_a_stored_bomb(tmp_path, fake_publisher):
    # A set stored before uploads were checked: the plane must still never expand it.
    version = make_version(make_model("embedder"), task=InferenceTask.EMBEDDING)
    add_ready_artifact(version)
    registry.add_generated_artifact(
        version, bomb(tmp_path / "bomb.npz"), filename="set.npz", actor="system", role=ArtifactRole.EVALUATION,
        format="npz",
    )  # fmt: skip
    version = registry.publish_version(version, actor="system")
    device = make_device("dev-1")
    assignments.assign_version(version, [device], actor="system")
    _selftest.cache_clear()
    reset_peak_rss()
    before = peak_rss()

    (desired,) = desired_messages([device])

    assert desired.selftest is None
    assert peak_rss() - before < 64 * 1024 * 1024, f"grew by {(peak_rss() - before) >> 20} MiB"
