#!/usr/bin/env python3
"""A bounded network fuzz run of `twistd qmail`: broken clients must never
break the server for good ones.

Starts the installed qtwist on a fresh home (SMTP, submission and POP3 on
loopback ports, STARTTLS/STLS with a self-signed certificate) and for
--seconds drives --sessions parallel client sessions that misbehave in every
way a fuzz run can name: well-formed SMTP and POP3 sessions with commands
reordered, dropped, duplicated or given junk arguments; junk lines, NUL
bytes, bare CR and LF, 8-bit bytes, lines of hundreds of KB; a TLS
ClientHello on a plain port; STARTTLS/STLS followed by junk; AUTH with junk
base64; DATA cut off, or with bare LF; pipelined floods; connections reset
(SO_LINGER 0) at random points; clients that say nothing or never read.

Every --check-every seconds a well-formed client checks that the server
still works: an SMTP transaction to alice@example.test must get its 250 and
the message must reach alice's Maildir within --delivery-deadline, and a POP3
login as alice must get +OK and a STAT.  At the end the server is stopped
and its log searched for tracebacks.  The exit status is non-zero when a
check failed, the log holds a traceback, or the server died, would not stop
or grew past --max-rss MiB (the run stops there).

    python bench/fuzz.py [--seconds 60] [--sessions 20] [--seed N] [--keep]

Each session's inputs follow from (--seed, its number) alone, and
work/sessions.log lists every session (start time, number, service, source
address, what it did, how it ended), so a session seen near a traceback's
time can be replayed alone, with what it sends and receives printed:

    python bench/fuzz.py --seed N --replay 1234,1240 --trace --keep

Fuzz clients connect from 127.0.0.2-254 and the checks from 127.0.0.1, so
the per-address login throttle the fuzz clients trip never slows a check.
Fuzz logins use bob@example.test (alice's maildrop stays free for the
checks).  Nothing leaves the machine: remote mail is routed by smtproutes to
a loopback port that refuses connections, DNS goes to a local server with an
empty zone.  Work files go to a fresh directory under --work (default: a
temporary directory), removed at the end unless --keep or something failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime
import os
import poplib
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterator, TextIO

from accept import qtwist, tool  # also puts this checkout first on sys.path, for tests.support
from tests.support.dns import ZoneServer
from tests.support.home import Home
from tests.support.smtpclient import client_hello, greeted, read_replies, unique, wire
from tests.support.waiting import DeadPort, free_port, listening, poll

HOST = "127.0.0.1"  # the server's listeners, and the checks' source address
DOMAIN = "example.test"
ME = "mx.example.test"
CHECK_USER = "alice@example.test"
FUZZ_USER = "bob@example.test"
PASSWORD = "fuzz-pass"
DATABYTES = 2 * 1024 * 1024

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 2.0  # a reply not there by then is not waited for: the session goes on
WRITE_TIMEOUT = 5.0  # a server that takes no bytes for this long has stopped reading
SESSION_SECONDS = 30.0  # no fuzz session lasts longer
CHECK_TIMEOUT = 15.0  # per reply of a check session
STOP_DEADLINE = 40.0  # SIGTERM waits for deliveries in progress (30 s), then SIGKILL
READ_SIZE = 65536
NON_READER_BYTES = 1024 * 1024  # what a client that never reads may send
RESET_CHANCE = 0.2
QUIT_SECONDS = 10.0  # after QUIT (or POP3's "line too long") the server must close within this
LISTEN_SECONDS = (0.1, 1.5)  # how long a client hears the server out after its last bytes

SMTP_RECIPIENTS = [b"bob@example.test", b"Bob@EXAMPLE.test", b"nobody@example.test",
                   b"postmaster@example.test", b"bob", b"someone@elsewhere.test", b'"bob"@example.test',
                   b"@route.test:bob@example.test", b"bob@[127.0.0.1]", b"postmaster"]
SMTP_SENDERS = [b"fuzz@example.org", b"", b"bob@example.test", b"x@[127.0.0.1]", b"fuzz"]
MAIL_PARAMETERS = [b"", b" BODY=8BITMIME", b" SIZE=1000", b" SIZE=99999999999", b" SIZE=x", b" AUTH=<>"]
HELO_NAMES = [b"fuzz.example.org", b"[127.0.0.1]", b"", b"a" * 300, b"\xe9t\xe9", b"x(y)\\z"]
SMTP_VERBS = [b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"HELP", b"QUIT",
              b"STARTTLS", b"AUTH", b"BDAT", b"ETRN", b"EXPN", b"TURN"]
POP3_VERBS = [b"USER", b"PASS", b"APOP", b"STLS", b"CAPA", b"NOOP", b"QUIT", b"STAT", b"LIST", b"UIDL",
              b"RETR", b"TOP", b"DELE", b"RSET", b"AUTH", b"XTND"]
POP3_USERS = [b"bob@example.test", b"bob%example.test", b"alice@example.test", b"nobody@example.test", b"bob",
              b"@example.test", b"bob@", b"\xff\xfe@example.test"]


class Stalled(Exception):
    """The server took none of the client's bytes for WRITE_TIMEOUT seconds."""


# -- what a run counts ----------------------------------------------------------------------------


@dataclass
class Tally:
    """Everything the summary reports."""

    sessions: collections.Counter = field(default_factory=collections.Counter)  # by service
    kinds: collections.Counter = field(default_factory=collections.Counter)
    mutations: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    lines_sent: int = 0
    bytes_sent: int = 0
    checks: collections.Counter = field(default_factory=collections.Counter)  # "smtp", "delivery", "pop3"
    check_failures: list[str] = field(default_factory=list)
    client_errors: list[str] = field(default_factory=list)  # bugs of this script, not of the server
    slowest_check: tuple[float, str] = (0.0, "")  # seconds, which
    held_open: dict[str, list[int]] = field(default_factory=dict)  # "service kind" -> sessions at the time limit
    kept_open: list[str] = field(default_factory=list)  # sessions the server did not close after QUIT
    rss_peak: float = 0.0  # MiB, as sampled at each check

    def sent(self, data: bytes) -> None:
        self.lines_sent += data.count(b"\n")
        self.bytes_sent += len(data)

    def check(self, name: str, problem: str | None, seconds: float = 0.0) -> None:
        self.checks[name] += 1
        self.slowest_check = max(self.slowest_check, (seconds, name))
        if problem is not None:
            self.checks[name + " failed"] += 1
            self.check_failures.append(f"{time.strftime('%H:%M:%S')} {name}: {problem}")

    @property
    def failed_checks(self) -> int:
        return sum(count for name, count in self.checks.items() if name.endswith(" failed"))


# -- one client connection ------------------------------------------------------------------------


