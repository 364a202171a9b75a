"""qmail-smtpd in memory: SMTPServer over StringTransport (tests/support/memory.py),
with the real queue, real vpasswd users, control files and tcp.smtp read by a
ControlWatcher, the real login flow and plugins, and a task.Clock for time.

What a client sees is asserted reply by reply; what the queue holds, byte by
byte (the queue stores LF line ends, with the Received: line first).  What
only a real twistd shows (kill -9, socket buffers, the watcher's own polling,
TLS) is in tests/blackbox/test_smtpd.py and tests/blackbox/test_auth.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import re
import shutil
import tempfile
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from qtwist.hooks import (
    CONTINUE,
    Answer,
    Hooks,
    Plugin,
    accept,
    add_headers,
    defer,
    disconnect,
    reject,
)
from qtwist.login import MAX_DELAY
from qtwist.smtpd import (
    BareLF,
    DataReader,
    parse_address,
    parse_parameters,
    received_header,
    too_many_hops,
    unstuff,
)
from qtwist.users import NO_RELAY, NO_SMTP, UserDB
from tests.support.home import DOMAIN, ME, PASSWORD, make_home, set_flags
from tests.support.memory import MemoryHome, SMTPClient, SMTPRig, wait_for
from tests.support.smtpclient import client_hello, wire

ALICE = f"alice@{DOMAIN}"  # the clear-text vpasswd field is kept: every mechanism
BOB = f"bob@{DOMAIN}"      # a hash only: no CRAM-MD5
NOW = 1_800_000_000        # the rig's clock at the start

OK = b"250 ok"
GO_AHEAD = b"354 go ahead"
FLUSHED = b"250 flushed"
UNIMPLEMENTED = b"502 unimplemented (#5.5.1)"
MAIL_FIRST = b"503 MAIL first (#5.5.1)"
RCPT_FIRST = b"503 RCPT first (#5.5.1)"
SYNTAX = b"501 syntax error in parameters (#5.5.4)"
REPLY_RCPTHOSTS = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
REPLY_BADMAILFROM = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)"
REPLY_BADRCPTTO = b"553 sorry, your envelope recipient is in my badrcptto list (#5.7.1)"
REPLY_SIZE = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)"
REPLY_BARE_LF = b"451 See http://pobox.com/~djb/docs/smtplf.html."
REPLY_LOOPING = b"554 too many hops, this message is looping (#5.4.6)"
REPLY_TIMEOUT = b"451 timeout (#4.4.2)"
REPLY_AUTH_OK = b"235 ok, go ahead (#2.0.0)"
REPLY_AUTH_FAILED = b"535 authentication failed (#5.7.1)"
REPLY_AUTH_BLOCKED = b"454 too many failed authentications, try again later (#4.7.0)"
REPLY_AUTH_UNAVAILABLE = b"454 temporary authentication failure, try again later (#4.7.0)"
REPLY_AUTH_NEEDS_TLS = b"538 auth not available without TLS (#5.3.3)"
REPLY_AUTH_REQUIRED = b"530 Authorization required (#5.7.1)"
REPLY_CANCELLED = b"501 auth exchange cancelled (#5.0.0)"
REPLY_MALFORMED = b"501 malformed auth input (#5.5.4)"
REPLY_PLUGIN_TROUBLE = b"451 temporary failure in a plugin, try again later (#4.3.0)"
GREETING = f"220 {ME} ESMTP".encode()
HELO_REPLY = f"250 {ME}".encode()
QUIT_REPLY = f"221 {ME}".encode()
QUEUED = re.compile(rb"250 ok (\d+) qp (\d+)")
RECEIVED = re.compile(
    rb"Received: from unknown \(HELO (?P<helo>[^\n]*)\) \((?:(?P<user>[^()\s]+)@)?(?P<ip>[^()\s@]+)\)\n"
    rb"  by (?P<me>[^ \n]+) with (?P<protocol>[A-Z]+); (?P<date>[^\n]+)\n")


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(authcid: str, password: str = PASSWORD, authzid: str = "") -> str:
    """SASL PLAIN's response (RFC 4616), in base64."""
    return b64(f"{authzid}\0{authcid}\0{password}")


def cram_answer(challenge_line: bytes, user: str, password: str = PASSWORD) -> str:
    """The answer to a ``334 <base64 challenge>`` line (RFC 2195)."""
    challenge = base64.b64decode(challenge_line[4:])
    return b64(f"{user} {hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()}")


def envelope(sender: str, *recipients: str) -> list[str]:
    return [f"MAIL FROM:<{sender}>", *[f"RCPT TO:<{recipient}>" for recipient in recipients], "DATA"]


def commands(*lines: str) -> bytes:
    """Command lines as one write."""
    return "".join(f"{line}\r\n" for line in lines).encode("latin-1")


def transaction(sender: str, recipients: tuple[str, ...], message: bytes) -> bytes:
    """A whole transaction as one write: envelope, DATA, the message and its final dot."""
    return commands(*envelope(sender, *recipients)) + wire(message) + b".\r\n"


def hops_message(received: int, delivered_to: int = 0) -> bytes:
    trace = [f"Received: from hop{n}.example.net by relay{n}.example.net; 1 Jan 2026 00:00:00 -0000\n"
             for n in range(received)]
    trace += [f"Delivered-To: list{n}@example.net\n" for n in range(delivered_to)]
    return ("".join(trace) + "Subject: loop?\n\nReceived: in the body does not count\n").encode()



# -- parse_address: qmail-smtpd's addrparse() ----------------------------------------------------------

@pytest.mark.parametrize("argument, expected", [
    ("<alice@example.test>", ("alice@example.test", "")),
    ("  <alice@example.test>  SIZE=100 BODY=8BITMIME", ("alice@example.test", "SIZE=100 BODY=8BITMIME")),
    ("<>", ("", "")),
    ('<"john.doe"@example.test>', ("john.doe@example.test", "")),
    ('<"quoted"."parts"@example.test>', ("quoted.parts@example.test", "")),
    (r'<a\"b@example.test>', ('a"b@example.test', "")),
    (r"<a\\b@example.test>", (r"a\b@example.test", "")),
    ("<@a.test,@b.test:x@y.test>", ("x@y.test", "")),
    ("<@a.test:x@y.test>", ("x@y.test", "")),
    ("alice@example.test", ("alice@example.test", "")),
    ("alice@example.test SIZE=5", ("alice@example.test", "SIZE=5")),
    ('"alice"@example.test', ("alice@example.test", "")),
    ("@a.test,@b.test:x@y.test", ("x@y.test", "")),
])
def test_parse_address_takes_the_address_and_the_text_after_it(argument, expected):
    assert parse_address(argument) == expected


@pytest.mark.parametrize("argument", [
    "<alice@example.test",     # no closing bracket
    "<a<b@example.test>",
    "<a b@example.test>",
    '<"a>b"@example.test>',     # a quoted '>' leaves a '>' in the address
    "<a\tb@example.test>",
])
def test_parse_address_gives_none_for_junk(argument):
    assert parse_address(argument) is None


# -- parse_parameters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("", {}),
    ("SIZE=1000", {"SIZE": "1000"}),
    ("size=1000 body=8BITMIME", {"SIZE": "1000", "BODY": "8BITMIME"}),
    ("  SIZE=1   SMTPUTF8 ", {"SIZE": "1", "SMTPUTF8": ""}),
    ("AUTH=<> X=a=b", {"AUTH": "<>", "X": "a=b"}),
])
def test_parse_parameters_uppercases_keywords_and_keeps_values(text, expected):
    assert parse_parameters(text) == expected


# -- received_header ------------------------------------------------------------------------------------

def test_received_header_is_qmails_two_lines_with_a_minus_zero_date():
    header = received_header("client.example.test", "192.0.2.1", ME, "ESMTP", NOW)
    assert header == (b"Received: from unknown (HELO client.example.test) (192.0.2.1)\n"
                      b"  by mx.example.test with ESMTP; Fri, 15 Jan 2027 08:00:00 -0000\n")


def test_received_header_names_the_user_and_the_cipher():
    header = received_header("c", "192.0.2.1", ME, "ESMTPSA", NOW, cipher="TLSv1.3:TLS_AES_256_GCM_SHA384",
                             user=ALICE)
    assert header.startswith(b"Received: from unknown (HELO c) (alice@example.test@192.0.2.1)\n"
                             b"  by mx.example.test with (TLSv1.3:TLS_AES_256_GCM_SHA384 encrypted) ESMTPSA; ")


