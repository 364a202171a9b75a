"""qmail-smtpd's behaviour as a client sees it, against a real `twistd qmail`
on loopback (see tests/support/server.py): replies, policy, PIPELINING, DATA transparency,
hostile input, live reconfiguration and what survives kill -9.

Client addresses tell the shared server's tcp.smtp rules apart: every 127.x
address is loopback on Linux, and a client may bind any of them.
"""

from __future__ import annotations

import random
import re
import select
import socket
import ssl
import struct
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support.fakesmtp import FakeSMTP
from tests.support.home import DOMAIN, Home, ME, make_home
from tests.support.server import Server, session
from tests.support.smtpclient import ask, read_replies, read_until_closed, unique, wire
from tests.support.waiting import DEADLINE, DeadPort, wait_until

PLAIN = "127.0.0.1"      # no environment: may only send to rcpthosts
RELAY = "127.0.0.2"      # RELAYCLIENT=""
DENIED = "127.0.0.3"     # deny
SMALL = "127.0.0.4"      # DATABYTES="1000"
DATABYTES = 10_000_000
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"

REPLY_RCPTHOSTS = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
REPLY_BADMAILFROM = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)"
REPLY_SIZE = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)"
REPLY_BARE_LF = b"451 See http://pobox.com/~djb/docs/smtplf.html."
REPLY_LOOPING = b"554 too many hops, this message is looping (#5.4.6)"
QUEUED = re.compile(rb"250 ok (\d+) qp (\d+)")
RECEIVED = re.compile(rb"Received: from unknown \(HELO (?P<helo>[^\n]*)\) \((?P<ip>[^)\n]*)\)\n"
                      rb"  by (?P<me>[^ \n]+) with (?P<protocol>[A-Z]+); (?P<date>[^\n]+)\n")


# -- fixtures and helpers ------------------------------------------------------------

@pytest.fixture(scope="module")
def mx(tmp_path_factory, dead_port: DeadPort, sink: FakeSMTP) -> Iterator[Server]:
    """The shared server.  Remote mail goes to the sink for sink.test and to a
    port that refuses connections for everything else, so nothing leaves loopback."""
    home = make_home(
        tmp_path_factory.mktemp("mx"),
        controls={
            "rcpthosts": ".sub.example.net\n",
            "databytes": f"{DATABYTES}\n",
            "badmailfrom": "spammer@bad.test\n@evil.test\n",
            "badrcptto": f"blocked@{DOMAIN}\n",
            "smtproutes": f"sink.test:127.0.0.1:{sink.port}\n:127.0.0.1:{dead_port.port}\n",
        },
        tcp_smtp=(f'{RELAY}:allow,RELAYCLIENT=""\n'
                  f"{DENIED}:deny\n"
                  f'{SMALL}:allow,DATABYTES="1000"\n'
                  ":allow\n"))
    server = Server(home, dns_port=dead_port.port).start()
    yield server
    server.stop()


