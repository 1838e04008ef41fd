"""The local inference API on 127.0.0.1: what applications on the device call.

Stdlib only (ThreadingHTTPServer): one thread per connection, at most
``max_connections`` of them (more get 503 at once), each closed after ``timeout``
seconds of silence, so stalled clients cannot pile up threads. onnxruntime runs
sessions concurrently, so embedders need no queue of our own; generations share
the cores and go through agent.chat's GenerationQueue, which answers 429 past its
line. Every request's outcome goes to the telemetry recorders, which the heartbeat
drains.

A generative model is served as OpenAI's chat completions API (agent.chat):
``stream: true`` answers with server-sent events in chunked transfer encoding, and
a client that goes away mid-stream stops its generation at the next token.
"""

from __future__ import annotations

import email.utils
import logging
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, cast

import msgspec

from agent import chat
from agent.config import GenerationConfig
from agent.generate import GenerateError, Generation, LoadedGenerator
from agent.runtime import BadInput, LoadedModel, NoActiveModel, Runner
from agent.telemetry import GenerationRecorder, LatencyRecorder

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 1024 * 1024
MAX_TEXTS: Final = 256
# Bodies up to this size are read and dropped before an error; beyond it, the connection is cut.
DISCARD_LIMIT_BYTES: Final = 16 * MAX_BODY_BYTES
INFER_PATH: Final = "/v1/infer"
HEALTH_PATH: Final = "/v1/health"
CHAT_PATH: Final = "/v1/chat/completions"
MODELS_PATH: Final = "/v1/models"
# A non-streaming generation looks for a client that went away every this many tokens.
CLIENT_CHECK_EVERY: Final = 4
_BUSY_BODY: Final = b'{"error": {"message": "too many connections; retry", "type": "server_busy"}}'
_decode: Final = msgspec.json.Decoder().decode
_encode: Final = msgspec.json.Encoder().encode


