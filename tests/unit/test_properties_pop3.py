"""Properties of qmail-pop3d's message text and of the POP3 session (pop3d.py).

RETR and TOP send what the file holds with CRLF line ends and dot-stuffing,
whatever the chunking; any command line gets a reply that starts with +OK or
-ERR; no exception escapes.  The sessions run synchronously, as in
test_properties_smtp: one real home per module, a fresh POP3Server over a
StringTransport per example, and the worker threads (password checks,
Maildir scans and updates) run inline.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from qtwist import users as users_module
from qtwist import pop3d
from qtwist.login import FailureThrottle, Logins, mail_portal
from qtwist.pop3d import (
    POP3Factory,
    POP3Server,
    crlf_chunks,
    dot_stuffed,
    login_address,
    top_chunks,
    unique_id,
)
from tests.support.home import DOMAIN, PASSWORD, make_home
from tests.support.memory import MemoryHome, POP3Client

NOW = 1_800_000_000

# -- message text -------------------------------------------------------------------------------------

message_text = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"Subject: x", b" "]), max_size=30)
    .map(b"".join),
)


def as_sent(raw: bytes) -> bytes:
    """The file as RETR sends it before stuffing: every line end CRLF, a last
    line end added; a CR at the very end is taken as the start of one."""
    if raw.endswith(b"\r"):
        return _crlf(raw[:-1]) + b"\r\n"
    text = _crlf(raw)
    return text + b"\r\n" if text and not text.endswith(b"\n") else text


def _crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@settings(max_examples=150)
@given(message_text, st.integers(1, 64))
def test_crlf_chunks_give_the_crlf_form_whatever_the_read_size(raw: bytes, chunk_size: int) -> None:
    chunks = list(crlf_chunks(io.BytesIO(raw), chunk_size))
    assert b"".join(chunks) == as_sent(raw)
    # No empty chunk, and no CRLF cut in two (top_chunks relies on it).
    assert all(chunks)
    assert not any(first.endswith(b"\r") and second.startswith(b"\n") for first, second in itertools.pairwise(chunks))


def unstuffed(body: bytes) -> bytes:
    """A POP3 multi-line body back to its text: the final '.' line gone, leading dots halved."""
    assert body.endswith(b".\r\n")
    text = body[:-3]
    assert text == b"" or text.endswith(b"\r\n")
    lines = text.split(b"\r\n")[:-1]
    assert all(line != b"." for line in lines), "a lone '.' before the end"
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


@settings(max_examples=150)
@given(message_text, st.integers(1, 64))
def test_dot_stuffing_round_trip(raw: bytes, chunk_size: int) -> None:
    body = b"".join(dot_stuffed(crlf_chunks(io.BytesIO(raw), chunk_size)))
    assert unstuffed(body) == as_sent(raw)


def top_of(text: bytes, body_lines: int) -> bytes:
    """TOP's cut of whole CRLF text: the header, the blank line, ``body_lines`` lines."""
    if text.startswith(b"\r\n"):
        position = 2
    else:
        blank = text.find(b"\r\n\r\n")
        if blank < 0:
            return text
        position = blank + 4
    for _ in range(body_lines):
        end = text.find(b"\r\n", position)
        if end < 0:
            return text
        position = end + 2
    return text[:position]


@settings(max_examples=150)
@given(message_text, st.integers(1, 64), st.integers(0, 6))
def test_top_cuts_at_the_same_place_whatever_the_read_size(raw: bytes, chunk_size: int, body_lines: int) -> None:
    top = b"".join(top_chunks(crlf_chunks(io.BytesIO(raw), chunk_size), body_lines))
    assert top == top_of(as_sent(raw), body_lines)


@settings(max_examples=150)
@given(st.text(max_size=100) | st.text(string.ascii_letters + string.digits + ".,:=_-", max_size=80))
def test_unique_id_is_what_rfc_1939_allows_and_stable(name: str) -> None:
    uid = unique_id(name)
    assert 1 <= len(uid) <= 70 and all(0x21 <= ord(char) <= 0x7E for char in uid)
    assert unique_id(name) == uid
    unique = name.split(":", 1)[0]
    if 0 < len(unique) <= 70 and all(0x21 <= ord(char) <= 0x7E for char in unique):
        assert uid == unique
        assert unique_id(unique + ":2,S") == uid  # flags never change it


@settings(max_examples=150)
@given(st.text(max_size=30))
def test_login_address_turns_the_last_percent_into_an_at(login: str) -> None:
    address = login_address(login)
    if "@" in login or "%" not in login:
        assert address == login
    else:
        user, _, domain = login.rpartition("%")
        assert address == f"{user}@{domain}" and address.replace("@", "%") == login