@pytest.fixture
def start_server(tmp_path: Path, dead_port: DeadPort) -> Iterator[Callable[..., Server]]:
    """Start a server of its own for a test that changes or kills it."""
    servers: list[Server] = []

    def start(controls: dict[str, str] | None = None, tcp_smtp: str | None = None) -> Server:
        home = make_home(tmp_path / f"home{len(servers)}", controls=controls, tcp_smtp=tcp_smtp)
        server = Server(home, dns_port=dead_port.port).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def envelope(sender: str, recipients: list[str]) -> bytes:
    lines = [f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{rcpt}>" for rcpt in recipients] + ["DATA"]
    return "".join(f"{line}\r\n" for line in lines).encode()


def send(server: Server, sender: str, recipients: list[str], message: bytes,
         source: str = PLAIN, helo: str = "EHLO client.example.test") -> bytes:
    """One whole transaction, step by step; the reply to the message data."""
    with session(server, source) as sock:
        replies = ask(sock, helo, f"MAIL FROM:<{sender}>", *[f"RCPT TO:<{r}>" for r in recipients], "DATA")
        assert all(reply.startswith(b"250") for reply in replies[:-1]), replies
        assert replies[-1] == b"354 go ahead", replies
        sock.sendall(wire(message) + b".\r\n")
        final, = read_replies(sock, 1)
        ask(sock, "QUIT")
        return final


def delivered_parts(stored: bytes, sender: str, recipient: str) -> tuple[re.Match, bytes]:
    """Split a Maildir file into its Received: line and the message as sent,
    checking the Return-Path: and Delivered-To: lines before them."""
    head = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode()
    assert stored.startswith(head), stored[:300]
    received = RECEIVED.match(stored, len(head))
    assert received, stored[:300]
    return received, stored[received.end():]


def assert_never_queued(server: Server, sender: str, maildir: Path, marker: bytes) -> None:
    server.barrier(ALICE, unique("barrier"))
    assert f"from <{sender}>" not in server.log
    assert server.home.messages_with(maildir, marker) == []


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


# -- greeting and simple commands ------------------------------------------------------

def test_greeting_names_me(mx):
    with mx.connect() as sock:
        assert read_replies(sock, 1) == [f"220 {ME} ESMTP".encode()]


def test_smtpgreeting_control_file_replaces_me_in_banner(start_server):
    server = start_server(controls={"smtpgreeting": "mail.example.test welcome\n"})
    with server.connect() as sock:
        assert read_replies(sock, 1) == [b"220 mail.example.test welcome ESMTP"]
        assert ask(sock, "HELO c") == [f"250 {ME}".encode()]


def test_ehlo_lists_pipelining_8bitmime_and_size(mx):
    with session(mx) as sock:
        reply, = ask(sock, "EHLO client.example.test")
    lines = reply.split(b"\r\n")
    assert lines[0] == f"250-{ME}".encode()
    assert b"250-PIPELINING" in lines
    assert b"250-8BITMIME" in lines
    assert lines[-1] == f"250 SIZE {DATABYTES}".encode()
    assert all(line.startswith(b"250-") for line in lines[:-1])
    assert not any(b"STARTTLS" in line for line in lines)  # no control/servercert.pem


def test_helo_answers_with_me(mx):
    with session(mx) as sock:
        assert ask(sock, "HELO client.example.test") == [f"250 {ME}".encode()]


def test_noop_rset_vrfy_help_and_quit(mx):
    with session(mx) as sock:
        noop, rset, vrfy, help_reply = ask(sock, "NOOP", "RSET", f"VRFY {ALICE}", "HELP")
        assert noop.startswith(b"250 ")
        assert rset.startswith(b"250 ")
        assert vrfy.startswith(b"252 ")
        assert help_reply.startswith(b"214")
        sock.sendall(b"QUIT\r\n")
        assert read_until_closed(sock) == f"221 {ME}\r\n".encode()


@pytest.mark.parametrize("command", ["FOO bar", "EXPN staff", "BDAT 10 LAST", "TURN"])
def test_unknown_command_is_unimplemented(mx, command):
    with session(mx) as sock:
        assert ask(sock, command, "NOOP") == [b"502 unimplemented (#5.5.1)", b"250 ok"]


def test_commands_are_case_insensitive(mx):
    with session(mx) as sock:
        replies = ask(sock, "helo c", "mail from:<someone@remote.test>", f"rcpt to:<{ALICE}>", "rSeT", "noop")
    assert replies == [f"250 {ME}".encode(), b"250 ok", b"250 ok", b"250 flushed", b"250 ok"]


def test_commands_out_of_order(mx):
    with session(mx) as sock:
        replies = ask(sock, "HELO c", f"RCPT TO:<{ALICE}>", "DATA", "MAIL FROM:<someone@remote.test>",
                      "DATA", "RSET", f"RCPT TO:<{ALICE}>")
    assert replies[1:] == [b"503 MAIL first (#5.5.1)", b"503 MAIL first (#5.5.1)", b"250 ok",
                           b"503 RCPT first (#5.5.1)", b"250 flushed", b"503 MAIL first (#5.5.1)"]


# -- sizes ----------------------------------------------------------------------------

def test_mail_with_size_over_databytes_is_refused_at_mail(mx):
    with session(mx) as sock:
        replies = ask(sock, "EHLO c", f"MAIL FROM:<big@remote.test> SIZE={DATABYTES + 1}",
                      f"MAIL FROM:<big@remote.test> SIZE={DATABYTES}", f"RCPT TO:<{ALICE}>")
    assert replies[1:] == [REPLY_SIZE, b"250 ok", b"250 ok"]


def sized_message(size: int, marker: str) -> bytes:
    """An LF message of exactly ``size`` bytes that contains ``marker``."""
    head = f"Subject: {marker}\n\n".encode()
    filler = size - len(head)
    lines = [b"y" * 99 + b"\n"] * (filler // 100)
    rest = filler - 100 * len(lines)
    message = head + b"".join(lines) + (b"z" * (rest - 1) + b"\n" if rest else b"")
    assert len(message) == size
    return message


def test_tcp_smtp_databytes_overrides_control_file_and_bounds_messages(mx):
    marker = unique("databytes")
    sender = f"{marker}@remote.test"
    with session(mx, SMALL) as sock:
        ehlo, = ask(sock, "EHLO c")
        assert ehlo.split(b"\r\n")[-1] == b"250 SIZE 1000"
        assert ask(sock, f"MAIL FROM:<{sender}> SIZE=1001") == [REPLY_SIZE]
        sock.sendall(envelope(sender, [ALICE]) + wire(sized_message(1001, marker)) + b".\r\n")
        assert read_replies(sock, 4) == [b"250 ok", b"250 ok", b"354 go ahead", REPLY_SIZE]
        assert ask(sock, "NOOP") == [b"250 ok"]  # the session goes on
    assert_never_queued(mx, sender, mx.home.maildir(ALICE), marker.encode())

    at_limit = unique("databytes-exact")
    assert QUEUED.fullmatch(send(mx, "exact@remote.test", [ALICE], sized_message(1000, at_limit), SMALL))
    mx.home.wait_for_message(mx.home.maildir(ALICE), at_limit.encode())


def wire_sized_message(wire_size: int, marker: str) -> bytes:
    """An LF message that takes exactly ``wire_size`` bytes as DATA (before the final '.')."""
    head = f"Subject: {marker}\n\n".encode()
    remaining = wire_size - len(wire(head))
    full_lines, rest = divmod(remaining, 101)  # 99 bytes + CRLF each
    if rest == 1:
        full_lines, rest = full_lines - 1, rest + 101
    message = head + (b"y" * 99 + b"\n") * full_lines + (b"z" * (rest - 2) + b"\n" if rest else b"")
    assert len(wire(message)) == wire_size
    return message


def test_oversized_message_ending_just_past_the_data_buffer_limit_gets_552(mx):
    marker = unique("overflow")
    sender = f"{marker}@remote.test"
    # SMALL's DATABYTES=1000: the server keeps at most 2 * 1000 + 65536 bytes of message data;
    # this message (with the CRLF the server counts before it, and its terminator) ends 4 bytes past that.
    message = wire_sized_message(2 * 1000 + 65536 + 4 - 2 - 3, marker)
    with session(mx, SMALL) as sock:
        ask(sock, "HELO c")
        sock.sendall(envelope(sender, [ALICE]) + wire(message) + b".\r\n")
        assert read_replies(sock, 4, timeout=3) == [b"250 ok", b"250 ok", b"354 go ahead", REPLY_SIZE]
        assert ask(sock, "RSET", f"MAIL FROM:<{sender}>") == [b"250 flushed", b"250 ok"]
    assert_never_queued(mx, sender, mx.home.maildir(ALICE), marker.encode())


# -- relaying and address policy ------------------------------------------------------------

def test_rcpthosts_exact_and_dot_suffix_entries(mx):
    recipients = {
        ALICE: b"250 ok",
        "someone@EXAMPLE.TEST": b"250 ok",
        "x@a.sub.example.net": b"250 ok",
        "x@deep.a.sub.example.net": b"250 ok",
        f"nobody@{DOMAIN}": b"250 ok",  # unknown users bounce later, as without chkuser
        "x@sub.example.net": REPLY_RCPTHOSTS,  # '.sub.example.net' covers subdomains only
        "x@example.net": REPLY_RCPTHOSTS,
        "x@notexample.test": REPLY_RCPTHOSTS,
    }
    with session(mx) as sock:
        ask(sock, "HELO c", "MAIL FROM:<someone@remote.test>")
        assert ask(sock, *[f"RCPT TO:<{rcpt}>" for rcpt in recipients]) == list(recipients.values())
        ask(sock, "RSET")


@pytest.mark.parametrize("address", [
    "user@remote.test",
    "user@remote.test.",
    "@example.test:user@remote.test",
    '"user@example.test"@remote.test',
    "user@example.test@remote.test",
    "user@[127.0.0.1]",
])
def test_no_relaying_without_relayclient(mx, address):
    with session(mx) as sock:
        assert ask(sock, "HELO c", "MAIL FROM:<someone@remote.test>", f"RCPT TO:<{address}>")[2] \
            == REPLY_RCPTHOSTS


def test_relayclient_from_tcp_smtp_relays_to_the_smtproutes_host(mx, sink):
    marker = unique("relayed")
    reply = send(mx, "someone@example.test", ["friend@sink.test"],
                 f"Subject: {marker}\n\nrelayed\n".encode(), source=RELAY)
    assert QUEUED.fullmatch(reply)
    relayed = sink.wait_for(marker.encode())
    assert relayed.sender == "someone@example.test"
    assert relayed.recipients == ["friend@sink.test"]
    assert relayed.data.startswith(b"Received: from unknown (HELO client.example.test) (127.0.0.2)\r\n")


def test_deny_rule_closes_before_the_banner(mx):
    try:
        with mx.connect(DENIED) as sock:
            received = read_until_closed(sock)
    except ConnectionResetError:  # reset so early that connect() itself saw it
        received = b""
    assert received == b""


@pytest.mark.parametrize("sender", ["spammer@bad.test", "SPAMMER@Bad.Test", "anyone@evil.test"])
def test_badmailfrom_is_refused_at_rcpt(mx, sender):
    with session(mx) as sock:
        replies = ask(sock, "HELO c", f"MAIL FROM:<{sender}>", f"RCPT TO:<{ALICE}>", f"RCPT TO:<{BOB}>")
    assert replies[1:] == [b"250 ok", REPLY_BADMAILFROM, REPLY_BADMAILFROM]


def test_badmailfrom_matches_whole_addresses_and_whole_domains_only(mx):
    with session(mx) as sock:
        replies = ask(sock, "HELO c", "MAIL FROM:<anyone@notevil.test>", f"RCPT TO:<{ALICE}>",
                      "MAIL FROM:<other@bad.test>", f"RCPT TO:<{ALICE}>")
    assert replies[1:] == [b"250 ok"] * 4


def test_badrcptto_refuses_that_recipient_only(mx):
    with session(mx) as sock:
        replies = ask(sock, "HELO c", "MAIL FROM:<someone@remote.test>", f"RCPT TO:<blocked@{DOMAIN}>",
                      f"RCPT TO:<{ALICE}>")
    assert replies[2].startswith(b"553 ") and b"badrcptto" in replies[2]
    assert replies[3] == b"250 ok"


def test_bare_postmaster_is_accepted_and_delivered_via_envnoathost(mx):
    marker = unique("postmaster")
    with session(mx) as sock:
        replies = ask(sock, "HELO c", "MAIL FROM:<someone@remote.test>", "RCPT TO:<postmaster>", "DATA")
        assert replies[1:] == [b"250 ok", b"250 ok", b"354 go ahead"]
        sock.sendall(wire(f"Subject: {marker}\n\nhello\n".encode()) + b".\r\n")
        assert QUEUED.fullmatch(read_replies(sock, 1)[0])
    stored = mx.home.wait_for_message(mx.home.path / "alias" / "Maildir", marker.encode())
    delivered_parts(stored, "someone@remote.test", f"postmaster@{ME}")


# -- PIPELINING ----------------------------------------------------------------------------

def test_pipelined_transaction_in_one_write(mx):
    marker = unique("pipelined")
    message = f"Subject: {marker}\n\npipelined\n".encode()
    sender = "someone@remote.test"
    with mx.connect() as sock:
        sock.sendall(b"EHLO client.example.test\r\n"
                     + envelope(sender, [ALICE, "stranger@remote.test", BOB])
                     + wire(message) + b".\r\nQUIT\r\n")
        replies = replies_in(read_until_closed(sock))
    assert replies[0] == f"220 {ME} ESMTP".encode()
    assert replies[1].startswith(f"250-{ME}\r\n".encode())
    assert replies[2:7] == [b"250 ok", b"250 ok", REPLY_RCPTHOSTS, b"250 ok", b"354 go ahead"]
    assert QUEUED.fullmatch(replies[7]), replies[7]
    assert replies[8:] == [f"221 {ME}".encode()]
    for recipient in (ALICE, BOB):
        stored = mx.home.wait_for_message(mx.home.maildir(recipient), marker.encode())
        assert delivered_parts(stored, sender, recipient)[1] == message


def test_two_messages_pipelined_back_to_back(mx):
    first, second = unique("first"), unique("second")
    with mx.connect() as sock:
        sock.sendall(b"EHLO c\r\n"
                     + envelope("one@remote.test", [ALICE]) + wire(f"Subject: {first}\n\n1\n".encode())
                     + b".\r\n"
                     + envelope("two@remote.test", [BOB]) + wire(f"Subject: {second}\n\n2\n".encode())
                     + b".\r\nQUIT\r\n")
        replies = replies_in(read_until_closed(sock))
    assert replies[2:5] == [b"250 ok", b"250 ok", b"354 go ahead"]
    assert replies[6:9] == [b"250 ok", b"250 ok", b"354 go ahead"]
    ids = [QUEUED.fullmatch(replies[index]).group(2) for index in (5, 9)]
    assert ids[0] != ids[1]
    assert replies[10:] == [f"221 {ME}".encode()]
    mx.home.wait_for_message(mx.home.maildir(ALICE), first.encode())
    mx.home.wait_for_message(mx.home.maildir(BOB), second.encode())


def test_large_messages_pipelined_back_to_back(mx):
    markers = [unique(f"large{n}") for n in range(3)]
    messages = [f"Subject: {marker}\n\n".encode() + (marker.encode() + b" filler line\n") * 40_000
                for marker in markers]
    stream = b"EHLO c\r\n"
    for message in messages:
        stream += envelope("large@remote.test", [BOB]) + wire(message) + b".\r\n"
    with mx.connect() as sock:
        sock.sendall(stream + b"QUIT\r\n")
        replies = replies_in(read_until_closed(sock, timeout=30))
    assert len(replies) == 2 + 4 * len(messages) + 1
    for index in range(len(messages)):
        assert replies[2 + 4 * index:5 + 4 * index] == [b"250 ok", b"250 ok", b"354 go ahead"]
        assert QUEUED.fullmatch(replies[5 + 4 * index]), replies[5 + 4 * index]
    for marker, message in zip(markers, messages):
        stored = mx.home.wait_for_message(mx.home.maildir(BOB), f"Subject: {marker}".encode())
        assert delivered_parts(stored, "large@remote.test", BOB)[1] == message


# -- DATA transparency ---------------------------------------------------------------------

def test_dots_and_eight_bit_bytes_are_stored_byte_exact(mx):
    marker = unique("transparency")
    message = (f"Subject: {marker}\n\n".encode()
               + b".leading dot\n"
               + b".\n"               # a lone dot line: sent as '..'
               + b"..\n"
               + b"...more dots\n"
               + b" .\n"
               + b"\n"
               + bytes(range(0x80, 0x100)) + b"\n"
               + "caf\u00e9 \u00fcber\n".encode()
               + b"last line\n")
    sender = "dots@remote.test"
    assert QUEUED.fullmatch(send(mx, sender, [ALICE], message))
    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode())
    assert delivered_parts(stored, sender, ALICE)[1] == message
    assert b"\r" not in stored


def test_message_whose_first_line_starts_with_a_dot(mx):
    marker = unique("firstdot")
    message = f".{marker} begins the message\n\nbody\n".encode()
    assert QUEUED.fullmatch(send(mx, "firstdot@remote.test", [ALICE], message))
    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode())
    assert delivered_parts(stored, "firstdot@remote.test", ALICE)[1] == message


