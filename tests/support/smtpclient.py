"""Talking SMTP by hand over a socket, where smtplib would hide what is on
the wire: exact replies, pipelining in one write, junk."""

from __future__ import annotations

import socket
import time
import uuid

from tests.support.waiting import DEADLINE


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def read_replies(sock: socket.socket, count: int, timeout: float = DEADLINE) -> list[bytes]:
    """Exactly ``count`` complete SMTP replies (multi-line ones joined), in order."""
    replies: list[bytes] = []
    buffer = b""
    current: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(replies) < count:
        while b"\r\n" in buffer and len(replies) < count:
            line, buffer = buffer.split(b"\r\n", 1)
            current.append(line)
            if line[3:4] != b"-":
                replies.append(b"\r\n".join(current))
                current = []
        if len(replies) == count:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"only {len(replies)} of {count} replies: {replies!r} then {buffer!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no reply within {timeout:g} s; got {replies!r} then {buffer!r}") from None
        if not chunk:
            raise AssertionError(f"closed after {len(replies)} of {count} replies: {replies!r} then {buffer!r}")
        buffer += chunk
    return replies


def read_until_closed(sock: socket.socket, timeout: float = DEADLINE) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"still open after {timeout:g} s; got {received[-300:]!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            raise AssertionError(f"still open after {timeout:g} s; got {received[-300:]!r}") from None
        if not chunk:
            return received
        received += chunk


def greeted(sock: socket.socket) -> socket.socket:
    """``sock`` once the banner is read."""
    banner, = read_replies(sock, 1)
    assert banner.startswith(b"220 "), banner
    return sock


def ask(sock: socket.socket, *lines: str | bytes) -> list[bytes]:
    """Send each line (CRLF added) and read its reply, one at a time."""
    replies = []
    for line in lines:
        sock.sendall((line.encode("latin-1") if isinstance(line, str) else line) + b"\r\n")
        replies += read_replies(sock, 1)
    return replies


def wire(message: bytes) -> bytes:
    """An LF message as DATA carries it: CRLF line ends, leading dots doubled.
    ``message`` is empty or ends with LF."""
    lines = message.split(b"\n")[:-1]
    return b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines)