@pytest.mark.parametrize("helo, shown", [
    ("evil) (10.9.8.7", b"evil???10.9.8.7"),
    ("evil\rX-Injected: yes", b"evil?X-Injected:?yes"),
    ("a\nb", b"a?b"),
    ("caf\u00e9", b"caf?"),
    ("", b"unknown"),
])
def test_received_header_makes_the_helo_name_safe(helo, shown):
    first_line = received_header(helo, "192.0.2.1", ME, "SMTP", NOW).split(b"\n")[0]
    assert first_line == b"Received: from unknown (HELO " + shown + b") (192.0.2.1)"


# -- unstuff ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, message", [
    (b"", b""),
    (b"a\r\nb\r\n", b"a\nb\n"),
    (b"..leading\r\n", b".leading\n"),
    (b"x\r\n..\r\n...three\r\n .kept\r\n", b"x\n.\n..three\n .kept\n"),
    (b"bare\rcr\r\n", b"bare\rcr\n"),
    (b"no line end", b"no line end"),
])
def test_unstuff_removes_one_leading_dot_per_line_and_ends_lines_with_lf(raw, message):
    assert unstuff(raw) == message


# -- too_many_hops ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("received, delivered_to, looping", [
    (99, 0, False),
    (100, 0, True),
    (50, 50, True),
    (49, 50, False),
    (150, 0, True),
])
def test_too_many_hops_counts_received_and_delivered_to_in_the_header(received, delivered_to, looping):
    assert too_many_hops(hops_message(received, delivered_to)) is looping


def test_too_many_hops_ignores_the_body_and_other_headers():
    body = b"Received: quoted in the body\n" * 200
    assert not too_many_hops(b"Subject: x\n\n" + body)
    assert not too_many_hops(b"X-Received: elsewhere\n" * 150 + b"\n")
    assert too_many_hops(b"RECEIVED: shouting\n" * 100)  # a header without a body


# -- DataReader: DATA's framing ---------------------------------------------------------------------------

def test_data_reader_finds_a_terminator_split_across_reads():
    reader = DataReader(0)
    for chunk in (b"Subject: x\r\n\r\nbody\r", b"\n", b".", b"\r", b"\nQUIT\r\n"):
        assert reader.end() is None
        reader.feed(chunk)
    assert reader.end() == (b"Subject: x\r\n\r\nbody\r\n", b"QUIT\r\n")
    assert not reader.overflow


def test_data_reader_ends_a_message_that_is_only_a_dot():
    reader = DataReader(0)
    reader.feed(b".\r\nNOOP\r\n")
    assert reader.end() == (b"", b"NOOP\r\n")


def test_data_reader_keeps_dots_for_unstuff():
    reader = DataReader(0)
    reader.feed(b"..\r\n.x\r\n.\r\n")
    assert reader.end() == (b"..\r\n.x\r\n", b"")


@pytest.mark.parametrize("chunks", [
    [b"Subject: x\n"],                          # at once, long before any end
    [b"Subject: x\r\n", b"\nbody\r\n"],         # an LF at the start of a read
    [b"ok\r\n", b"line\n.\n"],                  # an LF-only client's "end"
    [b"fine\r\n", b"then\r\r\n", b"bare\nLF\r\n.\r\n"],
])
def test_data_reader_raises_bare_lf_as_soon_as_one_arrives(chunks):
    reader = DataReader(0)
    for chunk in chunks[:-1]:
        reader.feed(chunk)
        assert reader.end() is None
    reader.feed(chunks[-1])
    with pytest.raises(BareLF):
        reader.end()


def test_data_reader_ignores_bare_lf_after_the_terminator():
    reader = DataReader(0)
    reader.feed(b"body\r\n.\r\nNOOP\n")
    assert reader.end() == (b"body\r\n", b"NOOP\n")


def test_data_reader_past_its_limit_keeps_only_the_tail_and_notes_the_overflow():
    limit = 2 * 1000 + 65536
    reader = DataReader(1000)
    line = b"y" * 98 + b"\r\n"
    for _ in range(2000):  # 200,000 bytes
        reader.feed(line)
        assert reader.end() is None
        assert len(reader.data) <= limit
    assert reader.overflow
    reader.feed(line + b".\r\nNOOP\r\n")
    raw, after = reader.end()
    assert len(raw) <= limit and raw.endswith(line) and after == b"NOOP\r\n"
    assert reader.overflow


def test_data_reader_finds_a_terminator_cut_in_two_by_the_overflow():
    reader = DataReader(1000)
    reader.feed(b"y" * 100_000 + b"\r\n.\r")
    assert reader.end() is None and reader.overflow
    reader.feed(b"\nNOOP\r\n")
    assert reader.end() == (b"", b"NOOP\r\n")


def test_data_reader_under_its_limit_keeps_everything():
    reader = DataReader(1000)
    message = b"y" * 98 + b"\r\n"
    reader.feed(message * 600)
    assert reader.end() is None
    reader.feed(b".\r\n")
    assert reader.end() == (message * 600, b"")
    assert not reader.overflow


# -- sessions ----------------------------------------------------------------------------------------------

class SMTPTestCase(TestCase):
    """A home (alice with her clear-text password kept, bob without) and its SMTP server."""

    submission = False

    def setUp(self) -> None:
        path = Path(tempfile.mkdtemp(prefix="qtwist-smtpd-"))
        self.addCleanup(shutil.rmtree, path, True)
        make_home(path)
        UserDB(path).set_password(ALICE, PASSWORD, cleartext=True)
        self.home = MemoryHome(path)
        self.rig = self.make_rig()

    def make_rig(self) -> SMTPRig:
        rig = SMTPRig(self.home, submission=self.submission)
        self.addCleanup(rig.close)
        return rig

    # -- setting up ---------------------------------------------------------------------------

    def control(self, name: str, text: str) -> None:
        """Write a control file; sessions that begin after this see it."""
        (self.home.path / "control" / name).write_text(text)
        self.home.reload()

    def tcp_smtp(self, text: str) -> None:
        (self.home.path / "tcp.smtp").write_text(text)
        self.home.reload()

    # -- talking ------------------------------------------------------------------------------

    async def ehloed(self, ip: str = "127.0.0.1", helo: str = "EHLO client.example.test") -> SMTPClient:
        client = await self.rig.greeted(ip)
        (reply,) = await client.ask(helo)
        self.assertTrue(reply.startswith(b"250"), reply)
        return client

    async def send_message(self, client: SMTPClient, message: bytes, sender: str = "someone@remote.test",
                           recipients: tuple[str, ...] = (ALICE,)) -> bytes:
        """One transaction in one write; the reply to the message."""
        client.send(transaction(sender, recipients, message))
        replies = await client.wait(len(recipients) + 3)
        self.assertEqual(replies[:-1], [OK] * (len(recipients) + 1) + [GO_AHEAD])
        return replies[-1]

    async def deliver(self, message: bytes, sender: str = "someone@remote.test",
                      recipients: tuple[str, ...] = (ALICE,), **session) -> bytes:
        """A new session sends one message; the reply to it."""
        return await self.send_message(await self.ehloed(**session), message, sender, recipients)

    def stored(self, index: int = -1) -> tuple[re.Match, bytes]:
        """A queued message: its Received: line and the message as the client sent it."""
        body = self.rig.queued[index].read_body()
        received = RECEIVED.match(body)
        self.assertIsNotNone(received, body[:300])
        return received, body[received.end():]

    def recipients(self, index: int = -1) -> list[str]:
        return [recipient.address for recipient in self.rig.queued[index].recipients]

    async def held_back(self, client: SMTPClient, *lines: str) -> list[bytes]:
        """Send an AUTH exchange with wrong credentials: its challenges come at
        once (returned), its verdict only after the throttle's delay on the clock."""
        clock = self.home.clock
        pending = len(clock.getDelayedCalls())
        client.send(commands(*lines))
        challenges = await client.wait(len(lines) - 1)
        await wait_for(lambda: len(clock.getDelayedCalls()) > pending or client.output[client.read:],
                       "the failed-login throttle to delay the answer")
        self.assertEqual(client.output[client.read:], b"", "answered without the throttle's delay")
        return challenges

    async def refused_late(self, client: SMTPClient, *lines: str) -> bytes:
        """The verdict on wrong credentials, once the throttle's delay has passed."""
        await self.held_back(client, *lines)
        self.home.clock.advance(MAX_DELAY)
        (reply,) = await client.wait(1)
        return reply


