"""Talking SMTP by hand over a socket, where smtplib would hide what is on
the wire: exact replies, pipelining in one write, junk."""

from __future__ import annotations

import socket
import ssl
import time
import uuid

from tests.support.waiting import DEADLINE


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def _receive(sock: socket.socket, deadline: float) -> bytes | None:
    """The next bytes before ``deadline``: b"" once the server closed, None on timeout."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    sock.settimeout(remaining)
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        return None


def read_replies(sock: socket.socket, count: int, timeout: float = DEADLINE) -> list[bytes]:
    """Exactly ``count`` complete SMTP replies (multi-line ones joined), in order."""
    replies: list[bytes] = []
    buffer = b""
    current: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        while b"\r\n" in buffer and len(replies) < count:
            line, buffer = buffer.split(b"\r\n", 1)
            current.append(line)
            if line[3:4] != b"-":
                replies.append(b"\r\n".join(current))
                current = []
        if len(replies) == count:
            return replies
        chunk = _receive(sock, deadline)
        if chunk is None:
            raise AssertionError(f"only {len(replies)} of {count} replies within {timeout:g} s: "
                                 f"{replies!r} then {buffer!r}")
        if not chunk:
            raise AssertionError(f"closed after {len(replies)} of {count} replies: {replies!r} then {buffer!r}")
        buffer += chunk


def read_until_closed(sock: socket.socket, timeout: float = DEADLINE) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    deadline = time.monotonic() + timeout
    while chunk := _receive(sock, deadline):
        received += chunk
    if chunk is None:
        raise AssertionError(f"still open after {timeout:g} s; got {received[-300:]!r}")
    return received


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


def client_hello(server_name: str = "mx.example.test") -> bytes:
    """The first flight of a real TLS client, for junk on a plain port."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass  # it waits for the server's answer: what it wrote is the ClientHello
    return outgoing.read()