def test_bare_cr_is_kept_as_qmail_keeps_it(mx):
    marker = unique("bare-cr")
    message = f"Subject: {marker}\n\nover\rwritten\n".encode()
    assert QUEUED.fullmatch(send(mx, "cr@remote.test", [ALICE], message))
    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode())
    assert delivered_parts(stored, "cr@remote.test", ALICE)[1] == message


def test_empty_message_is_accepted_and_stored(mx):
    sender = f"{unique('empty')}@remote.test"
    with session(mx) as sock:
        sock.sendall(b"HELO c\r\n" + envelope(sender, [ALICE]) + b".\r\n")
        replies = read_replies(sock, 5)
    assert replies[:4] == [f"250 {ME}".encode(), b"250 ok", b"250 ok", b"354 go ahead"]
    assert QUEUED.fullmatch(replies[4])
    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), f"Return-Path: <{sender}>".encode())
    assert delivered_parts(stored, sender, ALICE)[1] == b""


def test_null_sender_is_accepted_and_kept_as_return_path(mx):
    marker = unique("bounce")
    message = f"Subject: {marker}\n\nfailure notice\n".encode()
    assert QUEUED.fullmatch(send(mx, "", [ALICE], message))
    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode())
    assert delivered_parts(stored, "", ALICE)[1] == message