class RequestError(Exception):
    """A request the server answers with an error status and a JSON ``error`` text."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class InferenceServer:
    """The HTTP server and its thread; ``port`` is the real one even when asked for port 0."""

    def __init__(
        self,
        runner: Runner,
        recorder: LatencyRecorder,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        generations: GenerationRecorder | None = None,
        timeout: float = 30.0,
        max_connections: int = 64,
        generation: GenerationConfig | None = None,
    ) -> None:
        settings = generation or GenerationConfig()
        self._httpd = _Server(
            (host, port),
            runner,
            recorder,
            generations=generations or GenerationRecorder(),
            timeout=timeout,
            max_connections=max_connections,
            settings=settings,
        )
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

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return self._httpd.connections

    @property
    def refused(self) -> int:
        """Connections turned away with 503 because max_connections were being served."""
        return self._httpd.refused


class _Server(ThreadingHTTPServer):
    """Carries the runner, recorders and limits to every request handler; caps the connections."""

    daemon_threads = True
    # Connections the kernel holds before accept(): a burst waits there instead of being refused.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        runner: Runner,
        recorder: LatencyRecorder,
        *,
        generations: GenerationRecorder,
        timeout: float,
        max_connections: int,
        settings: GenerationConfig,
    ) -> None:
        super().__init__(address, _Handler)
        self.runner = runner
        self.recorder = recorder
        self.generations = generations
        self.timeout_s = timeout
        self.settings = settings
        self.queue = chat.GenerationQueue(settings.max_running, settings.max_waiting)
        self.max_connections = max_connections
        self.connections = 0
        self.refused = 0
        self._count_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._count_lock:
            full = self.connections >= self.max_connections
            if full:
                self.refused += 1
            else:
                self.connections += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread to release the place: release it here
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count_lock:
            self.connections -= 1

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 on the accepting thread without reading the request: a few bytes, never blocking long."""
        log.warning("http.refused max_connections=%d refused=%d", self.max_connections, self.refused)
        try:
            request.settimeout(0.05)
            head = (
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(_BUSY_BODY)
            )
            request.sendall(head + _BUSY_BODY)
        except OSError:
            pass
        self.shutdown_request(request)


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

    @property
    def _server(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        super().setup()
        # Reads and writes alike: a silent client, or one that stops reading a stream, times out.
        self.connection.settimeout(self._server.timeout_s)

    def do_GET(self) -> None:
        if self.path == MODELS_PATH:
            info = self.runner.info
            self._send(HTTPStatus.OK, chat.models_list(info.model or "edgefleet-model" if info else None))
            return
        if self.path != HEALTH_PATH:
            self._send(HTTPStatus.NOT_FOUND, _error_body(f"no such path {self.path}; try POST {INFER_PATH}"))
            return
        self._send(HTTPStatus.OK, health(self.runner))

    def do_POST(self) -> None:
        if self.path == CHAT_PATH:
            self._chat()
            return
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
            return HTTPStatus.OK, infer(self.runner.current_onnx(), request)
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
        try:
            return _decode(self._read_body())
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from None

    def _read_body(self) -> bytes:
        length = self._content_length()
        if length > MAX_BODY_BYTES:
            self._discard_body()
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit"
            )
        return self.rfile.read(length)

    # --- chat completions ---------------------------------------------------------

    def _chat(self) -> None:
        """POST /v1/chat/completions: parse, wait for a generation slot, answer whole or as a stream."""
        started = time.perf_counter()
        try:
            model, request, prompt_ids = self._chat_request()
        except RequestError as exc:
            self._chat_failed(exc.status, chat.error_body(str(exc)))
            return
        except Exception:  # the tokenizer or template failed on this input: the model's fault, not the caller's
            log.exception("http.chat_prompt_failed")
            body = chat.error_body("cannot build the prompt; see the agent's log", "server_error")
            self._chat_failed(HTTPStatus.INTERNAL_SERVER_ERROR, body)
            return
        try:
            with self._server.queue.slot():
                if self._client_gone():  # it gave up while waiting in line
                    self._chat_done(None, ok=True)
                    return
                sampling = request.sampling(self._server.settings.default_max_tokens)
                generation = model.start(prompt_ids, sampling, request.stops(), started=started)
                completion = chat.Completion(model.info.model or "edgefleet-model")
                if request.stream:
                    self._stream(generation, completion, include_usage=request.include_usage)
                else:
                    self._complete(generation, completion)
        except chat.Busy as exc:
            body = chat.error_body(str(exc), "rate_limit_error", "model_busy")
            self._chat_failed(HTTPStatus.TOO_MANY_REQUESTS, body, retry_after=exc.retry_after)
        except GenerateError as exc:
            self._chat_failed(HTTPStatus.BAD_REQUEST, chat.error_body(str(exc)))

    def _chat_request(self) -> tuple[LoadedGenerator, chat.ChatRequest, list[int]]:
        body = self._read_body()
        try:
            model = self.runner.current()
        except NoActiveModel:
            raise RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "no model is active on this device yet; deploy one from the control plane, then retry",
            ) from None
        if not isinstance(model, LoadedGenerator):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"model {model.info.model!r} does not generate text: POST {INFER_PATH}"
            )
        try:
            request = chat.parse_request(body)
            return model, request, model.prompt_ids(request.chat_messages())
        except GenerateError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None

    def _complete(self, generation: Generation, completion: chat.Completion) -> None:
        pieces: list[str] = []
        try:
            for piece in generation:
                pieces.append(piece)
                if generation.completion_tokens % CLIENT_CHECK_EVERY == 0 and self._client_gone():
                    generation.close()
                    self.close_connection = True
                    self._chat_done(generation, ok=True)
                    return
        except Exception:
            self._generation_crashed(generation)
            self._send(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                chat.error_body("generation failed; see the agent's log", "server_error"),
            )
            return
        usage = chat.usage(generation.prompt_tokens, generation.completion_tokens)
        self._chat_done(generation, ok=True)  # before the answer: a client reading the heartbeat next sees it
        self._send(HTTPStatus.OK, completion.response("".join(pieces), generation.finish_reason, usage))

    def _stream(self, generation: Generation, completion: chat.Completion, *, include_usage: bool) -> None:
        """Server-sent events, one per text piece, as OpenAI streams them; ends with ``data: [DONE]``."""
        self.close_connection = True  # until the stream ended cleanly
        try:
            self._start_stream()
            self._event(completion.chunk({"role": "assistant", "content": ""}, usage=include_usage))
            for piece in generation:
                self._event(completion.chunk({"content": piece}, usage=include_usage))
        except OSError as exc:  # the client went away (reset, broken pipe) or stopped reading (timeout)
            generation.close()
            log.info("http.stream_abandoned tokens=%d reason=%s", generation.completion_tokens, type(exc).__name__)
            self._chat_done(generation, ok=True)
            return
        except Exception:
            self._generation_crashed(generation)
            self._end_stream(chat.error_body("generation failed; see the agent's log", "server_error"))
            return
        self._chat_done(generation, ok=True)  # the generation is over; recorded before the client hears so
        try:
            self._event(completion.chunk({}, generation.finish_reason, usage=include_usage))
            if include_usage:
                self._event(completion.usage_chunk(chat.usage(generation.prompt_tokens, generation.completion_tokens)))
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")
            self.close_connection = False
        except OSError:
            pass

    def _start_stream(self) -> None:
        self.log_request(HTTPStatus.OK.value)
        head = (
            b"HTTP/1.1 200 OK\r\nServer: "
            + self.server_version.encode()
            + b"\r\n"
            + _date_header()
            + b"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.wfile.write(head)

    def _event(self, data: dict[str, Any]) -> None:
        self._write_chunk(b"data: " + _encode(data) + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        """One chunk of chunked transfer encoding, in one write; empty data ends the body."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_stream(self, error: dict[str, Any]) -> None:
        try:
            self._event(error)
            self._write_chunk(b"")
        except OSError:
            pass

    def _client_gone(self) -> bool:
        """True when the client closed its end: the socket reads as end-of-file, without waiting."""
        # poll, not select (no 1024-descriptor limit), and not a recv flag: a socket with a timeout
        # waits for readability inside recv whatever the flags say.
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        try:
            if not poller.poll(0):
                return False  # nothing to read: still there
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True

    def _generation_crashed(self, generation: Generation) -> None:
        log.exception("http.generation_failed tokens=%d", generation.completion_tokens)
        generation.close()
        self.close_connection = True
        self.recorder.count(ok=False, fault=True)
        self._server.generations.record(ok=False, tokens=generation.completion_tokens)

    def _chat_failed(self, status: HTTPStatus, body: dict[str, Any], retry_after: int | None = None) -> None:
        self.recorder.count(ok=False, fault=status == HTTPStatus.INTERNAL_SERVER_ERROR)
        self._server.generations.record(ok=False)
        self._send(status, body, retry_after=retry_after)

    def _chat_done(self, generation: Generation | None, *, ok: bool) -> None:
        self.recorder.count(ok=ok)
        if generation is None:
            self._server.generations.record(ok=ok)
            return
        self._server.generations.record(
            ok=ok, tokens=generation.completion_tokens, ttft_ms=generation.ttft_ms, decode_tps=generation.decode_tps
        )

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

    def _send(self, status: HTTPStatus, body: dict[str, Any], *, retry_after: int | None = None) -> None:
        data = _encode(body)  # msgspec: a 384-float embedding encodes ~10x faster than with json
        self.log_request(status.value, len(data))
        # Status line, headers and body in one write (send_response + end_headers + write are
        # two): the client wakes once, with the whole answer. A client in the same process (the
        # benchmark, a test) would otherwise take the GIL on the headers and keep this thread
        # waiting to write the body, up to a 5 ms switch interval.
        head = _STATUS_LINES[status] + _date_header() + b"Content-Length: %d\r\n" % len(data)
        if retry_after is not None:
            head += b"Retry-After: %d\r\n" % retry_after
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
