"""Waiting without sleeping blindly: poll a condition with a deadline; and
loopback ports that are free, or that refuse every connection."""

from __future__ import annotations

import socket
import time
from typing import Callable, TypeVar

DEADLINE = 10.0

T = TypeVar("T")


def poll(condition: Callable[[], T], timeout: float, interval: float = 0.02) -> T:
    """Call ``condition`` until it returns something true, for at most
    ``timeout`` seconds; returns its last result (false on timeout)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return result


def wait_until(condition: Callable[[], T], what: str, timeout: float = DEADLINE,
               interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something true, and return that;
    fail, naming ``what``, after ``timeout`` seconds."""
    result = poll(condition, timeout, interval)
    if not result:
        raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
    return result


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's pick for port 0), and
    never one this process was given before: a server asks for several, and
    the kernel may pick a closed probe's port again."""
    while True:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port now."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


class DeadPort:
    """A loopback port that refuses every connection for as long as this object
    lives: bound, never listening, so no other program can take it meanwhile."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]

    def close(self) -> None:
        self._socket.close()