def test_header_only_message_is_stored_byte_exact(mx):
    marker = unique("headers-only")
    message = f"Subject: {marker}\nX-Empty-Body: yes\n".encode()
    assert QUEUED.fullmatch(send(mx, "headers@remote.test", [ALICE], message))
    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode())
    assert delivered_parts(stored, "headers@remote.test", ALICE)[1] == message


def test_five_megabyte_message_is_stored_byte_exact(mx):
    marker = unique("big")
    rng = random.Random(5)
    lines = []
    for number in range(50_000):
        text = "".join(rng.choices("abcdefghij .", k=rng.randrange(0, 200)))
        lines.append(("." + text) if number % 97 == 0 else text)
    message = f"Subject: {marker}\n\n".encode() + "\n".join(lines).encode() + b"\n"
    message += b"x" * (5 * 1024 * 1024 - len(message) - 1) + b"\n"
    assert len(message) == 5 * 1024 * 1024
    assert QUEUED.fullmatch(send(mx, "big@remote.test", [BOB], message))
    stored = mx.home.wait_for_message(mx.home.maildir(BOB), marker.encode(), timeout=30)
    assert delivered_parts(stored, "big@remote.test", BOB)[1] == message


# -- bare LF ---------------------------------------------------------------------------------

def test_bare_lf_in_data_gets_451_closes_and_queues_nothing(mx):
    marker = unique("barelf")
    sender = f"{marker}@remote.test"
    with session(mx) as sock:
        ask(sock, "HELO c")
        # If "\n.\n" ended the data, MAIL below would be a command and get its own reply.
        sock.sendall(envelope(sender, [ALICE])
                     + f"Subject: {marker}\r\n\r\nfirst\n.\nMAIL FROM:<again@remote.test>\r\n.\r\n".encode())
        assert replies_in(read_until_closed(sock)) == [b"250 ok", b"250 ok", b"354 go ahead", REPLY_BARE_LF]
    assert_never_queued(mx, sender, mx.home.maildir(ALICE), marker.encode())


