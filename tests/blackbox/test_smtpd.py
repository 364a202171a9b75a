"""qmail-smtpd as only a real `twistd qmail` on loopback shows it (see
tests/support/server.py): what survives kill -9, real socket buffers against a
client that reads no replies, control files and tcp.smtp picked up by the
running server's own polling, a relay through smtproutes to another server,
and junk on real sockets.  The protocol itself (replies, policy, PIPELINING,
DATA framing, timeouts) is tested in memory in tests/unit/test_smtpd.py.

Client addresses tell tcp.smtp rules apart: every 127.x address is loopback
on Linux, and a client may bind any of them.
"""

from __future__ import annotations

import random
import re
import select
import socket
import struct
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support.fakesmtp import FakeSMTP
from tests.support.home import DOMAIN, ME, Home, make_home
from tests.support.server import Server, session
from tests.support.smtpclient import ask, client_hello, read_replies, read_until_closed, unique, wire
from tests.support.waiting import DEADLINE, DeadPort, wait_until

PLAIN = "127.0.0.1"      # no environment: may only send to rcpthosts
RELAY = "127.0.0.2"      # RELAYCLIENT=""
DENIED = "127.0.0.3"     # deny
ALICE = f"alice@{DOMAIN}"

REPLY_RCPTHOSTS = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
REPLY_SIZE = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)"
QUEUED = re.compile(rb"250 ok (\d+) qp (\d+)")


# -- fixtures and helpers ------------------------------------------------------------

@pytest.fixture
def start_server(tmp_path: Path, dead_port: DeadPort) -> Iterator[Callable[..., Server]]:
    """Start a server of its own for a test; remote mail goes where smtproutes says,
    else to a port that refuses connections, so nothing leaves loopback."""
    servers: list[Server] = []

    def start(controls: dict[str, str] | None = None, tcp_smtp: str | None = None) -> Server:
        home = make_home(tmp_path / f"home{len(servers)}", controls=controls, tcp_smtp=tcp_smtp)
        server = Server(home, dns_port=dead_port.port).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def send(server: Server, sender: str, recipients: list[str], message: bytes, source: str = PLAIN) -> bytes:
    """One whole transaction, step by step; the reply to the message data."""
    with session(server, source) as sock:
        replies = ask(sock, "EHLO client.example.test", f"MAIL FROM:<{sender}>",
                      *[f"RCPT TO:<{r}>" for r in recipients], "DATA")
        assert all(reply.startswith(b"250") for reply in replies[:-1]), replies
        assert replies[-1] == b"354 go ahead", replies
        sock.sendall(wire(message) + b".\r\n")
        final, = read_replies(sock, 1)
        ask(sock, "QUIT")
        return final