# -- the session, in memory ----------------------------------------------------------------------------

ALICE = f"alice@{DOMAIN}"
MESSAGES = [
    b"Subject: one\n\nhello\n",
    b"Subject: dots\n\n.\n..\n.x\nend",
    b"Subject: crlf\r\nX: y\r\n\r\nbody\r\n.\r\n",
    b"",
    b"no header at all\n" * 5,
]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> MemoryHome:
    root = tmp_path_factory.mktemp("pop3-properties") / "home"
    make_home(root)
    return MemoryHome(root)


@pytest.fixture(scope="module", autouse=True)
def inline_threads():
    """Password checks and Maildir work run inline: an example cannot wait for the reactor."""
    def inline(function, *args):
        return maybeDeferred(function, *args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(users_module, "deferToThread", inline)
        patch.setattr(pop3d, "deferToThread", inline)
        yield


def fill_maildrop(home: MemoryHome) -> None:
    """alice's Maildir holds MESSAGES in new/, whatever the last example did to it."""
    maildir = home.path / "domains" / DOMAIN / "alice" / "Maildir"
    for sub in ("new", "cur"):
        for entry in (maildir / sub).iterdir():
            entry.unlink()
    for number, data in enumerate(MESSAGES, 1):
        (maildir / "new" / f"{NOW + number}.M{number}P1.properties").write_bytes(data)


@dataclass
class Session:
    home: MemoryHome
    clock: Clock = field(default_factory=Clock)
    read: int = 0

    def __post_init__(self) -> None:
        self.clock.advance(NOW)
        throttle = FailureThrottle(self.clock, lambda: (10, 600, 900))
        factory = POP3Factory(logins=Logins("pop3d", mail_portal(self.home.users, "pop3"), throttle, self.clock),
                              grants=self.home.grants, settings=lambda: self.home.settings, clock=self.clock)
        self.server = POP3Server(factory)
        self.client = POP3Client(self.server, "127.0.0.1")

    def ask(self, line: bytes, multiline: bool) -> bytes:
        """Send a command, let a failed login's delay pass and a message stream
        out, and return the whole reply (checked to be the only output)."""
        self.client.send(line + b"\r\n")
        for _ in range(10):
            self.client._pump()
            if not self.server.busy:
                break
            self.clock.advance(5)
        assert not self.server.busy, f"{line!r} still runs"
        output = self.client.output
        reply, self.read = output[self.read:], len(output)
        if not reply and self.client.closed:
            return reply
        assert reply.startswith((b"+OK\r\n", b"+OK ", b"-ERR\r\n", b"-ERR ")), reply
        first_end = reply.index(b"\r\n") + 2
        if multiline and reply.startswith(b"+OK"):
            assert reply.endswith(b"\r\n.\r\n") or reply[first_end:] == b".\r\n", reply
        else:
            assert len(reply) == first_end, f"{line!r}: more than one line: {reply!r}"
        return reply

    def end(self) -> None:
        self.client.hang_up()


def no_failure_logged(events: list[dict]) -> None:
    failures = [formatEvent(event) for event in events if "log_failure" in event]
    assert not failures, failures


def is_multiline(line: bytes) -> bool:
    verb, _, argument = line.decode("utf-8", "surrogateescape").partition(" ")
    verb = verb.upper()
    return verb in ("CAPA", "RETR", "TOP") or (verb in ("LIST", "UIDL") and not argument.strip())


line_bytes = st.binary(max_size=40).filter(lambda line: b"\n" not in line)
number = st.one_of(st.integers(-1, 7).map(str), st.sampled_from(["", " 1", "1 ", "01", "٣", "x", "9" * 30]))
authorization_line = st.one_of(
    st.builds(lambda verb, argument: f"{verb} {argument}".encode("utf-8", "surrogateescape"),
              st.sampled_from(["USER", "PASS", "APOP", "user", "STLS", "CAPA", "NOOP", "STAT", "LIST", "RETR",
                               "AUTH", "QUIT"]),
              st.text(st.characters(blacklist_characters="\n"), max_size=20) | st.sampled_from([ALICE, "alice%example.test", PASSWORD, "",
                                                      f"{ALICE} 0123456789abcdef0123456789abcdef"])),
    st.sampled_from([b"USER " + ALICE.encode(), b"PASS " + PASSWORD.encode(), b"CAPA", b"NOOP", b"QUIT", b""]),
    line_bytes,
    st.just(b"X" * 2000),
)


# A right USER/PASS pair among the rest, or examples would seldom log in.
login_pair = st.just([b"USER " + ALICE.encode(), b"PASS " + PASSWORD.encode()])
authorization_lines = st.lists(authorization_line.map(lambda line: [line]) | login_pair, max_size=8).map(
    lambda runs: [line for run in runs for line in run])


@settings(max_examples=100, deadline=None)
@given(authorization_lines)
def test_any_line_before_login_gets_ok_or_err(home: MemoryHome, lines: list[bytes]) -> None:
    fill_maildrop(home)
    with capturedLogs() as events:
        session = Session(home)
        greeting = session.client.output
        session.read = len(greeting)
        assert re.fullmatch(rb"\+OK <[^>]+>\r\n", greeting)
        for line in lines:
            if session.client.closed:
                break
            reply = session.ask(line, is_multiline(line))
            if reply.startswith(b"+OK") and line.upper().startswith(b"PASS"):
                event("logged in")
        session.end()
    no_failure_logged(events)


transaction_line = st.one_of(
    st.builds(lambda verb, argument: f"{verb} {argument}".encode(),
              st.sampled_from(["STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP", "retr", "CAPA"]),
              number | st.builds(lambda a, b: f"{a} {b}", number, number)),
    st.sampled_from([b"LIST", b"UIDL", b"STAT", b"RSET", b"USER x", b"PASS y", b"APOP a b", b"STLS", b"QUIT"]),
    st.sampled_from([b"RETR %d" % index for index in range(1, len(MESSAGES) + 1)]
                    + [b"DELE 2", b"TOP 3 0", b"TOP 2 1", b"LIST 5", b"UIDL 1"]),
    line_bytes,
)


@settings(max_examples=80, deadline=None)
@given(st.lists(transaction_line, max_size=12))
def test_any_line_after_login_gets_ok_or_err_and_retr_sends_the_file(home: MemoryHome, lines: list[bytes]) -> None:
    fill_maildrop(home)
    with capturedLogs() as events:
        session = Session(home)
        session.read = len(session.client.output)
        assert session.ask(b"USER " + ALICE.encode(), False) == b"+OK\r\n"
        assert session.ask(b"PASS " + PASSWORD.encode(), False) == b"+OK\r\n"
        deleted: set[int] = set()
        quit = False
        for line in lines:
            if session.client.closed:
                break
            reply = session.ask(line, is_multiline(line))
            verb, _, argument = line.decode("utf-8", "surrogateescape").partition(" ")
            verb, argument = verb.upper(), argument.strip()
            if verb == "RSET" and reply.startswith(b"+OK"):
                deleted.clear()
            elif verb == "DELE" and reply.startswith(b"+OK"):
                deleted.add(int(argument))
            elif verb == "RETR" and reply.startswith(b"+OK"):
                assert int(argument) not in deleted
                body = reply[reply.index(b"\r\n") + 2:]
                assert unstuffed(body) == as_sent(MESSAGES[int(argument) - 1])
                event("RETR sent a message")
            elif verb == "QUIT":
                quit = reply == b"+OK\r\n"
            elif verb == "STAT" and reply.startswith(b"+OK"):
                live = [data for index, data in enumerate(MESSAGES, 1) if index not in deleted]
                assert reply == b"+OK %d %d\r\n" % (len(live), sum(len(as_sent(data)) for data in live))
        session.end()
    no_failure_logged(events)
    # DELE only marks; QUIT removes what is marked, and nothing else ever goes.
    maildir = home.path / "domains" / DOMAIN / "alice" / "Maildir"
    left = len(os.listdir(maildir / "cur")) + len(os.listdir(maildir / "new"))
    assert left == len(MESSAGES) - (len(deleted) if quit else 0)
    assert not os.listdir(maildir / "tmp")

def test_the_session_rig_logs_in_and_lists_the_maildrop(home: MemoryHome) -> None:
    """The properties above start from here."""
    fill_maildrop(home)
    session = Session(home)
    session.read = len(session.client.output)
    session.ask(b"USER " + ALICE.encode(), False)
    assert session.ask(b"PASS " + PASSWORD.encode(), False) == b"+OK\r\n"
    assert session.ask(b"UIDL", True).count(b"\r\n") == len(MESSAGES) + 2
    assert session.ask(b"QUIT", False) == b"+OK\r\n" and session.client.closed
    session.end()
    assert Path(home.path / "domains" / DOMAIN / "alice" / "Maildir" / "cur").is_dir()