def test_bare_lf_client_gets_451_without_sending_crlf_dot_crlf(mx):
    with session(mx) as sock:
        sock.sendall(b"HELO c\r\n" + envelope("lf@remote.test", [ALICE]) + b"Subject: lf\n\nbody\n.\n")
        assert read_replies(sock, 5, timeout=3)[-1] == REPLY_BARE_LF


# -- loops -------------------------------------------------------------------------------------

def hops_message(received: int, delivered_to: int, marker: str) -> bytes:
    trace = [f"Received: from hop{n}.example.net by relay{n}.example.net; 1 Jan 2026 00:00:00 -0000\n"
             for n in range(received)]
    trace += [f"Delivered-To: list{n}@example.net\n" for n in range(delivered_to)]
    return ("".join(trace) + f"Subject: {marker}\n\nloop?\n").encode()


@pytest.mark.parametrize("received,delivered_to", [(100, 0), (50, 50), (150, 0)])
def test_hundred_hops_are_refused_as_looping(mx, received, delivered_to):
    marker = unique("loop")
    sender = f"{marker}@remote.test"
    assert send(mx, sender, [ALICE], hops_message(received, delivered_to, marker)) == REPLY_LOOPING
    assert_never_queued(mx, sender, mx.home.maildir(ALICE), marker.encode())


