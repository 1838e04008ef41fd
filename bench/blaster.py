"""A cheap heartbeat load for the ingestion benchmark: raw MQTT publishes, batched per write.

On a 2-core machine, paho-based publishers would spend the CPU the bridge needs to
store what they send. This writes pre-framed MQTT 3.1.1 QoS 1 PUBLISH packets of
real ``wire.Heartbeat`` payloads, many per ``send``, keeps a bounded number unacked
per connection, and counts the broker's PUBACKs. The bridge and the bare-subscriber
ceiling are both measured against this same load.
"""

from __future__ import annotations

import multiprocessing
import selectors
import socket
import struct
import time

from agent.contract import wire

BATCH = 50
MAX_UNACKED = 400


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: bytes) -> bytes:
    return struct.pack(">H", len(text)) + text


def connect_packet(client_id: str, login: tuple[str, str] | None = None) -> bytes:
    """MQTT 3.1.1 CONNECT with a clean session and, if given, a (username, password)."""
    flags = 0x02 | (0xC0 if login else 0)
    body = _string(b"MQTT") + bytes([4, flags]) + struct.pack(">H", 60) + _string(client_id.encode())
    if login:
        body += _string(login[0].encode()) + _string(login[1].encode())
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, mid: int) -> bytes:
    body = _string(topic.encode()) + struct.pack(">H", mid) + payload
    return b"\x32" + _remaining_length(len(body)) + body


def heartbeat_payload(device_id: str, seq: int) -> bytes:
    now = time.time()
    return wire.encode(
        wire.Heartbeat(device_id=device_id, seq=seq, sent_at=now, interval_s=30.0, uptime_s=100.0, cpu_percent=7.5,
                       mem_rss_bytes=120 << 20, mem_available_bytes=2 << 30, requests=20,
                       latency=wire.LatencyStats(count=20, p50_ms=6.0, p95_ms=9.6, p99_ms=12.0, max_ms=14.0))
    )  # fmt: skip


class _Conn:
    def __init__(self, port: int, device_ids: list[str], n: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(f"bench-blaster-{n}-{time.monotonic_ns()}"))
        if self.sock.recv(4)[:1] != b"\x20":
            raise ConnectionError("the broker refused the blaster")
        self.sock.setblocking(False)
        self.devices = [(d, wire.topic(d, wire.Channel.HEARTBEAT)) for d in device_ids]
        self.next = 0
        self.mid = 0
        self.unacked = 0
        self.acked = 0
        self.pending = b""
        self.partial = 0

    def fill(self) -> None:
        packets = []
        for _ in range(BATCH):
            device_id, topic = self.devices[self.next % len(self.devices)]
            self.next += 1
            self.mid = self.mid % 65535 + 1
            packets.append(publish_packet(topic, heartbeat_payload(device_id, self.next), self.mid))
        self.pending += b"".join(packets)
        self.unacked += BATCH

    def write(self, allowed: float) -> None:
        if not self.pending and self.unacked < MAX_UNACKED and self.next < allowed:
            self.fill()
        if not self.pending:
            return
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return
        self.pending = self.pending[sent:]

    def read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionError("the broker closed the blaster's connection")
        # Every packet coming back is a 4-byte PUBACK.
        total = self.partial + len(data)
        acks, self.partial = divmod(total, 4)
        self.acked += acks
        self.unacked -= acks


def blast(
    port: int, device_ids: list[str], *, duration: float, rate: float, connections: int = 4, settle: bool = False
) -> int:
    """Publish heartbeats for these devices at ``rate`` a second for ``duration`` seconds.

    Returns how many the broker acknowledged; with ``settle``, after waiting for every one
    sent to be acknowledged (a backlog whose size must be known).
    """
    conns = [_Conn(port, device_ids[n::connections], n) for n in range(connections) if device_ids[n::connections]]
    selector = selectors.DefaultSelector()
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
    started = time.monotonic()
    per_connection = rate / len(conns)
    while (now := time.monotonic()) < started + duration:
        allowed = (now - started) * per_connection
        for key, mask in selector.select(0.002):
            conn = key.data
            if mask & selectors.EVENT_READ:
                conn.read()
            if mask & selectors.EVENT_WRITE:
                conn.write(allowed)
        if not any(conn.pending or conn.next < allowed for conn in conns):
            time.sleep(0.002)
    if settle:
        _settle(selector, conns)
    for conn in conns:
        conn.sock.close()
    return sum(conn.acked for conn in conns)


def _settle(selector: selectors.BaseSelector, conns: list[_Conn], timeout: float = 30.0) -> None:
    """Send what is written and wait for its PUBACKs: every heartbeat sent is then in the broker."""
    deadline = time.monotonic() + timeout
    while any(conn.pending or conn.unacked for conn in conns) and time.monotonic() < deadline:
        for key, mask in selector.select(0.05):
            conn = key.data
            if mask & selectors.EVENT_READ:
                conn.read()
            if mask & selectors.EVENT_WRITE:
                conn.write(allowed=0)


def _blast_part(port, device_ids, duration, rate, settle, results) -> None:
    results.put(blast(port, device_ids, duration=duration, rate=rate, settle=settle))


def blast_processes(
    port: int, device_ids: list[str], *, duration: float, rate: float, processes: int = 1, settle: bool = False
) -> int:
    """``blast`` split over processes; returns the total acked."""
    if processes <= 1:
        return blast(port, device_ids, duration=duration, rate=rate, settle=settle)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    procs = [
        context.Process(
            target=_blast_part,
            args=(port, device_ids[p::processes], duration, rate / processes, settle, results),
            daemon=True,
        )
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    total = sum(results.get(timeout=duration + 60) for _ in procs)
    for proc in procs:
        proc.join(timeout=10)
    return total