class Wire:
    """One client connection: every write counted, every read bounded in time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tally: Tally,
                 trace: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.tally = tally
        self.trace = trace
        self.closed = False

    @classmethod
    async def open(cls, port: int, source: str, tally: Tally, trace: bool = False) -> Wire:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0), limit=READ_SIZE)
        return cls(reader, writer, tally, trace)

    async def send(self, data: bytes) -> None:
        """Write ``data``; raises Stalled when the server does not take it in time."""
        if self.closed or not data:
            return
        if self.trace:
            print(f"  > {_shown(data)}")
        self.writer.write(data)
        self.tally.sent(data)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await self.writer.drain()
        except TimeoutError:
            raise Stalled() from None

    async def receive(self, timeout: float = READ_TIMEOUT) -> bytes | None:
        """The next bytes within ``timeout`` s: b"" once the server closed, None on timeout."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(READ_SIZE)
        except TimeoutError:
            return None
        except ConnectionError:
            return b""
        if self.trace:
            print(f"  < {_shown(data) if data else '(closed)'}")
        return data

    async def reply(self, timeout: float = READ_TIMEOUT) -> bytes | None:
        """The last line of the next reply (SMTP's continuation lines skipped);
        None on timeout or once the server closed."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    line = await self.reader.readline()
            except (TimeoutError, ConnectionError, ValueError):  # ValueError: a line over READ_SIZE
                return None
            if self.trace:
                print(f"  < {_shown(line) if line else '(closed)'}")
            if not line:
                return None
            if line[3:4] != b"-":
                return line

    async def command(self, line: bytes, timeout: float = READ_TIMEOUT) -> bytes | None:
        """Send one line (CRLF added) and return its reply's last line."""
        await self.send(line + b"\r\n")
        return await self.reply(timeout)

    async def listen(self, seconds: float) -> bool:
        """Read whatever comes for ``seconds``, or until the server closes; whether it closed."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if await self.receive(left) == b"":
                return True
        return False

    async def start_tls(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the server's certificate is self-signed
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await self.writer.start_tls(context)

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0), as a crashed client or a middlebox does."""
        if self.closed:
            return
        self.closed = True
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # already gone
        self.writer.transport.abort()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        try:
            async with asyncio.timeout(2):
                await self.writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            self.writer.transport.abort()


def _shown(data: bytes) -> str:
    return repr(data) if len(data) <= 300 else f"{data[:200]!r} ... ({len(data)} bytes) ... {data[-60:]!r}"


# -- junk -----------------------------------------------------------------------------------------

JUNK_ALPHABET = bytes(range(0x20, 0x7F)) * 4 + b"\0\r\n\t\x7f\x1b" + bytes(range(0x80, 0x100))


