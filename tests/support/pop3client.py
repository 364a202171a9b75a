"""poplib's client from a chosen loopback address (grants and throttling are per client IP)."""

from __future__ import annotations

import poplib
import socket

from tests.support.waiting import DEADLINE

LOOPBACK = "127.0.0.1"


class SourcedPOP3(poplib.POP3):
    """poplib.POP3 connecting from ``source`` (any 127.x address)."""

    def __init__(self, port: int, source: str) -> None:
        self._source = source
        super().__init__(LOOPBACK, port, timeout=DEADLINE)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))