def test_ninety_nine_hops_are_accepted(mx):
    marker = unique("hops99")
    message = hops_message(99, 0, marker)
    assert QUEUED.fullmatch(send(mx, "hops@remote.test", [ALICE], message))
    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode())
    assert delivered_parts(stored, "hops@remote.test", ALICE)[1] == message


# -- the queue's answer --------------------------------------------------------------------

def test_queued_reply_names_the_id_qread_lists_while_deferred(mx):
    marker = unique("deferred")
    recipient = f"{marker}@deferred.test"
    before = int(time.time())
    reply = send(mx, "someone@example.test", [recipient], f"Subject: {marker}\n\nlater\n".encode(),
                 source=RELAY)
    after = int(time.time())
    queued = QUEUED.fullmatch(reply)
    assert queued, reply
    assert before <= int(queued.group(1)) <= after
    message_id = queued.group(2).decode()
    mx.wait_for_log(f"to remote {recipient}")  # the first attempt met the refusing port
    listing = mx.home.qread()
    entry = re.search(rf"^.* GMT  #{message_id}  \d+  <someone@example\.test> \n\tremote\t(.*)$",
                      listing, re.MULTILINE)
    assert entry and entry.group(1) == recipient, listing
    assert mx.home.qstat()[0] >= 1