def junk(rng: random.Random, size: int) -> bytes:
    """Bytes of every sort a broken client sends: text, NUL, bare CR and LF, 8-bit."""
    if size > 4096:
        return bytes(rng.choices(JUNK_ALPHABET, k=4096)) * (size // 4096) + rng.randbytes(size % 4096)
    return bytes(rng.choices(JUNK_ALPHABET, k=size))


def junk_word(rng: random.Random) -> bytes:
    """A junk argument: no line end in it, so it stays one line."""
    choices = [junk(rng, rng.randint(0, 40)).replace(b"\n", b"").replace(b"\r", b""),
               b"<" + junk(rng, rng.randint(0, 20)).replace(b"\n", b"") + b">", b"<>", b"<", b":", b"=",
               b"-1", b"0", b"99999999999999999999", b"\0", b"\xc3\x28", b"%s%n", b"a" * rng.randint(100, 5000)]
    return rng.choice(choices)


def junk_base64(rng: random.Random) -> bytes:
    """What a broken SASL client answers: bad base64, good base64 of junk, cancel, nothing."""
    return rng.choice([
        base64.b64encode(rng.randbytes(rng.randint(0, 200))),
        base64.b64encode(b"\0" + FUZZ_USER.encode() + b"\0" + rng.randbytes(8)),
        base64.b64encode(b"\0\0"), base64.b64encode(b"\xff\xfe\0\xc3\x28\0x"),
        base64.b64encode(rng.randbytes(8))[:-1], b"=", b"====", b"!!!!", b"*", b"", b"a", b"abc",
        b"A" * rng.randint(1000, 6000), junk(rng, 30).replace(b"\n", b""),
    ])


def auth_plain(user: str, password: str) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


def overlong(rng: random.Random) -> bytes:
    """A line at or far past the limits (SMTP 4096, POP3 1024), without its line end."""
    size = rng.choice([1023, 1024, 1025, 4095, 4096, 4097, rng.randint(5000, 100_000),
                       rng.randint(100_000, 600_000)])
    filler = rng.choice([b"x", b"MAIL FROM:<", b"\xff", b"\0", b"a\r"])
    return (filler * (size // len(filler) + 1))[:size]


def message_data(rng: random.Random) -> bytes:
    """DATA's payload and its final dot: a header, text with dots to stuff and
    8-bit bytes; now and then near or over databytes, or looping."""
    large = rng.random() < 0.02
    size = rng.randint(DATABYTES // 2, DATABYTES + 256 * 1024) if large else rng.randint(0, 16384)
    header = b"From: <fuzz@example.org>\r\nSubject: fuzz " + rng.randbytes(4).hex().encode() + b"\r\n"
    if rng.random() < 0.02:
        header += b"Received: from loop\r\n" * rng.choice([99, 100, 150])
    block = b"".join(rng.choice([b"x" * 78, b".", b"..dot", b". ", b"\xe9t\xe9 8-bit", b"", b"\t tab",
                                 b"From nobody", b"Received: fake"]) + b"\r\n" for _ in range(40))
    body = (block * (size // max(1, len(block)) + 1))[:size]
    body = body[:body.rfind(b"\r\n") + 2] if b"\r\n" in body else b""
    return header + b"\r\n" + body + b".\r\n"


# -- well-formed scripts, and their mutations -----------------------------------------------------


def smtp_script(rng: random.Random, service: str) -> list[bytes]:
    """A well-formed SMTP session, one element per command (the message data is one element)."""
    script = [b"EHLO " + rng.choice(HELO_NAMES) + b"\r\n"]
    if service == "submission" or rng.random() < 0.2:
        password = PASSWORD if rng.random() < 0.7 else "wrong"
        script.append(b"AUTH PLAIN " + auth_plain(FUZZ_USER, password) + b"\r\n")
    script.append(b"MAIL FROM:<" + rng.choice(SMTP_SENDERS) + b">" + rng.choice(MAIL_PARAMETERS) + b"\r\n")
    for recipient in rng.sample(SMTP_RECIPIENTS, rng.randint(1, 3)):
        script.append(b"RCPT TO:<" + recipient + b">\r\n")
    script += [b"DATA\r\n", message_data(rng)]
    if rng.random() < 0.3:  # a second transaction in the same session
        script += [b"MAIL FROM:<fuzz@example.org>\r\n", b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n",
                   message_data(rng)]
    return script + [b"QUIT\r\n"]


def pop3_script(rng: random.Random) -> list[bytes]:
    """A well-formed POP3 session as bob; sometimes it deletes many messages,
    so bob's maildrop stays small however long the run."""
    script = [b"CAPA\r\n"] if rng.random() < 0.5 else []
    script += [b"USER bob@example.test\r\n", b"PASS " + PASSWORD.encode() + b"\r\n", b"STAT\r\n", b"LIST\r\n",
               b"UIDL\r\n", b"LIST 1\r\n", b"UIDL 1\r\n", b"TOP 1 " + str(rng.randint(0, 20)).encode() + b"\r\n",
               b"RETR " + str(rng.randint(1, 3)).encode() + b"\r\n", b"DELE 1\r\n", b"NOOP\r\n"]
    if rng.random() < 0.2:
        script.append(b"RSET\r\n")
    if rng.random() < 0.3:  # pipelined in one write, as a client emptying its maildrop does
        script.append(b"".join(b"DELE %d\r\n" % number for number in range(2, rng.randint(3, 400))))
    return script + [b"QUIT\r\n"]


def _line_end(chunk: bytes) -> tuple[bytes, bytes]:
    """(the chunk without its line end, the line end)."""
    body = chunk.rstrip(b"\r\n")
    return body, chunk[len(body):]


def _reorder(rng: random.Random, script: list[bytes]) -> None:
    first, second = rng.randrange(len(script)), rng.randrange(len(script))
    script[first], script[second] = script[second], script[first]


def _drop(rng: random.Random, script: list[bytes]) -> None:
    del script[rng.randrange(len(script))]


def _duplicate(rng: random.Random, script: list[bytes]) -> None:
    index = rng.randrange(len(script))
    script[index:index] = [script[index]] * rng.randint(1, 3)


def _junk_argument(rng: random.Random, script: list[bytes]) -> None:
    index = rng.randrange(len(script))
    body, end = _line_end(script[index])
    separator = b":" if re.match(rb"(?i)(MAIL FROM|RCPT TO):", body) else b" "
    verb = body.split(separator, 1)[0]
    script[index] = verb + separator + junk_word(rng) + (end or b"\r\n")


def _junk_verb(rng: random.Random, script: list[bytes]) -> None:
    index = rng.randrange(len(script))
    body, end = _line_end(script[index])
    verb = rng.choice([junk_word(rng), rng.choice(SMTP_VERBS + POP3_VERBS), b"", b" "])
    script[index] = verb + b" " + body.partition(b" ")[2] + (end or b"\r\n")


def _junk_line(rng: random.Random, script: list[bytes]) -> None:
    script.insert(rng.randint(0, len(script)), junk(rng, rng.randint(0, 200)) + b"\r\n")


def _insert_bytes(rng: random.Random, script: list[bytes], inserted: bytes) -> None:
    index = rng.randrange(len(script))
    chunk = script[index]
    at = rng.randint(0, max(0, len(chunk) - 2))
    script[index] = chunk[:at] + inserted + chunk[at:]


def _line_ending(rng: random.Random, script: list[bytes]) -> None:
    index = rng.randrange(len(script))
    body, _ = _line_end(script[index])
    script[index] = body + rng.choice([b"\n", b"\r", b"", b"\r\r\n", b"\n\r", b"\r\n\r\n"])


def _overlong_argument(rng: random.Random, script: list[bytes]) -> None:
    index = rng.randrange(len(script))
    body, end = _line_end(script[index])
    script[index] = body + b" " + overlong(rng) + (end or b"\r\n")


def _case(rng: random.Random, script: list[bytes]) -> None:
    index = rng.randrange(len(script))
    script[index] = bytes(c ^ 0x20 if 0x41 <= c <= 0x7A and chr(c).isalpha() and rng.random() < 0.5 else c
                          for c in script[index][:200]) + script[index][200:]


MUTATIONS: dict[str, Callable[[random.Random, list[bytes]], None]] = {
    "reorder": _reorder,
    "drop": _drop,
    "duplicate": _duplicate,
    "junk-argument": _junk_argument,
    "junk-verb": _junk_verb,
    "junk-line": _junk_line,
    "nul-byte": lambda rng, script: _insert_bytes(rng, script, b"\0" * rng.randint(1, 3)),
    "bare-cr-lf": lambda rng, script: _insert_bytes(rng, script, rng.choice([b"\r", b"\n", b"\r\r", b"\n.\n"])),
    "non-utf8": lambda rng, script: _insert_bytes(rng, script, rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80",
                                                                          b"\xe9", b"\x80\x80"])),
    "line-ending": _line_ending,
    "overlong-argument": _overlong_argument,
    "case": _case,
}


def mutated(rng: random.Random, script: list[bytes], tally: Tally, notes: list[str]) -> list[bytes]:
    """``script`` with none to four random mutations (each counted)."""
    script = list(script)
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4])):
        if not script:
            break
        name = rng.choice(list(MUTATIONS))
        MUTATIONS[name](rng, script)
        tally.mutations[name] += 1
        notes.append(name)
    return script


# -- sessions -------------------------------------------------------------------------------------


@dataclass
class Session:
    """One fuzz session: its random source, its connection, and what it did."""

    number: int
    rng: random.Random
    service: str  # "smtp", "submission" or "pop3"
    wire: Wire
    tally: Tally
    notes: list[str] = field(default_factory=list)

    @property
    def pop3(self) -> bool:
        return self.service == "pop3"

    def note(self, what: str) -> None:
        self.notes.append(what)

    async def banner(self) -> None:
        """Read the greeting, except now and then: a client that talks first."""
        if self.rng.random() < 0.1:
            self.note("talks-first")
            return
        await self.wire.reply()

    def script(self) -> list[bytes]:
        return pop3_script(self.rng) if self.pop3 else smtp_script(self.rng, self.service)

    async def play(self, chunks: list[bytes]) -> None:
        """Send ``chunks`` one at a time reading replies, all in one write, or
        in random pieces; now and then reset the connection part way."""
        rng = self.rng
        mode = rng.choice(["lockstep", "lockstep", "pipelined", "pieces"])
        self.note(mode)
        cut = rng.randint(0, len(chunks)) if rng.random() < RESET_CHANCE else None
        if mode == "lockstep":
            for index, chunk in enumerate(chunks):
                if index == cut:
                    break
                await self.wire.send(chunk)
                if await self.wire.receive(rng.choice([0.05, 0.5, READ_TIMEOUT])) == b"":
                    return
        else:
            data = b"".join(chunks[:cut])
            for piece in (pieces(rng, data) if mode == "pieces" else [data]):
                await self.wire.send(piece)
        if cut is not None:
            self.note("reset")
            self.wire.reset()
            return
        await self.wire.listen(rng.uniform(*LISTEN_SECONDS))


def pieces(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at up to 200 random places (a CRLF split across reads, a command in halves)."""
    if len(data) < 2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 200))))
    return [data[start:end] for start, end in zip([0] + cuts, cuts + [len(data)])]


async def mutated_session(s: Session) -> None:
    """A well-formed session with none to four mutations."""
    await s.banner()
    await s.play(mutated(s.rng, s.script(), s.tally, s.notes))


async def junk_lines(s: Session) -> None:
    """Lines of random bytes, with every sort of line end."""
    await s.banner()
    lines = [junk(s.rng, s.rng.randint(0, 300)) + s.rng.choice([b"\r\n", b"\n", b"\r", b""])
             for _ in range(s.rng.randint(1, 40))]
    await s.play(lines)


async def overlong_line(s: Session) -> None:
    """One line at or far past the limit, then maybe a few good commands."""
    await s.banner()
    end = s.rng.choice([b"\r\n", b"\n", b""])
    follow = [b"NOOP\r\n", b"CAPA\r\n" if s.pop3 else b"EHLO x\r\n", b"QUIT\r\n"]
    await s.play([overlong(s.rng) + end] + follow[:s.rng.randint(0, 3)])


async def tls_hello(s: Session) -> None:
    """A TLS client on a plain port: real ClientHello bytes, then junk or silence."""
    if s.rng.random() < 0.5:
        await s.banner()
    await s.wire.send(client_hello(s.rng.choice([ME, ".".join(["x" * 63] * 3), "localhost"])))
    if s.rng.random() < 0.5:
        await s.wire.send(junk(s.rng, s.rng.randint(1, 5000)))
    await s.wire.listen(s.rng.uniform(*LISTEN_SECONDS))


async def upgrade(s: Session) -> bytes | None:
    """Ask for TLS as a client should; the server's answer (None: no answer)."""
    await s.wire.reply()  # the greeting: a client that talked first would take it for the answer
    if s.pop3:
        return await s.wire.command(b"STLS")
    await s.wire.command(b"EHLO fuzz.example.org")
    return await s.wire.command(b"STARTTLS")


async def starttls_junk(s: Session) -> None:
    """STARTTLS/STLS, then anything but a proper handshake."""
    rng = s.rng
    if rng.random() < 0.2:  # commands pipelined behind STARTTLS, in the clear (RFC 3207 §5)
        s.note("pipelined-behind")
        await s.banner()
        verb = b"STLS" if s.pop3 else b"STARTTLS"
        await s.wire.send(verb + b"\r\n" + b"".join(mutated(rng, s.script(), s.tally, s.notes)))
        await s.wire.listen(rng.uniform(*LISTEN_SECONDS))
        return
    await upgrade(s)
    hello = client_hello(ME)
    await s.wire.send(rng.choice([
        junk(rng, rng.randint(1, 20000)),
        b"EHLO again\r\nMAIL FROM:<x@example.org>\r\n",
        hello[:rng.randint(1, len(hello) - 1)],
        hello[:rng.randint(1, len(hello) - 1)] + junk(rng, rng.randint(1, 2000)),
        hello + junk(rng, 500),
        b"\x16\x03\x01\xff\xff" + junk(rng, 300),  # a record header announcing far more than comes
    ]))
    await s.wire.listen(rng.uniform(*LISTEN_SECONDS))


async def tls_session(s: Session) -> None:
    """A real STARTTLS/STLS upgrade, then a mutated session inside TLS."""
    answer = await upgrade(s)
    if not answer or not answer.startswith((b"220", b"+OK")):
        s.note("no-tls")
        return
    await s.wire.start_tls()
    await s.play(mutated(s.rng, s.script(), s.tally, s.notes))


async def auth_junk(s: Session) -> None:
    """SASL exchanges (SMTP AUTH) or USER/PASS/APOP (POP3) with junk in them."""
    rng = s.rng
    await s.banner()
    if s.pop3:
        lines = [rng.choice([b"USER ", b"PASS ", b"APOP ", b"AUTH ", b"USER", b"PASS"])
                 + rng.choice([rng.choice(POP3_USERS), junk_word(rng), junk_base64(rng)])
                 + rng.choice([b"", b" " + junk_word(rng), b" " + PASSWORD.encode()]) + b"\r\n"
                 for _ in range(rng.randint(1, 8))]
        await s.play(lines)
        return
    await s.wire.command(b"EHLO fuzz.example.org")
    mechanism = rng.choice([b"PLAIN", b"LOGIN", b"CRAM-MD5", b"plain", b"XOAUTH2", b"", junk_word(rng)])
    initial = rng.choice([b"", b" " + junk_base64(rng), b" =", b" " + auth_plain(FUZZ_USER, PASSWORD)])
    lines = [b"AUTH " + mechanism + initial + b"\r\n"]
    lines += [junk_base64(rng) + b"\r\n" for _ in range(rng.randint(0, 4))]
    if rng.random() < 0.3:
        lines += [b"MAIL FROM:<fuzz@example.org>\r\n", b"RCPT TO:<someone@elsewhere.test>\r\n", b"QUIT\r\n"]
    await s.play(lines)


async def half_data(s: Session) -> None:
    """SMTP: a message cut off part way, then the connection closed or reset."""
    rng = s.rng
    await s.banner()
    for line in (b"EHLO fuzz.example.org", b"MAIL FROM:<fuzz@example.org>", b"RCPT TO:<bob@example.test>"):
        await s.wire.command(line)
    await s.wire.command(b"DATA")
    data = message_data(rng)
    await s.wire.send(data[:rng.randint(0, max(0, len(data) - 3))])
    if rng.random() < 0.5:
        s.note("reset")
        s.wire.reset()
    else:
        await s.wire.close()


async def bare_lf_data(s: Session) -> None:
    """SMTP: message data with bare LF line ends, or bare CR, or a final dot with bare LF."""
    rng = s.rng
    await s.banner()
    data = message_data(rng)
    data = rng.choice([data.replace(b"\r\n", b"\n"), data.replace(b"\r\n", b"\r"),
                       data[:-3] + b"\n.\n", data.replace(b"\r\n", b"\n", 1), data[:-3] + b"\r\n.\n"])
    script = [b"EHLO fuzz.example.org\r\n", b"MAIL FROM:<fuzz@example.org>\r\n",
              b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n", data, b"QUIT\r\n"]
    await s.play(script)


async def half_retr(s: Session) -> None:
    """POP3: a message asked for and read only in part, then the connection dropped."""
    rng = s.rng
    await s.banner()
    await s.wire.command(b"USER bob@example.test")
    if not (await s.wire.command(b"PASS " + PASSWORD.encode()) or b"").startswith(b"+OK"):
        return
    await s.wire.send(rng.choice([b"RETR 1\r\n", b"RETR 2\r\n", b"TOP 1 1000\r\n", b"LIST\r\nRETR 1\r\n"]))
    await s.wire.receive(rng.choice([0.01, 0.2, 1.0]))
    if rng.random() < 0.5:
        s.note("reset")
        s.wire.reset()


async def flood(s: Session) -> None:
    """Hundreds or thousands of commands in one write; the replies are read."""
    rng = s.rng
    await s.banner()
    if s.pop3:
        login = [b"USER bob@example.test\r\n", b"PASS " + PASSWORD.encode() + b"\r\n"]
        commands = [b"NOOP\r\n", b"STAT\r\n", b"LIST\r\n", b"UIDL\r\n", b"CAPA\r\n", b"LIST 1\r\n", b"RSET\r\n"]
    else:
        login = [b"EHLO fuzz.example.org\r\n", b"MAIL FROM:<fuzz@example.org>\r\n"]
        commands = [b"NOOP\r\n", b"RSET\r\n", b"EHLO x\r\n", b"VRFY bob\r\n", b"HELP\r\n",
                    b"RCPT TO:<bob@example.test>\r\n", b"MAIL FROM:<a@example.org>\r\n", b"XYZZY\r\n"]
    if not s.pop3 and rng.random() < 0.1:  # past the recipient limit (1000): 1000 local deliveries each
        s.note("recipients")
        body = login + [b"RCPT TO:<bob@example.test>\r\n"] * rng.randint(990, 1100) + [b"DATA\r\n",
                                                                                      message_data(rng)]
    else:
        body = login + [rng.choice(commands) for _ in range(rng.randint(100, 5000))]
    await s.wire.send(b"".join(body))
    await s.wire.listen(rng.uniform(0.5, 5.0))


async def quit_closes(s: Session) -> None:
    """A short good session, over TLS or not, that ends in QUIT (or, for POP3,
    in a line too long, which ends a session too): the server must close the
    connection within QUIT_SECONDS."""
    rng = s.rng
    if rng.random() < 0.6:
        answer = await upgrade(s)
        if not answer or not answer.startswith((b"220", b"+OK")):
            s.note("no-tls")
            return
        await s.wire.start_tls()
        s.note("tls")
    else:
        await s.wire.reply()
    if s.pop3 and rng.random() < 0.5:
        await s.wire.command(b"USER bob@example.test")
        await s.wire.command(b"PASS " + PASSWORD.encode())
    elif not s.pop3:
        await s.wire.command(b"EHLO fuzz.example.org")
    last = b"QUIT\r\n"
    if rng.random() < 0.3:
        s.note("line-too-long")
        last = b"x" * 5000 + (b"\r\n" if s.pop3 else b"\r\nQUIT\r\n")
    await s.wire.send(last)
    if not await s.wire.listen(QUIT_SECONDS):
        s.note("kept-open")
        s.tally.kept_open.append(f"#{s.number} ({s.service} {','.join(s.notes)})")


async def silent(s: Session) -> None:
    """Connects and says nothing for a few seconds."""
    await asyncio.sleep(s.rng.uniform(0.5, 5.0))
    if s.rng.random() < 0.5:
        s.note("reset")
        s.wire.reset()


async def non_reader(s: Session) -> None:
    """Sends commands whose replies are large (at most NON_READER_BYTES),
    reads none of them, and hangs up after a few seconds."""
    rng = s.rng
    if s.pop3:
        prefix = b"USER bob@example.test\r\nPASS " + PASSWORD.encode() + b"\r\n"
        unit = rng.choice([b"RETR 1\r\n", b"LIST\r\n", b"UIDL\r\n", b"CAPA\r\n", b"TOP 1 100\r\n"])
    else:
        prefix = b""
        unit = rng.choice([b"EHLO fuzz.example.org\r\n", b"HELP\r\n", b"VRFY bob\r\n", b"NOOP\r\n"])
    end = time.monotonic() + rng.uniform(2.0, 5.0)
    sent = 0
    await s.wire.send(prefix)
    try:
        while sent < NON_READER_BYTES and time.monotonic() < end:
            chunk = unit * (16384 // len(unit))
            await s.wire.send(chunk)
            sent += len(chunk)
    except Stalled:
        s.note("server-stopped-reading")  # as it should: its replies are not read
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    if rng.random() < 0.5:
        s.note("reset")
        s.wire.reset()


Kind = Callable[[Session], Awaitable[None]]
COMMON_KINDS: dict[str, tuple[int, Kind]] = {
    "mutated": (30, mutated_session),
    "junk-lines": (8, junk_lines),
    "overlong-line": (6, overlong_line),
    "tls-hello-on-plain": (5, tls_hello),
    "starttls-junk": (5, starttls_junk),
    "tls-session": (10, tls_session),
    "auth-junk": (8, auth_junk),
    "flood": (5, flood),
    "silent": (3, silent),
    "non-reader": (4, non_reader),
    "quit-closes": (4, quit_closes),
}
KINDS: dict[str, dict[str, tuple[int, Kind]]] = {
    "smtp": {**COMMON_KINDS, "half-data": (5, half_data), "bare-lf-data": (4, bare_lf_data)},
    "submission": {**COMMON_KINDS, "half-data": (3, half_data)},
    "pop3": {**COMMON_KINDS, "half-retr": (5, half_retr)},
}
SERVICE_WEIGHTS = {"smtp": 45, "submission": 15, "pop3": 40}


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Fuzz:
    """What the sessions share: the seed, the ports, the counts, the journal."""

    seed: int
    ports: dict[str, int]
    tally: Tally
    journal: TextIO  # one line per session
    started: float
    trace: bool = False
    only: frozenset[str] = frozenset()  # the session kinds to run; empty: all
    ended: float = 0.0  # when the last fuzz session ended
    workers: list[asyncio.Task] = field(default_factory=list)
    halted: str = ""  # why the run was stopped early
    spans: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end) epoch seconds, number

    def halt(self, reason: str) -> None:
        """Stop fuzzing now (the sessions running are cut)."""
        self.halted = reason
        for task in self.workers:
            task.cancel()

    async def session(self, number: int) -> None:
        """Run session ``number`` and note it in the tally and the journal."""
        rng, service, kind, source = plan(self.seed, number, self.only)
        began, began_epoch = time.monotonic(), time.time()
        self.tally.sessions[service] += 1
        self.tally.kinds[kind] += 1
        if self.trace:
            print(f"session {number}: {service} {kind} from {source}")
        notes: list[str] = []
        outcome = "done"
        wire = None
        try:
            wire = await Wire.open(self.ports[service], source, self.tally, self.trace)
            async with asyncio.timeout(SESSION_SECONDS):
                await KINDS[service][kind][1](Session(number, rng, service, wire, self.tally, notes))
        except asyncio.CancelledError:
            outcome = "cut-at-end"
            raise
        except Exception as error:
            outcome = outcome_of(error)
            if outcome == "client-error":
                self.tally.client_errors.append(f"session {number} ({service} {kind}):\n{traceback.format_exc()}")
        finally:
            if wire is not None and outcome == "cut-at-end":
                wire.reset()
            elif wire is not None:
                await wire.close()
            self.tally.outcomes[outcome.split(":")[0]] += 1
            if outcome == "session-time-limit":
                self.tally.held_open.setdefault(f"{service} {kind}", []).append(number)
            self.spans.append((began_epoch, time.time(), number))
            wall = datetime.datetime.fromtimestamp(began_epoch, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
            print(f"{wall} {began - self.started:9.3f} {time.monotonic() - began:6.2f}s #{number} {service} "
                  f"{source} {kind} [{','.join(notes)}] {outcome}", file=self.journal, flush=True)

    async def worker(self, numbers: Iterator[int], deadline: float) -> None:
        for number in numbers:
            if time.monotonic() >= deadline:
                return
            await self.session(number)


def plan(seed: int, number: int, only: frozenset[str] = frozenset()) -> tuple[random.Random, str, str, str]:
    """What session ``number`` of the run ``seed`` is: (its random source,
    service, kind, client address).  It depends on nothing else (and on
    ``only``, the kinds allowed when not all are), so any session can be
    replayed alone."""
    rng = random.Random(f"{seed}:{number}")
    allowed = {service: {name: entry for name, entry in kinds.items() if not only or name in only}
               for service, kinds in KINDS.items()}
    services = [service for service in SERVICE_WEIGHTS if allowed[service]]
    service = rng.choices(services, weights=[SERVICE_WEIGHTS[service] for service in services])[0]
    kinds = allowed[service]
    kind = rng.choices(list(kinds), weights=[weight for weight, _ in kinds.values()])[0]
    return rng, service, kind, f"127.0.0.{rng.randint(2, 254)}"


def outcome_of(error: Exception) -> str:
    """How a session that raised ``error`` ended, in the journal's words."""
    if isinstance(error, TimeoutError):
        return "session-time-limit"
    if isinstance(error, Stalled):
        return "server-stopped-reading"
    if isinstance(error, (ConnectionError, EOFError, asyncio.IncompleteReadError)):
        return "closed-by-server"
    if isinstance(error, ssl.SSLError):
        return f"tls-error:{error.reason}"
    if isinstance(error, OSError):
        return f"os-error:{error.errno}"
    return "client-error"  # a bug of this script


# -- the checks -----------------------------------------------------------------------------------


def smtp_check(port: int, marker: str) -> str | None:
    """A well-formed SMTP transaction to alice; None when it got its 250, else what went wrong."""
    message = f"From: <check@example.org>\nSubject: {marker}\n\n{marker}\n".encode()
    steps = [(b"EHLO check.example.org", b"250"), (b"MAIL FROM:<check@example.org>", b"250"),
             (f"RCPT TO:<{CHECK_USER}>".encode(), b"250"), (b"DATA", b"354"), (wire(message) + b".", b"250"),
             (b"QUIT", b"221")]
    step = "connect"
    try:
        with socket.create_connection((HOST, port), timeout=CHECK_TIMEOUT, source_address=(HOST, 0)) as sock:
            step = "greeting"
            greeted(sock)
            for line, expected in steps:
                step = line[:40].decode()
                sock.sendall(line + b"\r\n")
                reply, = read_replies(sock, 1, CHECK_TIMEOUT)
                if not reply.startswith(expected):
                    return f"{step}: got {reply!r}"
    except (OSError, AssertionError) as error:
        return f"{step}: {type(error).__name__}: {error}"
    return None


def pop3_check(port: int) -> str | None:
    """A POP3 login as alice and a STAT; None when both got +OK."""
    try:
        client = poplib.POP3(HOST, port, timeout=CHECK_TIMEOUT)
        try:
            client.user(CHECK_USER)
            client.pass_(PASSWORD)
            client.stat()
        finally:
            client.quit()
    except (OSError, poplib.error_proto) as error:
        return f"{type(error).__name__}: {error}"
    return None


def delivered(home: Home, markers: list[str]) -> set[str]:
    """Which of ``markers`` are in alice's Maildir (new/ or cur/)."""
    found = set()
    for marker in markers:
        try:
            if home.messages_with(home.maildir(CHECK_USER), marker.encode()):
                found.add(marker)
        except FileNotFoundError:
            pass  # moved from new/ to cur/ by a POP3 check meanwhile: found next time
    return found


async def timed(function: Callable[..., str | None], *arguments: object) -> tuple[str | None, float]:
    """A blocking check run in a thread: (its problem or None, seconds it took)."""
    began = time.monotonic()
    problem = await asyncio.to_thread(function, *arguments)
    return problem, time.monotonic() - began


async def run_checks(fuzz: Fuzz, waiting: dict[str, float], delivery_deadline: float) -> None:
    """One good SMTP client and one good POP3 client; the SMTP one's message
    joins ``waiting`` (marker -> when it was accepted)."""
    marker = unique("fuzz-check")
    problem, seconds = await timed(smtp_check, fuzz.ports["smtp"], marker)
    fuzz.tally.check("smtp", problem, seconds)
    if problem is None:
        waiting[marker] = time.monotonic()
    fuzz.tally.check("pop3", *await timed(pop3_check, fuzz.ports["pop3"]))


async def look_for_deliveries(fuzz: Fuzz, home: Home, waiting: dict[str, float], delivery_deadline: float) -> None:
    """Count the waiting messages that reached alice's Maildir, and those past their deadline."""
    for marker in await asyncio.to_thread(delivered, home, list(waiting)):
        fuzz.tally.check("delivery", None, time.monotonic() - waiting.pop(marker))
    for marker, accepted in list(waiting.items()):
        if time.monotonic() - accepted > delivery_deadline:
            del waiting[marker]
            fuzz.tally.check("delivery", f"{marker} not in {home.maildir(CHECK_USER)} "
                                         f"{delivery_deadline:g} s after its 250")


def watch_server(fuzz: Fuzz, server: subprocess.Popen, max_rss: float) -> None:
    """Note the server's memory; stop the run if the server died or grows past ``max_rss`` MiB."""
    if server.poll() is not None:
        fuzz.halt(f"the server exited with {server.returncode} during the run")
        return
    rss = rss_mib(server.pid)
    fuzz.tally.rss_peak = max(fuzz.tally.rss_peak, rss)
    if rss > max_rss and not fuzz.halted:
        fuzz.halt(f"the server's RSS reached {rss:.0f} MiB (--max-rss {max_rss:g})")


async def check_loop(fuzz: Fuzz, home: Home, args: argparse.Namespace, fuzzing_over: asyncio.Event,
                     server: subprocess.Popen) -> None:
    """Every --check-every seconds while the fuzz sessions run (and once at
    least), the checks; each checked message is looked for in alice's
    Maildir until its deadline, after the fuzzing too."""
    waiting: dict[str, float] = {}
    first = True
    while True:
        tick = time.monotonic()
        watch_server(fuzz, server, args.max_rss)
        checking = (first or not fuzzing_over.is_set()) and server.poll() is None
        first = False
        if checking:
            await run_checks(fuzz, waiting, args.delivery_deadline)
        await look_for_deliveries(fuzz, home, waiting, args.delivery_deadline)
        if fuzzing_over.is_set() and (not waiting or server.poll() is not None):
            return
        pause = max(0.0, tick + (args.check_every if checking else 0.5) - time.monotonic())
        try:
            async with asyncio.timeout(pause):
                await fuzzing_over.wait()
        except TimeoutError:
            pass


async def fuzz_run(fuzz: Fuzz, home: Home, args: argparse.Namespace, server: subprocess.Popen) -> None:
    """The fuzz sessions (--sessions at a time for --seconds, or the --replay
    ones in order) beside the checks; returns once the checks are done."""
    fuzzing_over = asyncio.Event()
    checks = asyncio.create_task(check_loop(fuzz, home, args, fuzzing_over, server))
    if args.replay:
        for number in args.replay:
            await fuzz.session(number)
    else:
        numbers = iter(range(1, 10**9))
        until = fuzz.started + args.seconds
        fuzz.workers = [asyncio.create_task(fuzz.worker(numbers, until)) for _ in range(args.sessions)]
        await asyncio.wait(fuzz.workers, timeout=args.seconds + 2)  # sessions still running then are cut
        for task in fuzz.workers:
            task.cancel()
        await asyncio.gather(*fuzz.workers, return_exceptions=True)
    fuzz.ended = time.monotonic()
    fuzzing_over.set()
    await checks


# -- the server -----------------------------------------------------------------------------------


def make_home(work: Path, dead_port: int) -> Home:
    """A home made with the qtwist command, as an admin would: example.test with
    alice (the checks) and bob (the fuzz logins), a self-signed certificate,
    databytes, and every remote route pointing at a port that refuses."""
    path = work / "home"
    control = path / "control"
    control.mkdir(parents=True)
    (control / "me").write_text(f"{ME}\n")
    (control / "databytes").write_text(f"{DATABYTES}\n")
    (control / "selfsignedcert").write_text("1\n")
    (control / "smtproutes").write_text(f":{HOST}:{dead_port}\n")
    (path / "tcp.smtp").write_text(":allow\n")
    qtwist(path, "domain", "add", DOMAIN)
    for user in (CHECK_USER, FUZZ_USER):
        qtwist(path, "user", "add", user, "--password", PASSWORD)
    return Home(path)


def start_server(home: Home, ports: dict[str, int], dns_port: int, log: Path) -> subprocess.Popen:
    command = [tool("twistd"), "-n", "--pidfile=", "qmail", "--home", str(home.path),
               "--smtp", f"tcp:{ports['smtp']}:interface={HOST}",
               "--submission", f"tcp:{ports['submission']}:interface={HOST}",
               "--pop3", f"tcp:{ports['pop3']}:interface={HOST}",
               "--smtps", "none", "--pop3s", "none", "--nameserver", f"{HOST}:{dns_port}"]
    with open(log, "ab") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=home.path)


def stop_server(server: subprocess.Popen) -> str:
    """SIGTERM, then SIGKILL after STOP_DEADLINE; how it ended, in words."""
    if server.poll() is not None:
        return f"had already exited with {server.returncode} (died during the run)"
    began = time.monotonic()
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)
        return f"did not stop within {STOP_DEADLINE:g} s of SIGTERM: killed (SIGKILL)"
    # twistd ends by its signal once it has shut down: -15 is a clean stop
    return f"stopped by SIGTERM in {time.monotonic() - began:.1f} s, exit status {server.returncode}"


def tls_offered(ports: dict[str, int]) -> bool:
    """Whether EHLO offers STARTTLS (the self-signed certificate is in place)."""
    try:
        with socket.create_connection((HOST, ports["smtp"]), timeout=CHECK_TIMEOUT) as sock:
            greeted(sock)
            sock.sendall(b"EHLO check.example.org\r\n")
            return b"STARTTLS" in read_replies(sock, 1, CHECK_TIMEOUT)[0]
    except (OSError, AssertionError):
        return False


def rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else 0.0


@dataclass
class LogFindings:
    """What the server log says went wrong."""

    tracebacks: int
    unhandled: int  # "Unhandled error" lines
    first: str  # the first traceback with the lines that introduced it
    first_at: float | None  # its time (epoch seconds), to find the sessions running then


LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) ")  # twistd: "TIME [namespace#level] text"


def log_problems(text: str) -> LogFindings:
    lines = text.splitlines()
    unhandled = sum(1 for line in lines if "unhandled error" in line.lower())
    traceback_at = next((number for number, line in enumerate(lines) if "Traceback" in line), None)
    if traceback_at is not None:
        # The error entries that introduce it, its tab-indented frames, and the exception's line.
        head = traceback_at
        while head > 0 and traceback_at - head < 3 and re.search(r"#(error|critical)\]", lines[head - 1]):
            head -= 1
        end = traceback_at + 1
        while end < len(lines) and lines[end].startswith("\t  "):
            end += 1
        first = lines[head:end + 1]
    else:
        head = next((number for number, line in enumerate(lines) if "unhandled error" in line.lower()), 0)
        first = lines[head:head + 6] if unhandled else []
    stamp = next((found for line in reversed(lines[:head + 1]) if (found := LOG_TIME.match(line))), None)
    first_at = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S%z").timestamp() if stamp else None
    return LogFindings(text.count("Traceback"), unhandled, "\n".join(first), first_at if first else None)


# -- the summary ----------------------------------------------------------------------------------


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def counts(counter: collections.Counter) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter.most_common()) or "none"


def suspects(fuzz: Fuzz, moment: float, limit: int = 15) -> list[int]:
    """The sessions that ended shortly before or during the log's second
    ``moment`` (an answer may come seconds after a client left: a failed
    login is answered up to 5 s late), closest first."""
    near = [(abs(end - moment), number) for start, end, number in fuzz.spans
            if moment - 6 <= end and start <= moment + 1]
    return [number for _, number in sorted(near)[:limit]]


def print_activity(args: argparse.Namespace, fuzz: Fuzz) -> None:
    tally = fuzz.tally
    seconds = fuzz.ended - fuzz.started
    sessions = sum(tally.sessions.values())
    how = (f"replay of sessions {','.join(map(str, args.replay))}" if args.replay
           else f"{args.sessions} parallel sessions")
    print(f"fuzz run: {seconds:.1f} s, seed {fuzz.seed}, {how}"
          + (f"; STOPPED EARLY: {fuzz.halted}" if fuzz.halted else ""))
    print(f"sessions started: {sessions} (SMTP {tally.sessions['smtp']}, submission {tally.sessions['submission']}, "
          f"POP3 {tally.sessions['pop3']}), {sessions / max(seconds, 1e-9):.0f}/s")
    print(f"sent: {tally.lines_sent:,} lines, {tally.bytes_sent:,} bytes")
    print(f"session kinds: {counts(tally.kinds)}")
    print(f"mutations: {counts(tally.mutations)}")
    print(f"session ends: {counts(tally.outcomes)}")
    for what, numbers in tally.held_open.items():
        print(f"  still open at the {SESSION_SECONDS:g} s limit: {len(numbers)} {what} (e.g. "
              f"{','.join(map(str, numbers[:5]))}: see them with --replay N --trace)")
    print(f"fuzz client CPU: {own_cpu():.1f} s")
    if tally.client_errors:
        print(f"errors of the fuzz client itself (not the server): {len(tally.client_errors)}; the first:\n"
              + tally.client_errors[0])


def print_checks(tally: Tally) -> None:
    checks = ", ".join(f"{name} {tally.checks[name]}/{tally.checks[name + ' failed']}"
                       for name in ("smtp", "delivery", "pop3"))
    print(f"checks (done/failed): {checks}; failed in all: {tally.failed_checks}; "
          f"slowest {tally.slowest_check[0]:.1f} s ({tally.slowest_check[1]})")
    for failure in tally.check_failures[:5]:
        print(f"  check failed: {failure}")
    if tally.kept_open:
        print(f"connections the server kept open {QUIT_SECONDS:g} s after QUIT or 'line too long': "
              f"{len(tally.kept_open)}, e.g. {'; '.join(tally.kept_open[:5])}")


def print_server(fuzz: Fuzz, server_end: str, rss_start: float, log_text: str, found: LogFindings) -> None:
    print(f"server: RSS {rss_start:.0f} MiB at start, peak {fuzz.tally.rss_peak:.0f} MiB; {server_end}")
    levels = collections.Counter(re.findall(r"^\S+ \[[^\]]*#(warn|error|critical)\]", log_text, re.MULTILINE))
    print(f"server log: {found.tracebacks} Traceback, {found.unhandled} 'Unhandled error' lines; entries at level "
          f"warn/error/critical: {levels['warn']}/{levels['error']}/{levels['critical']}")
    if found.first:
        print("first traceback in the server log:\n" + found.first)
    if found.first_at is not None and (near := suspects(fuzz, found.first_at)):
        print(f"sessions that ended around then, closest first: {','.join(map(str, near))}; replay one alone "
              f"with: python bench/fuzz.py --seed {fuzz.seed} --replay N --trace"
              + (f" --kinds {','.join(sorted(fuzz.only))}" if fuzz.only else ""))


def summary(args: argparse.Namespace, fuzz: Fuzz, server_end: str, rss_start: float, log_text: str) -> bool:
    """Print the summary; True when nothing failed."""
    found = log_problems(log_text)
    print_activity(args, fuzz)
    print_checks(fuzz.tally)
    print_server(fuzz, server_end, rss_start, log_text, found)
    return (not fuzz.tally.failed_checks and not found.tracebacks and not found.unhandled and not fuzz.halted
            and not fuzz.tally.kept_open and server_end.startswith("stopped by SIGTERM"))


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long to fuzz")
    parser.add_argument("--sessions", type=int, default=20, help="fuzz sessions at once")
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: a new one, printed)")
    parser.add_argument("--check-every", type=float, default=3, help="seconds between the good clients' checks")
    parser.add_argument("--delivery-deadline", type=float, default=30,
                        help="seconds a checked message may take to reach the Maildir")
    parser.add_argument("--max-rss", type=float, default=4096, metavar="MIB",
                        help="stop the run when the server's memory grows past this (a failure)")
    parser.add_argument("--work", default=None, help="the directory under which a fresh work directory is made")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (home, logs)")
    parser.add_argument("--replay", type=lambda text: [int(n) for n in text.split(",")], default=None,
                        metavar="N,M", help="run only these sessions of --seed, one after another")
    parser.add_argument("--trace", action="store_true", help="print what the sessions send and receive")
    parser.add_argument("--kinds", type=lambda text: frozenset(text.split(",")), default=frozenset(),
                        metavar="K,L", help=f"run only these session kinds (to narrow a problem down): "
                                            f"{', '.join(sorted({k for kinds in KINDS.values() for k in kinds}))}")
    args = parser.parse_args()
    if args.replay and args.seed is None:
        parser.error("--replay needs the --seed of the run")
    unknown = args.kinds - {kind for kinds in KINDS.values() for kind in kinds}
    if unknown:
        parser.error(f"unknown session kinds: {', '.join(sorted(unknown))}")
    return args