class CommandTests(SMTPTestCase):

    async def test_greeting_names_me(self) -> None:
        client = self.rig.connect()
        self.assertEqual(await client.wait(1), [GREETING])

    async def test_smtpgreeting_replaces_me_in_the_greeting_only(self) -> None:
        self.control("smtpgreeting", "mail.example.test welcome\n")
        client = self.rig.connect()
        self.assertEqual(await client.wait(1), [b"220 mail.example.test welcome ESMTP"])
        self.assertEqual(await client.ask("HELO c"), [HELO_REPLY])

    async def test_ehlo_lists_pipelining_8bitmime_auth_and_size_but_no_starttls(self) -> None:
        self.control("databytes", "10000000\n")
        client = await self.rig.greeted()
        (reply,) = await client.ask("EHLO client.example.test")
        self.assertEqual(reply.split(b"\r\n"), [
            f"250-{ME}".encode(), b"250-PIPELINING", b"250-8BITMIME",
            b"250-AUTH LOGIN CRAM-MD5 PLAIN", b"250-AUTH=LOGIN CRAM-MD5 PLAIN", b"250 SIZE 10000000"])
        self.assertEqual(await client.ask("STARTTLS"), [b"454 TLS not available (#4.3.0)"])

    async def test_ehlo_says_size_alone_when_databytes_is_unlimited(self) -> None:
        client = await self.rig.greeted()
        (reply,) = await client.ask("EHLO c")
        self.assertEqual(reply.split(b"\r\n")[-1], b"250 SIZE")

    async def test_helo_answers_with_me(self) -> None:
        client = await self.rig.greeted()
        self.assertEqual(await client.ask("HELO client.example.test"), [HELO_REPLY])

    async def test_noop_rset_vrfy_help_and_quit(self) -> None:
        client = await self.rig.greeted()
        noop, rset, vrfy, help_reply = await client.ask("NOOP", "RSET", f"VRFY {ALICE}", "HELP")
        self.assertEqual((noop, rset, vrfy), (OK, FLUSHED, b"252 send some mail, i'll try my best"))
        self.assertTrue(help_reply.startswith(b"214 "), help_reply)
        self.assertEqual(await client.ask("QUIT"), [QUIT_REPLY])
        self.assertTrue(client.closed)

    async def test_unknown_commands_get_502_and_the_session_goes_on(self) -> None:
        client = await self.rig.greeted()
        replies = await client.ask("FOO bar", "EXPN staff", "BDAT 10 LAST", "TURN", "", "NOOP")
        self.assertEqual(replies, [UNIMPLEMENTED] * 5 + [OK])

    async def test_commands_are_case_insensitive(self) -> None:
        client = await self.rig.greeted()
        replies = await client.ask("helo c", "mail from:<someone@remote.test>", f"rcpt to:<{ALICE}>", "rSeT",
                                   "noop")
        self.assertEqual(replies, [HELO_REPLY, OK, OK, FLUSHED, OK])

    async def test_commands_out_of_order_get_503(self) -> None:
        client = await self.rig.greeted()
        replies = await client.ask("HELO c", f"RCPT TO:<{ALICE}>", "DATA", "MAIL FROM:<someone@remote.test>",
                                   "DATA", "RSET", f"RCPT TO:<{ALICE}>")
        self.assertEqual(replies[1:], [MAIL_FIRST, MAIL_FIRST, OK, RCPT_FIRST, FLUSHED, MAIL_FIRST])

    async def test_helo_and_ehlo_end_a_transaction(self) -> None:
        client = await self.rig.greeted()
        replies = await client.ask("MAIL FROM:<someone@remote.test>", "EHLO again", f"RCPT TO:<{ALICE}>")
        self.assertEqual(replies[2], MAIL_FIRST)

    async def test_mail_and_rcpt_syntax_errors_get_501(self) -> None:
        client = await self.ehloed()
        replies = await client.ask("MAIL alice@remote.test", "MAIL FROM:<a b@remote.test>", "MAIL FROM:<unclosed",
                                   "MAIL FROM:<someone@remote.test>", f"RCPT {ALICE}", "RCPT TO:<>",
                                   "RCPT TO:<a<b@example.test>", f"RCPT TO:<{ALICE}>")
        self.assertEqual(replies, [SYNTAX, b"501 bad address syntax (#5.1.7)", b"501 bad address syntax (#5.1.7)",
                                   OK, SYNTAX, b"501 bad address syntax (#5.1.3)",
                                   b"501 bad address syntax (#5.1.3)", OK])

    async def test_mail_and_rcpt_without_brackets_are_understood(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask("MAIL FROM: someone@remote.test", f"RCPT TO:{ALICE}"), [OK, OK])

    async def test_overlong_line_gets_500_and_the_session_goes_on(self) -> None:
        client = await self.rig.greeted()
        replies = await client.ask("NOOP " + "x" * 100_000, "HELO c", "MAIL FROM:<a@remote.test>",
                                   f"RCPT TO:<{ALICE}>")
        self.assertEqual(replies, [b"500 line too long (#5.5.2)", HELO_REPLY, OK, OK])

    async def test_overlong_line_in_pieces_gets_one_500(self) -> None:
        client = await self.rig.greeted()
        for _ in range(10):
            client.send(b"x" * 10_000)
        client.send(b"\r\nNOOP\r\n")
        self.assertEqual(await client.wait(2), [b"500 line too long (#5.5.2)", OK])

    async def test_nul_bytes_in_a_command_get_an_error(self) -> None:
        client = await self.rig.greeted()
        self.assertEqual(await client.ask(b"NO\0OP", b"MAIL\0FROM:<a@remote.test>", "NOOP"),
                         [UNIMPLEMENTED, UNIMPLEMENTED, OK])

    async def test_binary_junk_gets_error_replies_and_the_session_goes_on(self) -> None:
        client = await self.rig.greeted()
        client.send(random.Random(7).randbytes(65536) + b"\r\nNOOP\r\nQUIT\r\n")
        await wait_for(lambda: client.closed, "the session to end")
        replies = client.replies()
        self.assertEqual(replies[-2:], [OK, QUIT_REPLY])
        self.assertTrue(replies[:-2] and all(reply.startswith(b"5") for reply in replies[:-2]), replies)

    async def test_tls_client_hello_on_the_plain_port_gets_error_replies(self) -> None:
        client = await self.rig.greeted()
        client.send(client_hello() + b"\r\nNOOP\r\nQUIT\r\n")
        await wait_for(lambda: client.closed, "the session to end")
        replies = client.replies()
        self.assertEqual(replies[-2:], [OK, QUIT_REPLY])
        self.assertTrue(replies[:-2] and all(reply.startswith(b"5") for reply in replies[:-2]), replies)