# -- hostile and broken input ----------------------------------------------------------------

def test_overlong_line_gets_500_and_the_session_goes_on(mx):
    with session(mx) as sock:
        sock.sendall(b"NOOP " + b"x" * 100_000 + b"\r\n")
        reply, = read_replies(sock, 1)
        assert reply.startswith(b"500 ")
        assert ask(sock, "NOOP", "HELO c", "MAIL FROM:<a@remote.test>", f"RCPT TO:<{ALICE}>") \
            == [b"250 ok", f"250 {ME}".encode(), b"250 ok", b"250 ok"]


def test_nul_bytes_in_commands_are_refused_and_kept_in_data(mx):
    marker = unique("nul")
    with session(mx) as sock:
        reply, = ask(sock, b"NO\0OP")
        assert reply.startswith(b"5")
        assert ask(sock, "NOOP") == [b"250 ok"]
    message = f"Subject: {marker}\n\nbefore\0after\n\0\n".encode()
    assert QUEUED.fullmatch(send(mx, "nul@remote.test", [ALICE], message))
    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode())
    assert delivered_parts(stored, "nul@remote.test", ALICE)[1] == message


def test_binary_garbage_gets_errors_and_the_server_survives(mx):
    garbage = random.Random(7).randbytes(65536)
    with session(mx) as sock:
        sock.sendall(garbage + b"\r\nNOOP\r\nQUIT\r\n")
        replies = replies_in(read_until_closed(sock))
    assert replies[-2:] == [b"250 ok", f"221 {ME}".encode()]
    assert replies[:-2] and all(reply.startswith(b"5") for reply in replies[:-2])
    with mx.connect() as sock:
        assert read_replies(sock, 1) == [f"220 {ME} ESMTP".encode()]


def client_hello() -> bytes:
    """The first flight of a real TLS client."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=ME)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_client_hello_on_the_plain_port_gets_smtp_errors(mx):
    with session(mx) as sock:
        sock.sendall(client_hello() + b"\r\nNOOP\r\nQUIT\r\n")
        replies = replies_in(read_until_closed(sock))
    assert replies[-2:] == [b"250 ok", f"221 {ME}".encode()]
    assert replies[:-2] and all(reply.startswith(b"5") for reply in replies[:-2])


def test_client_vanishing_mid_data_leaves_nothing_behind(mx):
    marker = unique("vanished")
    sender = f"{marker}@remote.test"
    sock = session(mx)
    sock.sendall(b"HELO c\r\n" + envelope(sender, [ALICE]))
    assert read_replies(sock, 4)[-1] == b"354 go ahead"
    sock.sendall(f"Subject: {marker}\r\n\r\n".encode() + b"half a message\r\n" * 5000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # with linger 0: a reset, no FIN
    assert_never_queued(mx, sender, mx.home.maildir(ALICE), marker.encode())
    assert sender not in mx.home.qread()


def test_thousand_pipelined_refused_rcpts_each_get_their_reply(mx):
    commands = b"EHLO c\r\nMAIL FROM:<many@remote.test>\r\n"
    commands += b"".join(f"RCPT TO:<user{n}@remote{n}.test>\r\n".encode() for n in range(1000))
    with session(mx) as sock:
        sock.sendall(commands + b"QUIT\r\n")
        replies = replies_in(read_until_closed(sock, timeout=20))
    assert replies[1] == b"250 ok"
    assert replies[2:1002] == [REPLY_RCPTHOSTS] * 1000
    assert replies[1002:] == [f"221 {ME}".encode()]


def peak_memory_kib(pid: int) -> int:
    """The process's peak resident size (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


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


