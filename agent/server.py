"""The local inference API on 127.0.0.1: what applications on the device call.

Stdlib only (ThreadingHTTPServer): one thread per request, and onnxruntime runs
sessions concurrently, so there is no queue of our own to tune. Every infer
request's latency and outcome goes to the telemetry recorder, which the
heartbeat drains.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, cast

import msgspec

from agent.runtime import BadInput, LoadedModel, NoActiveModel, Runner
from agent.telemetry import LatencyRecorder

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 1024 * 1024
MAX_TEXTS: Final = 256
# Bodies up to this size are read and dropped before an error; beyond it, the connection is cut.
DISCARD_LIMIT_BYTES: Final = 16 * MAX_BODY_BYTES
INFER_PATH: Final = "/v1/infer"
HEALTH_PATH: Final = "/v1/health"
_decode: Final = msgspec.json.Decoder().decode
_encode: Final = msgspec.json.Encoder().encode


class RequestError(Exception):
    """A request the server answers with an error status and a JSON ``error`` text."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class InferenceServer:
    """The HTTP server and its thread; ``port`` is the real one even when asked for port 0."""

    def __init__(self, runner: Runner, recorder: LatencyRecorder, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._httpd = _Server((host, port), runner, recorder)
        self._thread = threading.Thread(target=self._serve, name="inference-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    def start(self) -> None:
        self._thread.start()
        log.info("http.listening host=%s port=%d", self.host, self.port)

    def _serve(self) -> None:
        # A short poll makes stop() quick; the cost is a wake-up every 0.1 s.
        self._httpd.serve_forever(poll_interval=0.1)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()


class _Server(ThreadingHTTPServer):
    """Carries the runner and recorder to every request handler."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], runner: Runner, recorder: LatencyRecorder) -> None:
        super().__init__(address, _Handler)
        self.runner = runner
        self.recorder = recorder


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgefleet-agent"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the body waits for the
    # client's delayed ACK, which added ~40 ms to every kept-alive request.
    disable_nagle_algorithm = True

    @property
    def runner(self) -> Runner:
        return cast(_Server, self.server).runner

    @property
    def recorder(self) -> LatencyRecorder:
        return cast(_Server, self.server).recorder

    def do_GET(self) -> None:
        if self.path != HEALTH_PATH:
            self._send(HTTPStatus.NOT_FOUND, _error_body(f"no such path {self.path}; try POST {INFER_PATH}"))
            return
        self._send(HTTPStatus.OK, health(self.runner))

    def do_POST(self) -> None:
        if self.path != INFER_PATH:
            self._discard_body()
            self._send(HTTPStatus.NOT_FOUND, _error_body(f"no such path {self.path}; try POST {INFER_PATH}"))
            return
        started = time.perf_counter()
        status, body = self._infer()
        latency_ms = (time.perf_counter() - started) * 1000
        self.recorder.record(latency_ms, ok=status == HTTPStatus.OK, fault=status == HTTPStatus.INTERNAL_SERVER_ERROR)
        if status == HTTPStatus.OK:
            body["latency_ms"] = round(latency_ms, 3)
        self._send(status, body)

    def _infer(self) -> tuple[HTTPStatus, dict[str, Any]]:
        try:
            request = self._read_json()
            return HTTPStatus.OK, infer(self.runner.current(), request)
        except RequestError as exc:
            return exc.status, _error_body(str(exc))
        except NoActiveModel:
            return HTTPStatus.SERVICE_UNAVAILABLE, _error_body(
                "no model is active on this device yet; deploy one from the control plane, then retry"
            )
        except BadInput as exc:
            return HTTPStatus.BAD_REQUEST, _error_body(str(exc))
        except Exception:
            log.exception("http.infer_failed")
            return HTTPStatus.INTERNAL_SERVER_ERROR, _error_body("inference failed; see the agent's log")

    def _read_json(self) -> Any:
        length = self._content_length()
        if length > MAX_BODY_BYTES:
            self._discard_body()
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit"
            )
        try:
            return _decode(self.rfile.read(length))
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from None

    def _content_length(self) -> int:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, "send a Content-Length header") from None
        if length < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "Content-Length must not be negative")
        return length

    def _discard_body(self) -> None:
        """Read and drop a body we will not use, so the client sees our answer instead of a reset."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if length > DISCARD_LIMIT_BYTES:
            self.close_connection = True
            return
        while length > 0:
            block = self.rfile.read(min(length, 64 * 1024))
            if not block:
                return
            length -= len(block)

    def _send(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = _encode(body)  # msgspec: a 384-float embedding encodes ~10x faster than with json
        self.log_request(status.value, len(data))
        # Status line, headers and body in one write (send_response + end_headers + write are
        # two): the client wakes once, with the whole answer. A client in the same process (the
        # benchmark, a test) would otherwise take the GIL on the headers and keep this thread
        # waiting to write the body, up to a 5 ms switch interval.
        head = _STATUS_LINES[status] + _date_header() + b"Content-Length: %d\r\n" % len(data)
        if self.close_connection:
            head += b"Connection: close\r\n"
        self.wfile.write(head + b"\r\n" + data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The stdlib formats every request's line even when nobody logs it.
        if log.isEnabledFor(logging.DEBUG):
            super().log_request(code, size)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http.request client=%s %s", self.client_address[0], format % args)


def _status_line(status: HTTPStatus) -> bytes:
    server = f"{_Handler.server_version} {_Handler.sys_version}".strip()
    return (
        f"{_Handler.protocol_version} {status.value} {status.phrase}\r\n"
        f"Server: {server}\r\nContent-Type: application/json\r\n"
    ).encode("latin-1")


_STATUS_LINES: Final = {status: _status_line(status) for status in HTTPStatus}
_date_cache: tuple[int, bytes] = (0, b"")


def _date_header() -> bytes:
    """The Date header, formatted once a second rather than once a request."""
    global _date_cache
    now = int(time.time())
    second, header = _date_cache
    if second != now:
        header = f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n".encode("latin-1")
        _date_cache = (now, header)  # one tuple: a thread never sees a second with another's text
    return header


def health(runner: Runner) -> dict[str, Any]:
    info = runner.info
    if info is None:
        return {"status": "no_model", "model": None, "version": None, "sha256": None}
    return {"status": "ok", "model": info.model, "version": info.version, "sha256": info.sha256}


def infer(model: LoadedModel, request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise BadInput('send a JSON object: {"text": "..."}, {"texts": [...]} or {"inputs": {...}}')
    identity = {"model": model.info.model, "version": model.info.version}
    if "inputs" in request:
        return {"outputs": model.run(_inputs(request["inputs"])), **identity}
    vectors = model.embed(_texts(request))
    return {"embeddings": vectors, "dimensions": len(vectors[0]) if vectors else model.dimensions, **identity}


def _texts(request: dict[str, Any]) -> list[str]:
    if "text" in request:
        texts = [request["text"]]
    elif "texts" in request:
        texts = request["texts"]
    else:
        raise BadInput('send {"text": "..."} or {"texts": ["...", ...]} (or {"inputs": {...}} for a tensor model)')
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadInput('"text" must be a string and "texts" a list of strings')
    if not 1 <= len(texts) <= MAX_TEXTS:
        raise BadInput(f'"texts" must hold between 1 and {MAX_TEXTS} strings, not {len(texts)}')
    return texts


def _inputs(inputs: Any) -> dict[str, Any]:
    if not isinstance(inputs, dict) or not inputs:
        raise BadInput('"inputs" must be an object of input name to nested lists')
    return inputs


def _error_body(message: str) -> dict[str, Any]:
    return {"error": message}