class PipeliningTests(SMTPTestCase):

    async def test_a_whole_transaction_in_one_write_gets_its_replies_in_order(self) -> None:
        message = b"Subject: pipelined\n\nhello\n"
        client = self.rig.connect()
        client.send(b"EHLO client.example.test\r\n"
                    + transaction("someone@remote.test", (ALICE, "stranger@remote.test", BOB), message)
                    + b"QUIT\r\n")
        await wait_for(lambda: client.closed, "the session to end")
        replies = client.replies()
        self.assertEqual(replies[0], GREETING)
        self.assertTrue(replies[1].startswith(f"250-{ME}\r\n".encode()), replies[1])
        self.assertEqual(replies[2:7], [OK, OK, REPLY_RCPTHOSTS, OK, GO_AHEAD])
        self.assertRegex(replies[7], QUEUED)
        self.assertEqual(replies[8:], [QUIT_REPLY])
        self.assertEqual(self.recipients(), [ALICE, BOB])
        self.assertEqual(self.stored()[1], message)

    async def test_two_messages_back_to_back_in_one_write(self) -> None:
        client = await self.ehloed()
        client.send(transaction("one@remote.test", (ALICE,), b"Subject: first\n\n1\n")
                    + transaction("two@remote.test", (BOB,), b"Subject: second\n\n2\n") + b"NOOP\r\n")
        replies = await client.wait(9)
        self.assertEqual(replies[:3] + replies[4:7] + replies[8:], [OK, OK, GO_AHEAD] * 2 + [OK])
        ids = [int(QUEUED.fullmatch(replies[index]).group(2)) for index in (3, 7)]
        self.assertEqual(ids, [message.id for message in self.rig.queued])
        self.assertEqual([(m.sender, self.recipients(n)) for n, m in enumerate(self.rig.queued)],
                         [("one@remote.test", [ALICE]), ("two@remote.test", [BOB])])
        self.assertEqual([self.stored(n)[1] for n in (0, 1)], [b"Subject: first\n\n1\n", b"Subject: second\n\n2\n"])

    async def test_large_messages_back_to_back_in_pieces_are_stored_byte_exact(self) -> None:
        rng = random.Random(5)
        messages = []
        for number in range(3):
            lines = ["".join(rng.choices("abcdefghij .", k=rng.randrange(0, 200))) for _ in range(10_000)]
            messages.append(f"Subject: large {number}\n\n".encode() + "\n".join(lines).encode() + b"\n")
        stream = b"".join(transaction("large@remote.test", (BOB,), message) for message in messages) + b"QUIT\r\n"
        client = await self.ehloed()
        position = 0
        while position < len(stream):  # in pieces of any size, as TCP delivers them
            size = rng.randrange(1, 65536)
            client.send(stream[position:position + size])
            position += size
        await wait_for(lambda: client.closed, "the session to end")
        replies = client.replies()
        self.assertEqual(len(replies), 4 * len(messages) + 1)
        for number in range(len(messages)):
            self.assertEqual(replies[4 * number:4 * number + 3], [OK, OK, GO_AHEAD])
            self.assertRegex(replies[4 * number + 3], QUEUED)
        self.assertEqual([self.stored(number)[1] for number in range(len(messages))], messages)

    async def test_a_thousand_pipelined_refused_rcpts_each_get_a_reply(self) -> None:
        client = await self.ehloed()
        refused = [f"RCPT TO:<user{n}@remote{n}.test>" for n in range(1000)]
        replies = await client.ask("MAIL FROM:<many@remote.test>", *refused, "NOOP")
        self.assertEqual(replies, [OK] + [REPLY_RCPTHOSTS] * 1000 + [OK])

    async def test_commands_sent_while_the_queue_writes_are_answered_after_its_250(self) -> None:
        client = await self.ehloed()
        client.send(transaction("someone@remote.test", (ALICE,), b"Subject: x\n\nhi\n"))
        client.send("MAIL FROM:<next@remote.test>\r\n")  # the queue's writer thread has not run yet
        client.send(f"RCPT TO:<{BOB}>\r\nNOOP\r\n")
        replies = await client.wait(7)
        self.assertEqual(replies[:3], [OK, OK, GO_AHEAD])
        self.assertRegex(replies[3], QUEUED)
        self.assertEqual(replies[4:], [OK, OK, OK])

    async def test_a_client_that_keeps_sending_while_the_queue_writes_is_paused_then_answered(self) -> None:
        client = await self.ehloed()
        client.send(transaction("someone@remote.test", (ALICE,), b"Subject: x\n\nhi\n"))
        client.send(b"NOOP\r\n" * 20_000)  # 120 kB while the message is being written
        self.assertEqual(client.transport.producerState, "paused")
        replies = await client.wait(4 + 20_000)
        self.assertRegex(replies[3], QUEUED)
        self.assertEqual(replies[4:], [OK] * 20_000)
        self.assertEqual(client.transport.producerState, "producing")


class PolicyTests(SMTPTestCase):

    async def test_rcpthosts_exact_and_dot_suffix_entries(self) -> None:
        self.control("rcpthosts", f"{DOMAIN}\n.sub.example.net\n")
        recipients = {
            ALICE: OK,
            "someone@EXAMPLE.TEST": OK,
            f"nobody@{DOMAIN}": OK,  # unknown users bounce later, as without chkuser
            "x@a.sub.example.net": OK,
            "x@deep.a.sub.example.net": OK,
            "x@sub.example.net": REPLY_RCPTHOSTS,  # '.sub.example.net' covers subdomains only
            "x@example.net": REPLY_RCPTHOSTS,
            "x@notexample.test": REPLY_RCPTHOSTS,
        }
        client = await self.ehloed()
        replies = await client.ask("MAIL FROM:<someone@remote.test>", *[f"RCPT TO:<{r}>" for r in recipients])
        self.assertEqual(replies[1:], list(recipients.values()))

    async def test_address_tricks_do_not_relay_without_rights(self) -> None:
        tricks = [
            "user@remote.test",
            "user%example.test@remote.test",
            "example.test!user@remote.test",
            "@example.test:user@remote.test",
            "@example.test,@example.test:user@remote.test",
            '"user@example.test"@remote.test',
            "user@example.test@remote.test",
            "user@remote.test.",
            "user@[127.0.0.1]",
        ]
        client = await self.ehloed()
        replies = await client.ask("MAIL FROM:<someone@remote.test>", *[f"RCPT TO:<{t}>" for t in tricks])
        self.assertEqual(replies[1:], [REPLY_RCPTHOSTS] * len(tricks))

    async def test_relayclient_from_tcp_smtp_allows_relaying(self) -> None:
        self.tcp_smtp('127.0.0.2:allow,RELAYCLIENT=""\n:allow\n')
        stranger = await self.ehloed("127.0.0.1")
        self.assertEqual((await stranger.ask("MAIL FROM:<a@remote.test>", "RCPT TO:<friend@remote.test>"))[1],
                         REPLY_RCPTHOSTS)
        reply = await self.deliver(b"Subject: relayed\n\nhi\n", ALICE, ("friend@remote.test",), ip="127.0.0.2")
        self.assertRegex(reply, QUEUED)
        self.assertEqual(self.recipients(), ["friend@remote.test"])

    async def test_relayclient_value_is_appended_to_each_recipient(self) -> None:
        self.tcp_smtp('127.0.0.2:allow,RELAYCLIENT=".relay.test"\n')
        reply = await self.deliver(b"Subject: x\n\nhi\n", ALICE, ("friend@remote.test", ALICE), ip="127.0.0.2")
        self.assertRegex(reply, QUEUED)
        self.assertEqual(self.recipients(), ["friend@remote.test.relay.test", f"{ALICE}.relay.test"])

    async def test_tcp_smtp_rules_match_an_ipv4_mapped_ipv6_client(self) -> None:
        self.tcp_smtp('127.0.0.2:allow,RELAYCLIENT=""\n')
        client = await self.ehloed("::ffff:127.0.0.2")
        self.assertEqual(await client.ask("MAIL FROM:<a@remote.test>", "RCPT TO:<friend@remote.test>"), [OK, OK])

    async def test_deny_rule_closes_before_the_greeting(self) -> None:
        self.tcp_smtp("127.0.0.3:deny\n:allow\n")
        client = self.rig.connect("127.0.0.3")
        self.assertTrue(client.closed)
        self.assertEqual(client.output, b"")
        self.assertEqual(await self.rig.connect("127.0.0.4").wait(1), [GREETING])

    async def test_databytes_from_tcp_smtp_overrides_the_control_file(self) -> None:
        self.control("databytes", "10000\n")
        self.tcp_smtp('127.0.0.4:allow,DATABYTES="1000"\n:allow\n')
        small = await self.rig.greeted("127.0.0.4")
        self.assertEqual((await small.ask("EHLO c"))[0].split(b"\r\n")[-1], b"250 SIZE 1000")
        self.assertEqual(await small.ask("MAIL FROM:<a@remote.test> SIZE=1001"), [REPLY_SIZE])
        other = await self.rig.greeted("127.0.0.5")
        self.assertEqual((await other.ask("EHLO c"))[0].split(b"\r\n")[-1], b"250 SIZE 10000")
        self.assertEqual(await other.ask("MAIL FROM:<a@remote.test> SIZE=1001"), [OK])

    async def test_size_over_databytes_is_refused_at_mail(self) -> None:
        self.control("databytes", "1000\n")
        client = await self.ehloed()
        replies = await client.ask("MAIL FROM:<big@remote.test> SIZE=1001", "MAIL FROM:<big@remote.test> SIZE=1000",
                                   f"RCPT TO:<{ALICE}>")
        self.assertEqual(replies, [REPLY_SIZE, OK, OK])

    async def test_a_message_over_databytes_gets_552_is_not_queued_and_the_session_goes_on(self) -> None:
        self.control("databytes", "1000\n")
        client = await self.ehloed()
        head = b"Subject: big\n\n"
        too_big = head + b"y" * (1000 - len(head)) + b"\n"  # 1001 bytes with LF line ends
        self.assertEqual(await self.send_message(client, too_big), REPLY_SIZE)
        self.assertEqual(self.rig.queued, [])
        self.assertRegex(await self.send_message(client, too_big[:-2] + b"\n"), QUEUED)  # 1000 bytes fit

    async def test_a_message_far_past_the_data_buffer_gets_552_and_the_session_goes_on(self) -> None:
        self.control("databytes", "1000\n")
        client = await self.ehloed()
        self.assertEqual(await client.ask(*envelope("big@remote.test", ALICE)), [OK, OK, GO_AHEAD])
        for _ in range(2000):  # 200 kB, sent as a client sends: in pieces
            client.send(b"y" * 98 + b"\r\n")
        client.send(b".\r\nNOOP\r\n")
        self.assertEqual(await client.wait(2), [REPLY_SIZE, OK])
        self.assertEqual(self.rig.queued, [])

    async def test_badmailfrom_addresses_and_domains_are_refused_at_rcpt(self) -> None:
        self.control("badmailfrom", "spammer@bad.test\n@evil.test\n")
        client = await self.ehloed()
        for sender in ("spammer@bad.test", "SPAMMER@Bad.Test", "anyone@evil.test"):
            replies = await client.ask(f"MAIL FROM:<{sender}>", f"RCPT TO:<{ALICE}>", f"RCPT TO:<{BOB}>", "DATA")
            self.assertEqual(replies, [OK, REPLY_BADMAILFROM, REPLY_BADMAILFROM, RCPT_FIRST])

    async def test_badmailfrom_matches_whole_addresses_and_whole_domains_only(self) -> None:
        self.control("badmailfrom", "spammer@bad.test\n@evil.test\n")
        client = await self.ehloed()
        replies = await client.ask("MAIL FROM:<anyone@notevil.test>", f"RCPT TO:<{ALICE}>",
                                   "MAIL FROM:<other@bad.test>", f"RCPT TO:<{ALICE}>")
        self.assertEqual(replies, [OK] * 4)

    async def test_badrcptto_refuses_that_recipient_only(self) -> None:
        self.control("badrcptto", f"blocked@{DOMAIN}\n")
        client = await self.ehloed()
        replies = await client.ask("MAIL FROM:<someone@remote.test>", f"RCPT TO:<blocked@{DOMAIN}>",
                                   f"RCPT TO:<BLOCKED@{DOMAIN.upper()}>", f"RCPT TO:<{ALICE}>")
        self.assertEqual(replies, [OK, REPLY_BADRCPTTO, REPLY_BADRCPTTO, OK])

    async def test_bare_postmaster_is_accepted_for_envnoathost(self) -> None:
        self.assertRegex(await self.deliver(b"Subject: hi\n\nhello\n", recipients=("postmaster",)), QUEUED)
        self.assertEqual(self.recipients(), [f"postmaster@{ME}"])

    async def test_the_thousand_and_first_recipient_gets_452(self) -> None:
        client = await self.ehloed()
        recipients = [f"RCPT TO:<user{n}@{DOMAIN}>" for n in range(1001)]
        replies = await client.ask("MAIL FROM:<many@remote.test>", *recipients)
        self.assertEqual(replies[1:], [OK] * 1000 + [b"452 too many recipients (#4.5.3)"])