def main() -> int:
    args = parse_arguments()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    work = Path(tempfile.mkdtemp(prefix="qtwist-fuzz-", dir=args.work))
    dead = DeadPort()
    dns = ZoneServer({})
    server = None
    ok = False
    try:
        home = make_home(work, dead.port)
        ports = {service: free_port() for service in ("smtp", "submission", "pop3")}
        log = work / "twistd.log"
        server = start_server(home, ports, dns.address[1], log)
        if not poll(lambda: server.poll() is not None or all(listening(HOST, p) for p in ports.values()), 30) \
                or server.poll() is not None:
            print(f"the server did not start; see {log}", file=sys.stderr)
            return 1
        if not tls_offered(ports):
            print("warning: STARTTLS is not offered; the TLS sessions will test only the refusal", file=sys.stderr)
        what = f"replaying sessions {args.replay}" if args.replay else f"fuzzing for {args.seconds:g} s"
        print(f"{what} with seed {seed}: SMTP {ports['smtp']}, submission "
              f"{ports['submission']}, POP3 {ports['pop3']}; work directory {work}", flush=True)
        rss_start = rss_mib(server.pid)
        with open(work / "sessions.log", "w") as journal:
            fuzz = Fuzz(seed, ports, Tally(), journal, time.monotonic(), args.trace, args.kinds)
            asyncio.run(fuzz_run(fuzz, home, args, server))
        server_end = stop_server(server)
        ok = summary(args, fuzz, server_end, rss_start, log.read_text(errors="replace"))
    finally:
        if server is not None and server.poll() is None:
            stop_server(server)
        dns.stop()
        dead.close()
        if args.keep or not ok:
            print(f"work directory kept: {work} (twistd.log, sessions.log, home/)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
