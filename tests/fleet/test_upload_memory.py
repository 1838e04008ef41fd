"""A large upload through a real web server: the request streams the file to disk, no more.

Parsing an ONNX model takes a few times its size in memory, so the web process must never
do it; the worker checks the file afterwards. The server is its own process, so its peak
RSS (VmHWM) is the request's own, and the upload is sent in blocks, as a client would.
"""

import http.client
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from django.db import connection
from onnx import TensorProto, helper, numpy_helper

from fleet.tasks import process_artifact
from tests.fleet.helpers import api_token, make_operator, make_version
from tests.support import REPO, free_port, wait_for_port

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

MIB = 1024 * 1024
MODEL_MIB = 160


def write_large_model(path: Path, mib: int) -> None:
    weights = np.zeros((1, mib * MIB // 4), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(weights.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(weights.shape))],
        initializer=[numpy_helper.from_array(weights, name="w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def post_file(port: int, path: str, file: Path, token: str) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="precision"\r\n\r\nfp32\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="large.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.putrequest("POST", path)
    conn.putheader("Authorization", f"Token {token}")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(len(head) + file.stat().st_size + len(tail)))
    conn.endheaders()
    conn.send(head)
    with file.open("rb") as stream:
        while block := stream.read(MIB):
            conn.send(block)
    conn.send(tail)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@pytest.fixture
def web(tmp_path, settings):
    """``manage.py runserver`` in its own process on this test's database and artifact root."""
    port = free_port()
    db = connection.settings_dict
    env = {
        **os.environ,
        "DEBUG": "true",
        "DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "ARTIFACT_ROOT": str(settings.ARTIFACT_ROOT),
        "SIGNING_KEY": settings.SIGNING_KEY,
        # Queued in the server's memory and never run there: this test plays the worker.
        "REDIS_URL": "",
        "CELERY_TASK_ALWAYS_EAGER": "false",
    }
    log = (tmp_path / "web.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", "--nothreading", f"127.0.0.1:{port}"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=60)
        yield server, port
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def test_it_takes_a_large_model_without_parsing_it_in_the_request(web, tmp_path, settings):
    server, port = web
    operator = make_operator()
    version = make_version()
    token = api_token(operator)
    model = tmp_path / "large.onnx"
    write_large_model(model, MODEL_MIB)
    # Warm the server up (imports, a first request) before measuring.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/api/v1/models/", headers={"Authorization": f"Token {token}"})
    assert conn.getresponse().status == 200
    before = peak_rss(server.pid)

    status, body = post_file(port, f"/api/v1/versions/{version.pk}/artifacts/", model, token)
    grown = peak_rss(server.pid) - before

    assert status == 201, body
    assert body["status"] == "processing"
    # Parsing would take at least twice the file (read, then parse): the request stays far below one.
    assert grown < MODEL_MIB * MIB // 4, f"the web process grew by {grown / MIB:.0f} MiB for a {MODEL_MIB} MiB file"
    assert process_artifact(body["id"]) == "ready"