class DataTests(SMTPTestCase):

    async def test_dots_and_eight_bit_bytes_are_stored_byte_exact(self) -> None:
        message = (b"Subject: transparency\n\n"
                   b".leading dot\n"
                   b".\n"
                   b"..\n"
                   b"...more dots\n"
                   b" .\n"
                   b"\n"
                   + bytes(range(0x80, 0x100)) + b"\n"
                   + "caf\u00e9 \u00fcber\n".encode()
                   + b"before\0after\n"
                   + b"last line\n")
        self.assertRegex(await self.deliver(message), QUEUED)
        self.assertEqual(self.stored()[1], message)

    async def test_a_first_line_starting_with_a_dot_is_kept(self) -> None:
        message = b".begins the message\n\nbody\n"
        self.assertRegex(await self.deliver(message), QUEUED)
        self.assertEqual(self.stored()[1], message)

    async def test_bare_cr_is_kept_as_qmail_keeps_it(self) -> None:
        message = b"Subject: cr\n\nover\rwritten\n"
        self.assertRegex(await self.deliver(message), QUEUED)
        self.assertEqual(self.stored()[1], message)

    async def test_empty_message_is_queued(self) -> None:
        self.assertRegex(await self.deliver(b""), QUEUED)
        self.assertEqual(self.stored()[1], b"")

    async def test_header_only_message_is_stored_byte_exact(self) -> None:
        message = b"Subject: headers only\nX-Empty-Body: yes\n"
        self.assertRegex(await self.deliver(message), QUEUED)
        self.assertEqual(self.stored()[1], message)

    async def test_null_sender_is_accepted_and_kept(self) -> None:
        self.assertRegex(await self.deliver(b"Subject: failure notice\n\nbounce\n", sender=""), QUEUED)
        self.assertEqual(self.rig.queued[0].sender, "")

    async def test_the_250_names_the_queued_message(self) -> None:
        reply = await self.deliver(b"Subject: x\n\nhi\n")
        (queued,) = self.rig.queued
        self.assertEqual(reply, f"250 ok {NOW} qp {queued.id}".encode())
        self.assertEqual(int(queued.born), NOW)

    async def test_bare_lf_in_data_gets_451_and_nothing_is_queued(self) -> None:
        client = await self.ehloed()
        # If "\n.\n" ended the data, MAIL below would be a command and get its own reply.
        client.send(commands(*envelope("lf@remote.test", ALICE))
                    + b"Subject: lf\r\n\r\nfirst\n.\nMAIL FROM:<again@remote.test>\r\n.\r\n")
        await wait_for(lambda: client.closed, "the session to end")
        self.assertEqual(client.replies(), [OK, OK, GO_AHEAD, REPLY_BARE_LF])
        self.assertEqual(self.rig.queued, [])

    async def test_bare_lf_gets_451_at_once_without_an_end_of_data(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask(*envelope("lf@remote.test", ALICE)), [OK, OK, GO_AHEAD])
        client.send(b"Subject: lf\n")
        self.assertEqual(client.replies(), [REPLY_BARE_LF])
        self.assertTrue(client.closed)
        self.assertEqual(self.rig.queued, [])

    async def test_a_hundred_hops_are_refused_as_looping(self) -> None:
        client = await self.ehloed()
        for received, delivered_to in ((100, 0), (50, 50)):
            self.assertEqual(await self.send_message(client, hops_message(received, delivered_to)), REPLY_LOOPING)
        self.assertEqual(self.rig.queued, [])

    async def test_ninety_nine_hops_are_accepted(self) -> None:
        message = hops_message(99)
        self.assertRegex(await self.deliver(message), QUEUED)
        self.assertEqual(self.stored()[1], message)

    async def test_a_client_vanishing_mid_data_leaves_nothing_queued(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask(*envelope("gone@remote.test", ALICE)), [OK, OK, GO_AHEAD])
        client.send(b"Subject: half\r\n\r\n" + b"half a message\r\n" * 5000)
        client.hang_up()
        self.assertEqual(self.rig.queued, [])

    async def test_a_client_gone_while_its_message_is_queued_gets_no_more_answers(self) -> None:
        """Twisted keeps the transport of a lost connection: the QUIT pipelined
        behind the message must not be answered (over TLS that raised)."""
        client = await self.ehloed()
        self.assertEqual(await client.ask(*envelope("gone@remote.test", ALICE)), [OK, OK, GO_AHEAD])
        client.send(b"Subject: gone\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        client.hang_up()
        said = len(client.output)
        await wait_for(lambda: self.rig.queued, "the message to be queued")
        self.assertEqual(client.output[said:], b"")


class ReceivedHeaderTests(SMTPTestCase):

    async def test_received_names_helo_client_me_protocol_and_date(self) -> None:
        self.tcp_smtp('127.0.0.2:allow,RELAYCLIENT=""\n:allow\n')
        for greeting, ip, protocol in (("EHLO client.example.test", "127.0.0.1", b"ESMTP"),
                                       ("HELO old.example.test", "127.0.0.2", b"SMTP")):
            self.assertRegex(await self.deliver(b"Subject: x\n\nhi\n", helo=greeting, ip=ip), QUEUED)
            received, _ = self.stored()
            self.assertEqual((received["helo"], received["user"], received["ip"], received["me"],
                              received["protocol"]),
                             (greeting.split()[1].encode(), None, ip.encode(), ME.encode(), protocol))
            self.assertEqual(parsedate_to_datetime(received["date"].decode()).timestamp(), NOW)

    async def test_an_ipv4_mapped_ipv6_client_is_named_by_its_ipv4_address(self) -> None:
        self.assertRegex(await self.deliver(b"Subject: x\n\nhi\n", ip="::ffff:127.0.0.2"), QUEUED)
        self.assertEqual(self.stored()[0]["ip"], b"127.0.0.2")

    async def test_an_ipv6_client_is_named_by_its_address(self) -> None:
        self.assertRegex(await self.deliver(b"Subject: x\n\nhi\n", ip="2001:db8::7"), QUEUED)
        self.assertEqual(self.stored()[0]["ip"], b"2001:db8::7")

    async def test_helo_text_cannot_forge_the_received_header(self) -> None:
        for helo in ("evil) (10.9.8.7", "evil\rX-Injected: yes"):
            self.assertRegex(await self.deliver(b"Subject: x\n\nhi\n", helo=f"HELO {helo}"), QUEUED)
            first_line = self.stored()[0].group(0).split(b"\n")[0]
            self.assertRegex(first_line, rb"\AReceived: from unknown \(HELO [A-Za-z0-9.@%+/=:?-]*\) \(127\.0\.0\.1\)\Z")


class FlowControlAndTimeoutTests(SMTPTestCase):

    async def test_a_client_that_reads_no_replies_is_not_read_until_it_does(self) -> None:
        client = await self.rig.greeted()
        client.protocol.pauseProducing()  # what the transport does when its write buffer is full
        self.assertEqual(client.transport.producerState, "paused")
        client.send("NOOP\r\n" * 3)
        self.assertEqual(client.replies(), [])
        client.protocol.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(client.replies(), [OK] * 3)
        self.assertEqual(await client.ask("HELO c"), [HELO_REPLY])

    async def test_an_idle_client_gets_451_timeout_and_is_closed(self) -> None:
        self.control("timeoutsmtpd", "60\n")
        client = await self.ehloed()
        self.home.clock.advance(59)
        self.assertEqual(await client.ask("NOOP"), [OK])  # any input restarts the count
        self.home.clock.advance(59)
        self.assertFalse(client.closed)
        self.home.clock.advance(1)
        self.assertEqual(client.replies(), [REPLY_TIMEOUT])
        self.assertTrue(client.closed)

    async def test_a_client_silent_in_the_middle_of_its_message_is_timed_out_and_nothing_queued(self) -> None:
        self.control("timeoutsmtpd", "60\n")
        client = await self.ehloed()
        self.assertEqual(await client.ask(*envelope("slow@remote.test", ALICE)), [OK, OK, GO_AHEAD])
        client.send(b"Subject: stalled\r\n\r\nand then nothing")
        self.home.clock.advance(60)
        self.assertEqual(client.replies(), [REPLY_TIMEOUT])
        self.assertTrue(client.closed)
        self.assertEqual(self.rig.queued, [])

    async def test_a_session_waiting_on_the_queue_is_not_timed_out(self) -> None:
        self.control("timeoutsmtpd", "60\n")
        client = await self.ehloed()
        client.send(transaction("someone@remote.test", (ALICE,), b"Subject: x\n\nhi\n"))
        self.home.clock.advance(120)  # the queue's writer thread has not run yet
        replies = await client.wait(4)
        self.assertRegex(replies[3], QUEUED)
        self.assertFalse(client.closed)
        self.assertEqual(await client.ask("NOOP"), [OK])


class StoreDown(Exception):
    """The user database cannot be reached."""


class SwitchableUserDB(UserDB):
    """A user store that can be taken down (a database outage) and brought back."""

    down = False

    def authenticate(self, address: str, password: str):
        if self.down:
            raise StoreDown("the user database is down")
        return super().authenticate(address, password)


class AuthTests(SMTPTestCase):

    def make_rig(self) -> SMTPRig:
        self.users = SwitchableUserDB(self.home.path)
        rig = SMTPRig(self.home, users=self.users)
        self.addCleanup(rig.close)
        return rig

    async def relays(self, client: SMTPClient) -> bytes:
        """The reply to a recipient that needs relaying rights (the transaction is reset after)."""
        replies = await client.ask(f"MAIL FROM:<{ALICE}>", "RCPT TO:<friend@remote.test>", "RSET")
        self.assertEqual(replies[0], OK)
        return replies[1]

    # -- the mechanisms -----------------------------------------------------------------------

    async def test_plain_with_an_initial_response(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask(f"AUTH PLAIN {plain(ALICE)}"), [REPLY_AUTH_OK])

    async def test_plain_after_a_334(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask("AUTH PLAIN", plain(ALICE)), [b"334 ", REPLY_AUTH_OK])

    async def test_plain_with_the_users_own_authzid(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask(f"AUTH PLAIN {plain(ALICE, authzid=ALICE)}"), [REPLY_AUTH_OK])

    async def test_login_asks_for_username_then_password(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask("auth login", b64(ALICE), b64(PASSWORD)),
                         [f"334 {b64('Username:')}".encode(), f"334 {b64('Password:')}".encode(), REPLY_AUTH_OK])

    async def test_login_with_the_username_as_initial_response(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask(f"AUTH LOGIN {b64(ALICE)}", b64(PASSWORD)),
                         [f"334 {b64('Password:')}".encode(), REPLY_AUTH_OK])

    async def test_cram_md5_answers_the_challenge(self) -> None:
        client = await self.ehloed()
        (challenge,) = await client.ask("AUTH CRAM-MD5")
        self.assertRegex(base64.b64decode(challenge[4:]), rb"\A<\d+\.\d+@mx\.example\.test>\Z")
        self.assertEqual(await client.ask(cram_answer(challenge, ALICE)), [REPLY_AUTH_OK])

    async def test_cram_md5_needs_the_clear_text_field(self) -> None:
        client = await self.ehloed()
        (challenge,) = await client.ask("AUTH CRAM-MD5")
        self.assertEqual(await self.refused_late(client, cram_answer(challenge, BOB)), REPLY_AUTH_FAILED)
        self.assertEqual(await client.ask(f"AUTH PLAIN {plain(BOB)}"), [REPLY_AUTH_OK])

    # -- what a login changes -----------------------------------------------------------------

    async def test_the_right_password_allows_relaying_and_received_says_esmtpa(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await self.relays(client), REPLY_RCPTHOSTS)
        self.assertEqual(await client.ask(f"AUTH PLAIN {plain(ALICE)}"), [REPLY_AUTH_OK])
        self.assertEqual(await self.relays(client), OK)
        self.assertRegex(await self.send_message(client, b"Subject: x\n\nhi\n", ALICE, ("friend@remote.test",)),
                         QUEUED)
        received, _ = self.stored()
        self.assertEqual((received["protocol"], received["user"], received["ip"]),
                         (b"ESMTPA", ALICE.encode(), b"127.0.0.1"))

    async def test_ehlo_after_auth_offers_no_more_auth(self) -> None:
        client = await self.ehloed()
        await client.ask(f"AUTH PLAIN {plain(ALICE)}")
        (ehlo,) = await client.ask("EHLO c")
        self.assertNotIn(b"AUTH", ehlo)

    async def test_a_wrong_password_gets_535_only_after_the_throttle_delay_and_no_relaying(self) -> None:
        client = await self.ehloed()
        await self.held_back(client, f"AUTH PLAIN {plain(ALICE, 'not ' + PASSWORD)}")
        self.home.clock.advance(0.9)
        self.assertEqual(client.replies(), [])
        self.home.clock.advance(0.1)  # a first failure waits one second
        self.assertEqual(await client.wait(1), [REPLY_AUTH_FAILED])
        self.assertEqual(await self.relays(client), REPLY_RCPTHOSTS)
        self.assertEqual(await client.ask(f"AUTH PLAIN {plain(ALICE)}"), [REPLY_AUTH_OK])

    async def test_wrong_passwords_fail_for_every_mechanism(self) -> None:
        client = await self.ehloed()
        wrong = "not " + PASSWORD
        self.assertEqual(await self.refused_late(client, f"AUTH PLAIN {plain(ALICE, wrong)}"), REPLY_AUTH_FAILED)
        self.assertEqual(await self.refused_late(client, "AUTH LOGIN", b64(ALICE), b64(wrong)), REPLY_AUTH_FAILED)
        (challenge,) = await client.ask("AUTH CRAM-MD5")
        self.assertEqual(await self.refused_late(client, cram_answer(challenge, ALICE, wrong)), REPLY_AUTH_FAILED)
        self.assertEqual(await self.refused_late(client, f"AUTH PLAIN {plain('nobody@example.test')}"),
                         REPLY_AUTH_FAILED)

    async def test_plain_with_an_authzid_naming_someone_else_is_refused(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await self.refused_late(client, f"AUTH PLAIN {plain(ALICE, authzid=BOB)}"),
                         REPLY_AUTH_FAILED)
        self.assertEqual(await self.relays(client), REPLY_RCPTHOSTS)

    # -- exchanges that end without a login ------------------------------------------------------

    async def test_star_cancels_and_the_session_goes_on(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask("AUTH LOGIN", "*"), [f"334 {b64('Username:')}".encode(), REPLY_CANCELLED])
        self.assertEqual((await client.ask("AUTH LOGIN", b64(ALICE), "*"))[2], REPLY_CANCELLED)
        self.assertEqual((await client.ask("AUTH PLAIN", "*"))[1], REPLY_CANCELLED)
        self.assertEqual((await client.ask("AUTH CRAM-MD5", "*"))[1], REPLY_CANCELLED)
        self.assertEqual(await client.ask("NOOP", f"AUTH PLAIN {plain(ALICE)}"), [OK, REPLY_AUTH_OK])

    async def test_malformed_answers_get_501_count_no_failure_and_the_session_goes_on(self) -> None:
        self.control("authfaillimit", "1\n")  # one failed login would block the address
        client = await self.ehloed()
        self.assertEqual(await client.ask("AUTH PLAIN !!not-base64!!"), [REPLY_MALFORMED])
        self.assertEqual(await client.ask(f"AUTH PLAIN {b64('no nul bytes here')}"), [REPLY_MALFORMED])
        self.assertEqual(await client.ask(f"AUTH PLAIN {b64(chr(0) + chr(0) + PASSWORD)}"), [REPLY_MALFORMED])
        self.assertEqual((await client.ask("AUTH LOGIN", "%%%"))[1], REPLY_MALFORMED)
        self.assertEqual((await client.ask("AUTH LOGIN", b64(ALICE), "=\xff="))[2], REPLY_MALFORMED)
        self.assertEqual((await client.ask("AUTH CRAM-MD5", "Zm9v"))[1], REPLY_MALFORMED)  # "foo": no digest
        self.assertEqual((await client.ask("AUTH CRAM-MD5", "not base64 at all"))[1], REPLY_MALFORMED)
        self.assertEqual(await client.ask("NOOP", f"AUTH PLAIN {plain(ALICE)}"), [OK, REPLY_AUTH_OK])

    async def test_auth_without_a_mechanism_501_and_an_unknown_one_504(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask("AUTH", "AUTH DIGEST-MD5", "AUTH XOAUTH2 dG9rZW4="),
                         [b"501 auth type required (#5.5.4)", b"504 auth type unimplemented (#5.5.1)",
                          b"504 auth type unimplemented (#5.5.1)"])

    async def test_auth_twice_gets_503(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask(f"AUTH PLAIN {plain(ALICE)}", f"AUTH PLAIN {plain(BOB)}"),
                         [REPLY_AUTH_OK, b"503 you're already authenticated (#5.5.0)"])

    async def test_auth_during_a_mail_transaction_gets_503(self) -> None:
        client = await self.ehloed()
        replies = await client.ask("MAIL FROM:<someone@remote.test>", f"AUTH PLAIN {plain(ALICE)}", "RSET",
                                   f"AUTH PLAIN {plain(ALICE)}")
        self.assertEqual(replies, [OK, b"503 no auth during mail transaction (#5.5.0)", FLUSHED, REPLY_AUTH_OK])

    async def test_a_pipelined_auth_is_answered_in_order(self) -> None:
        client = await self.rig.greeted()
        replies = await client.ask("EHLO c", f"AUTH PLAIN {plain(ALICE)}", f"MAIL FROM:<{ALICE}>",
                                   "RCPT TO:<friend@remote.test>", "NOOP")
        self.assertEqual(replies[1:], [REPLY_AUTH_OK, OK, OK, OK])

    # -- policy -----------------------------------------------------------------------------------

    async def test_authrequirestls_makes_the_mx_port_refuse_plaintext_mechanisms(self) -> None:
        self.control("authrequirestls", "1\n")
        client = await self.rig.greeted()
        (ehlo,) = await client.ask("EHLO c")
        self.assertIn(b"250-AUTH CRAM-MD5\r\n", ehlo)
        self.assertEqual(await client.ask(f"AUTH PLAIN {plain(ALICE)}", "AUTH LOGIN", f"MAIL FROM:<{ALICE}>"),
                         [REPLY_AUTH_NEEDS_TLS, REPLY_AUTH_NEEDS_TLS, OK])  # the MX port still takes mail

    async def test_authsendercheck_ties_the_envelope_sender_to_the_user(self) -> None:
        client = await self.ehloed()
        await client.ask(f"AUTH PLAIN {plain(ALICE)}")
        self.assertEqual(await client.ask("MAIL FROM:<someone-else@remote.test>"), [OK])  # off by default

        self.control("authsendercheck", "1\n")
        client = await self.ehloed()
        self.assertEqual(await client.ask("MAIL FROM:<someone-else@remote.test>"), [OK])  # not logged in
        await client.ask("RSET", f"AUTH PLAIN {plain(ALICE)}")
        self.assertEqual(await client.ask("MAIL FROM:<someone-else@remote.test>", f"MAIL FROM:<{ALICE.upper()}>"),
                         [b"553 sorry, that sender address is not yours (#5.7.1)", OK])

    async def test_no_smtp_flag_is_refused_like_a_wrong_password(self) -> None:
        set_flags(self.home.path, ALICE, NO_SMTP)
        client = await self.ehloed()
        self.assertEqual(await self.refused_late(client, f"AUTH PLAIN {plain(ALICE)}"), REPLY_AUTH_FAILED)
        (challenge,) = await client.ask("AUTH CRAM-MD5")
        self.assertEqual(await self.refused_late(client, cram_answer(challenge, ALICE)), REPLY_AUTH_FAILED)

    async def test_no_relay_flag_logs_in_without_relaying(self) -> None:
        set_flags(self.home.path, ALICE, NO_RELAY)
        client = await self.ehloed()
        self.assertEqual(await client.ask(f"AUTH PLAIN {plain(ALICE)}"), [REPLY_AUTH_OK])
        self.assertEqual(await client.ask(f"MAIL FROM:<{ALICE}>", "RCPT TO:<friend@remote.test>",
                                          f"RCPT TO:<{BOB}>"), [OK, REPLY_RCPTHOSTS, OK])

    # -- the brake on guessing -----------------------------------------------------------------------

    async def test_failed_logins_are_slowed_then_blocked_per_client_ip(self) -> None:
        self.control("authfaillimit", "3\n")
        self.control("authfailwindow", "60\n")
        self.control("authfailblock", "120\n")
        attacker, other = await self.ehloed("192.0.2.66"), await self.ehloed("198.51.100.7")

        for delay in (1.0, 1.5):  # each failure is answered later than the one before
            await self.held_back(attacker, f"AUTH PLAIN {plain(ALICE, 'guess')}")
            self.assertEqual(await other.ask(f"AUTH PLAIN {plain(BOB)}"), [REPLY_AUTH_OK])  # meanwhile, at once
            other = await self.ehloed("198.51.100.7")
            self.home.clock.advance(delay - 0.05)
            self.assertEqual(attacker.replies(), [])
            self.home.clock.advance(0.05)
            self.assertEqual(await attacker.wait(1), [REPLY_AUTH_FAILED])

        self.assertEqual(await self.refused_late(attacker, f"AUTH PLAIN {plain(ALICE, 'guess')}"), REPLY_AUTH_FAILED)
        # The third failure within the window blocks the address: no password is even asked for.
        self.assertEqual(await attacker.ask("AUTH LOGIN", f"AUTH PLAIN {plain(ALICE)}"),
                         [REPLY_AUTH_BLOCKED, REPLY_AUTH_BLOCKED])
        self.assertEqual(await other.ask(f"AUTH PLAIN {plain(ALICE)}"), [REPLY_AUTH_OK])
        self.home.clock.advance(120)
        self.assertEqual(await attacker.ask(f"AUTH PLAIN {plain(ALICE)}"), [REPLY_AUTH_OK])

    async def test_a_failing_user_store_answers_454_and_counts_no_failure(self) -> None:
        self.control("authfaillimit", "2\n")
        client = await self.ehloed()
        self.users.down = True
        for _ in range(3):  # more than the limit, each answered at once
            self.assertEqual(await client.ask(f"AUTH PLAIN {plain(ALICE)}"), [REPLY_AUTH_UNAVAILABLE])
        self.assertEqual(len(self.flushLoggedErrors(StoreDown)), 3)
        self.assertEqual(await self.relays(client), REPLY_RCPTHOSTS)
        self.users.down = False
        self.assertEqual(await client.ask(f"AUTH PLAIN {plain(ALICE)}"), [REPLY_AUTH_OK])

    async def test_passwords_never_reach_the_log(self) -> None:
        """Neither a right nor a wrong password, in the clear or in base64, for any mechanism."""
        wrong = "not " + PASSWORD
        with capturedLogs() as events:
            client = await self.ehloed()
            self.assertEqual(await self.refused_late(client, f"AUTH PLAIN {plain(ALICE, wrong)}"), REPLY_AUTH_FAILED)
            self.assertEqual(await self.refused_late(client, "AUTH LOGIN", b64(ALICE), b64(wrong)),
                             REPLY_AUTH_FAILED)
            (challenge,) = await client.ask("AUTH CRAM-MD5")
            self.assertEqual(await self.refused_late(client, cram_answer(challenge, ALICE, wrong)),
                             REPLY_AUTH_FAILED)
            for exchange in ([f"AUTH PLAIN {plain(ALICE)}"], ["AUTH LOGIN", b64(ALICE), b64(PASSWORD)]):
                client = await self.ehloed()
                self.assertEqual((await client.ask(*exchange))[-1], REPLY_AUTH_OK)
        logged = "\n".join(f"{formatEvent(event)} {event!r}" for event in events)
        self.assertIn(f"AUTH CRAM-MD5 login failed for '{ALICE}'", logged)  # logged, but without secrets
        self.assertIn(f"AUTH LOGIN login ok {ALICE}", logged)
        for password in (wrong, PASSWORD):
            for form in (password, b64(password), plain(ALICE, password)):
                self.assertNotIn(form, logged)


class SubmissionTests(SMTPTestCase):
    submission = True

    async def test_mail_before_auth_gets_530(self) -> None:
        client = await self.ehloed()
        self.assertEqual(await client.ask(f"MAIL FROM:<{ALICE}>", f"RCPT TO:<{ALICE}>"),
                         [REPLY_AUTH_REQUIRED, MAIL_FIRST])

    async def test_plaintext_auth_before_tls_gets_538_and_cram_md5_is_offered(self) -> None:
        client = await self.rig.greeted()
        (ehlo,) = await client.ask("EHLO c")
        self.assertIn(b"250-AUTH CRAM-MD5\r\n250-AUTH=CRAM-MD5\r\n", ehlo)
        self.assertEqual(await client.ask(f"AUTH PLAIN {plain(ALICE)}", "AUTH LOGIN", f"MAIL FROM:<{ALICE}>"),
                         [REPLY_AUTH_NEEDS_TLS, REPLY_AUTH_NEEDS_TLS, REPLY_AUTH_REQUIRED])

    async def test_cram_md5_logs_in_without_tls_and_then_mail_is_taken(self) -> None:
        client = await self.ehloed()
        (challenge,) = await client.ask("AUTH CRAM-MD5")
        self.assertEqual(await client.ask(cram_answer(challenge, ALICE)), [REPLY_AUTH_OK])
        self.assertRegex(await self.send_message(client, b"Subject: x\n\nhi\n", ALICE, ("friend@remote.test",)),
                         QUEUED)
        self.assertEqual(self.stored()[0]["protocol"], b"ESMTPA")


# -- plugins ---------------------------------------------------------------------------------------------

class PluginBroke(Exception):
    """A plugin's own bug."""


class Scripted(Plugin):
    """Answers each hook as the test says (CONTINUE unless told); an exception is raised."""

    name = "scripted"
    description = "answers as the test says"

    def __init__(self) -> None:
        self.answers: dict[str, Answer | Exception] = {}

    def _answer(self, *keys: str) -> Answer:
        """The answer set for the first of ``keys`` the test named."""
        answer = next((self.answers[key] for key in keys if key in self.answers), CONTINUE)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def connect(self, session):
        return self._answer("connect")

    def helo(self, session, name):
        return self._answer("helo")

    def mail(self, session, sender):
        return self._answer("mail")

    def rcpt(self, session, recipient):
        return self._answer(f"rcpt {recipient}", "rcpt")

    def data(self, session, message):
        return self._answer("data")


class PluginTests(SMTPTestCase):

    def make_rig(self) -> SMTPRig:
        self.plugin = Scripted()
        self.control("plugins", "scripted\n")
        rig = SMTPRig(self.home, hooks=Hooks({"scripted": self.plugin}, self.home.clock))
        self.addCleanup(rig.close)
        return rig

    async def test_disconnect_at_connect_replaces_the_greeting(self) -> None:
        self.plugin.answers["connect"] = disconnect("too busy, try later")
        client = self.rig.connect()
        await wait_for(lambda: client.closed, "the session to end")
        self.assertEqual(client.replies(), [b"421 too busy, try later"])

    async def test_reject_at_rcpt_refuses_that_recipient_only(self) -> None:
        self.plugin.answers[f"rcpt {BOB}"] = reject("no such user here (#5.1.1)")
        client = await self.ehloed()
        replies = await client.ask("MAIL FROM:<someone@remote.test>", f"RCPT TO:<{BOB}>", f"RCPT TO:<{ALICE}>")
        self.assertEqual(replies, [OK, b"550 no such user here (#5.1.1)", OK])

    async def test_defer_at_mail_gets_its_4xx(self) -> None:
        self.plugin.answers["mail"] = defer("greylisted, try again later (#4.7.1)")
        client = await self.ehloed()
        self.assertEqual(await client.ask("MAIL FROM:<someone@remote.test>", f"RCPT TO:<{ALICE}>"),
                         [b"451 greylisted, try again later (#4.7.1)", MAIL_FIRST])

    async def test_no_plugin_can_open_the_relay(self) -> None:
        self.plugin.answers["rcpt"] = accept()
        client = await self.ehloed()
        self.assertEqual(await client.ask("MAIL FROM:<someone@remote.test>", "RCPT TO:<friend@remote.test>"),
                         [OK, REPLY_RCPTHOSTS])

    async def test_headers_added_at_data_go_above_received(self) -> None:
        self.plugin.answers["data"] = add_headers("X-Checked: yes", "X-Score: 0")
        message = b"Subject: x\n\nhi\n"
        self.assertRegex(await self.deliver(message), QUEUED)
        body = self.rig.queued[0].read_body()
        self.assertTrue(body.startswith(b"X-Checked: yes\nX-Score: 0\nReceived: from unknown "), body[:200])
        self.assertTrue(body.endswith(b"\n" + message), body)

    async def test_reject_at_data_queues_nothing(self) -> None:
        self.plugin.answers["data"] = reject("looks like spam (#5.7.1)", 554)
        self.assertEqual(await self.deliver(b"Subject: x\n\nhi\n"), b"554 looks like spam (#5.7.1)")
        self.assertEqual(self.rig.queued, [])

    async def test_a_plugin_that_raises_gets_451_and_the_session_goes_on(self) -> None:
        self.plugin.answers["rcpt"] = PluginBroke("a bug in the plugin")
        client = await self.ehloed()
        self.assertEqual(await client.ask("MAIL FROM:<someone@remote.test>", f"RCPT TO:<{ALICE}>", "NOOP"),
                         [OK, REPLY_PLUGIN_TROUBLE, OK])
        self.assertEqual(len(self.flushLoggedErrors(PluginBroke)), 1)
        del self.plugin.answers["rcpt"]
        self.assertEqual(await client.ask(f"RCPT TO:<{ALICE}>"), [OK])