def test_idle_client_gets_451_timeout_and_is_dropped(start_server):
    server = start_server(controls={"timeoutsmtpd": "2\n"})
    marker = unique("stalled")
    with session(server) as idle, session(server) as stalled:
        stalled.sendall(b"HELO c\r\n" + envelope(f"{marker}@remote.test", [ALICE]))
        assert read_replies(stalled, 4)[-1] == b"354 go ahead"
        stalled.sendall(f"Subject: {marker}\r\n\r\nand then nothing".encode())
        ask(idle, "HELO c")
        idle_since = time.monotonic()
        assert read_until_closed(idle, timeout=10) == b"451 timeout (#4.4.2)\r\n"
        assert 1.5 <= time.monotonic() - idle_since < 8
        assert read_until_closed(stalled, timeout=10) == b"451 timeout (#4.4.2)\r\n"
    assert server.home.qstat() == (0, 0)
    assert server.home.messages_with(server.home.maildir(ALICE), marker.encode()) == []


# -- the Received: header ---------------------------------------------------------------------

@pytest.mark.parametrize("greeting,source,protocol", [
    ("EHLO client.example.test", PLAIN, b"ESMTP"),
    ("HELO old.example.test", RELAY, b"SMTP"),
])
def test_received_header_names_helo_client_me_protocol_and_date(mx, greeting, source, protocol):
    marker = unique("received")
    message = f"Subject: {marker}\n\nhi\n".encode()
    assert QUEUED.fullmatch(send(mx, "trace@remote.test", [ALICE], message, source=source, helo=greeting))
    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode())
    received, rest = delivered_parts(stored, "trace@remote.test", ALICE)
    assert rest == message
    assert received["helo"] == greeting.split()[1].encode()
    assert received["ip"] == source.encode()
    assert received["me"] == ME.encode()
    assert received["protocol"] == protocol
    stamp = parsedate_to_datetime(received["date"].decode())
    if stamp.tzinfo is None:  # "-0000": UTC, with no claim about the local zone
        stamp = stamp.replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 120


@pytest.mark.parametrize("helo", ["evil) (10.9.8.7", "evil\rX-Injected: yes"])
def test_helo_text_cannot_forge_the_received_header(mx, helo):
    marker = unique("forged")
    assert QUEUED.fullmatch(send(mx, "forger@remote.test", [ALICE], f"Subject: {marker}\n\nhi\n".encode(),
                                 helo=f"HELO {helo}"))
    stored = mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode())
    first_line = delivered_parts(stored, "forger@remote.test", ALICE)[0].group(0).split(b"\n")[0]
    assert re.fullmatch(rb"Received: from unknown \(HELO [A-Za-z0-9.@%+/=:?-]*\) \(127\.0\.0\.1\)", first_line), \
        first_line


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

def test_message_acknowledged_before_kill_9_is_delivered_after_restart(start_server, dead_port):
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
    sink = FakeSMTP()
    try:
        home.control("smtproutes", f"remote.test:127.0.0.1:{sink.port}\n")
        server.wait_for_log("reloaded control/smtproutes")
        home.qtwist("queue", "flush")
        delivered = sink.wait_for(marker.encode())
        assert delivered.recipients == [recipient]
        assert delivered.data.endswith(b"\r\nkeep me\r\n")
        wait_until(lambda: home.qstat() == (0, 0), "an empty queue")
    finally:
        sink.close()