def sized_message(size: int, marker: str) -> bytes:
    """An LF message of exactly ``size`` bytes that contains ``marker``."""
    head = f"Subject: {marker}\n\n".encode()
    filler = size - len(head)
    lines = [b"y" * 99 + b"\n"] * (filler // 100)
    rest = filler - 100 * len(lines)
    message = head + b"".join(lines) + (b"z" * (rest - 1) + b"\n" if rest else b"")
    assert len(message) == size
    return message


def replies_in(received: bytes) -> list[bytes]:
    """Split a byte stream from the server into complete replies."""
    replies, current = [], []
    for line in received.split(b"\r\n")[:-1]:
        current.append(line)
        if line[3:4] != b"-":
            replies.append(b"\r\n".join(current))
            current = []
    assert not current and received.endswith(b"\r\n"), received[-200:]
    return replies



def peak_memory_kib(pid: int) -> int:
    """The process's peak resident size (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


# -- relaying to another server ---------------------------------------------------------

def test_relayclient_from_tcp_smtp_relays_to_the_smtproutes_host(start_server, sink: FakeSMTP):
    server = start_server(controls={"smtproutes": f"sink.test:127.0.0.1:{sink.port}\n"},
                          tcp_smtp=f'{RELAY}:allow,RELAYCLIENT=""\n:allow\n')
    marker = unique("relayed")
    reply = send(server, "someone@example.test", ["friend@sink.test"], f"Subject: {marker}\n\nrelayed\n".encode(),
                 source=RELAY)
    assert QUEUED.fullmatch(reply)
    relayed = sink.wait_for(marker.encode())
    assert relayed.sender == "someone@example.test"
    assert relayed.recipients == ["friend@sink.test"]
    assert relayed.data.startswith(b"Received: from unknown (HELO client.example.test) (127.0.0.2)\r\n")


# -- hostile input on real sockets -------------------------------------------------------------

def test_junk_resets_and_tls_on_the_plain_port_leave_the_server_running(start_server):
    server = start_server()
    with session(server) as sock:
        sock.sendall(random.Random(7).randbytes(65536) + b"\r\nNOOP\r\nQUIT\r\n")
        replies = replies_in(read_until_closed(sock))
    assert replies[-2:] == [b"250 ok", f"221 {ME}".encode()]
    assert replies[:-2] and all(reply.startswith(b"5") for reply in replies[:-2])

    with session(server) as sock:
        sock.sendall(client_hello() + b"\r\nNOOP\r\nQUIT\r\n")
        assert replies_in(read_until_closed(sock))[-2:] == [b"250 ok", f"221 {ME}".encode()]

    marker = unique("vanished")
    sock = session(server)
    sock.sendall(f"HELO c\r\nMAIL FROM:<{marker}@remote.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode())
    assert read_replies(sock, 4)[-1] == b"354 go ahead"
    sock.sendall(f"Subject: {marker}\r\n\r\n".encode() + b"half a message\r\n" * 5000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # with linger 0: a reset, no FIN

    server.barrier(ALICE, unique("barrier"))  # the server still takes mail
    assert server.process.poll() is None
    assert f"from <{marker}@remote.test>" not in server.log
    assert "Traceback" not in server.log and "Unhandled" not in server.log, server.log[-3000:]


def test_client_that_does_not_read_replies_cannot_grow_server_memory(start_server):
    server = start_server()
    with session(server) as probe:
        help_reply = ask(probe, "HELP")[0] + b"\r\n"
    before = peak_memory_kib(server.process.pid)
    count = 350_000  # 2 MB of commands asking for 40 MB of replies
    commands = memoryview(b"HELP\r\n" * count)
    expected = len(f"220 {ME} ESMTP\r\n") + count * len(help_reply)
    sent = received = 0
    with server.connect() as sock:
        sock.setblocking(False)
        # Write without reading until the server stops taking input, as a careful server does.
        while sent < len(commands) and select.select([], [sock], [], 1.0)[1]:
            sent += sock.send(commands[sent:sent + 65536])
        # Then read every reply, writing the rest as the server takes it.
        while received < expected:
            readable, writable, _ = select.select([sock], [sock] if sent < len(commands) else [], [], DEADLINE)
            assert readable or writable, f"stalled after {received} of {expected} bytes"
            if writable:
                sent += sock.send(commands[sent:sent + 65536])
            if readable:
                chunk = sock.recv(1 << 20)
                assert chunk, "closed early"
                received += len(chunk)
    growth_mib = (peak_memory_kib(server.process.pid) - before) / 1024
    assert growth_mib < 8, f"the server's peak memory grew by {growth_mib:.0f} MiB"


# -- live reconfiguration ---------------------------------------------------------------------

def ehlo_size(server: Server) -> bytes:
    with session(server) as sock:
        return ask(sock, "EHLO c")[0].split(b"\r\n")[-1]


def rcpt_reply(server: Server, address: str, source: str = PLAIN) -> bytes:
    with session(server, source) as sock:
        return ask(sock, "HELO c", "MAIL FROM:<a@remote.test>", f"RCPT TO:<{address}>")[2]


def test_databytes_and_tcp_smtp_changes_apply_to_new_sessions(start_server):
    server = start_server()
    home: Home = server.home
    assert ehlo_size(server) == b"250 SIZE"  # databytes 0: unlimited
    earlier = session(server)

    home.control("databytes", "2000\n")
    wait_until(lambda: ehlo_size(server) == b"250 SIZE 2000", "databytes 2000 in EHLO")
    assert send(server, "a@remote.test", [ALICE], sized_message(2001, unique("toobig"))) == REPLY_SIZE
    assert QUEUED.fullmatch(send(server, "a@remote.test", [ALICE], sized_message(2000, unique("fits"))))
    # A session keeps the settings it began with.
    assert ask(earlier, "EHLO c")[0].split(b"\r\n")[-1] == b"250 SIZE"
    earlier.close()

    assert rcpt_reply(server, "friend@remote.test") == REPLY_RCPTHOSTS
    home.tcp_smtp(f'{PLAIN}:allow,RELAYCLIENT=""\n{DENIED}:deny\n:allow\n')
    wait_until(lambda: rcpt_reply(server, "friend@remote.test") == b"250 ok", "RELAYCLIENT from tcp.smtp")

    def denied() -> bool:
        with server.connect(DENIED) as sock:
            try:
                return sock.recv(100) == b""  # a banner means the rule is not in force yet
            except ConnectionResetError:
                return True
    wait_until(denied, "the deny rule")


# -- crash safety ------------------------------------------------------------------------------

def test_message_acknowledged_before_kill_9_is_delivered_after_restart(start_server, dead_port, sink: FakeSMTP):
    server = start_server(controls={"smtproutes": f"remote.test:127.0.0.1:{dead_port.port}\n"},
                          tcp_smtp=f'{PLAIN}:allow,RELAYCLIENT=""\n')
    home: Home = server.home
    marker = unique("durable")
    recipient = "friend@remote.test"
    reply = send(server, "someone@example.test", [recipient], f"Subject: {marker}\n\nkeep me\n".encode())
    server.kill()

    message_id = QUEUED.fullmatch(reply).group(2).decode()
    assert home.qstat() == (1, 0)
    assert f"#{message_id}" in home.qread()

    server.start()
    assert f"#{message_id}" in home.qread()
    home.control("smtproutes", f"remote.test:127.0.0.1:{sink.port}\n")
    server.wait_for_log("reloaded control/smtproutes")
    home.qtwist("queue", "flush")
    delivered = sink.wait_for(marker.encode())
    assert delivered.recipients == [recipient]
    assert delivered.data.endswith(b"\r\nkeep me\r\n")
    wait_until(lambda: home.qstat() == (0, 0), "an empty queue")
