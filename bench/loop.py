"""Many paho clients in one thread: a selector drives their sockets.

paho's ``loop_start()`` costs a thread per client, which does not scale to ten
thousand simulated devices. Instead each client hands its socket to this loop
through paho's external-loop callbacks (``on_socket_open``, ``on_socket_close``,
``on_socket_register_write``, ``on_socket_unregister_write``), and the loop calls
``loop_read``/``loop_write`` when the socket is ready and ``loop_misc`` (keepalive)
about once a second.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

MISC_EVERY_S = 1.0


def leave_no_time_wait(sock: socket.socket) -> None:
    """Close with a reset, not a FIN: the socket leaves no TIME_WAIT behind.

    Every connection a benchmark closes on loopback holds its ephemeral port for 60 s
    in TIME_WAIT. The fan-out's 11,000 simulated devices, then the connections-held
    check's 10,000 bare connections and its 10,000 devices, within a minute, ran out of
    the 28,232 ports (32768-60999): connects failed and the devices said hello 30-40 s
    late. To the broker a reset is a device gone without a goodbye, as a crash is: its
    last will is published.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class ClientLoop:
    """One selector for every client added; ``run_once`` is one turn of the loop."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self._misc_at = time.monotonic()

    def add(self, client: mqtt.Client) -> mqtt.Client:
        client.on_socket_open = self._open
        client.on_socket_close = self._close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_writing
        self.clients.append(client)
        return client

    def _open(self, client: mqtt.Client, userdata: Any, sock: socket.socket) -> None:
        # Request/reply (chunks, state after desired) stalls on Nagle without this.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        leave_no_time_wait(sock)
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _close(self, client: mqtt.Client, userdata: Any, sock: socket.socket) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: socket.socket) -> None:
        try:
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _done_writing(self, client: mqtt.Client, userdata: Any, sock: socket.socket) -> None:
        try:
            self.selector.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def run_once(self, timeout: float = 0.05) -> int:
        """Serve every ready socket once; return how many were ready."""
        events = self.selector.select(timeout) if self.selector.get_map() else _sleep(timeout)
        for key, mask in events:
            client: mqtt.Client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        now = time.monotonic()
        if now - self._misc_at >= MISC_EVERY_S:
            self._misc_at = now
            for client in self.clients:
                if client.socket() is not None:
                    client.loop_misc()
        return len(events)

    def run_until(self, done: Callable[[], bool], *, timeout: float, tick: Callable[[], None] | None = None) -> bool:
        """Turn the loop until ``done()`` or ``timeout`` seconds pass; return ``done()``."""
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            self.run_once(0.02)
            if tick is not None:
                tick()
        return done()

    def close(self) -> None:
        for client in self.clients:
            if client.socket() is not None:
                client.disconnect()
        # Let the DISCONNECT packets go out before the sockets close.
        self.run_until(lambda: all(c.socket() is None or not c.want_write() for c in self.clients), timeout=2)
        for client in self.clients:
            sock = client.socket()
            if sock is not None:
                self._close(client, None, sock)
                sock.close()
        self.selector.close()


def _sleep(timeout: float) -> list:
    time.sleep(timeout)
    return []
