"""Properties of qmail-smtpd's parsers and of the whole SMTP session (Hypothesis).

Whatever a client sends, the server answers with well-formed replies, never
lets an exception escape (Twisted would only log it), never copies a CR or LF
from the client into the Received: line, and queues a message only at the end
of a whole, valid transaction.

The sessions run synchronously: a fresh SMTPServer over a StringTransport per
example, over one real home per module, with a queue that records what it is
given and answers at once, and the login flow's worker threads replaced by
inline calls (every SMTP command but a login then answers before ``send``
returns; a failed login waits on the example's own Clock).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from qtwist import users as users_module
from qtwist.login import FailureThrottle, Logins, mail_portal
from qtwist.policy import with_default_host
from qtwist.smtpd import (
    MAX_HOPS,
    BareLF,
    DataReader,
    SMTPFactory,
    SMTPServer,
    parse_address,
    parse_parameters,
    received_header,
    too_many_hops,
    unstuff,
)
from tests.support.home import DOMAIN, PASSWORD, make_home
from tests.support.memory import MemoryHome, SMTPClient

NOW = 1_800_000_000
DATABYTES = 3000
REPLY_LINE = re.compile(rb"[0-9]{3}[ -][^\r\n]*")

# -- strategies ----------------------------------------------------------------------------------

# What a client can put on a line: any byte but LF (the server decodes lines as latin-1).
line_text = st.text(st.characters(min_codepoint=0, max_codepoint=255, blacklist_characters="\n"), max_size=60)
# A plain address: no brackets, quotes, backslashes or blanks, not a source route.
atom = st.text(st.sampled_from("abcxyzABC019.-_+=%!#$&'*/?^`{|}~"), min_size=1, max_size=12)
plain_address = st.builds(lambda local, domain: f"{local}@{domain}", atom, st.sampled_from(
    [DOMAIN, "EXAMPLE.test", "elsewhere.test", "x"])) | atom
parameter_key = st.text(st.characters(blacklist_categories=("Z", "C"), blacklist_characters="="), min_size=1,
                        max_size=8)
parameter_value = st.text(st.characters(blacklist_categories=("Z", "C")), max_size=8)


# -- addresses and parameters ----------------------------------------------------------------------

@settings(max_examples=150)
@given(st.text(max_size=80))
def test_parse_address_never_raises_and_finds_no_blank_or_bracket(argument: str) -> None:
    parsed = parse_address(argument)
    if parsed is not None:
        address, rest = parsed
        assert not any(char in address for char in " \t<>")
        assert rest == rest.strip()


@settings(max_examples=100)
@given(plain_address, st.dictionaries(parameter_key, parameter_value, max_size=3))
def test_parse_address_gives_back_the_address_and_its_parameters(address: str, parameters: dict) -> None:
    words = " ".join(f"{key}={value}" for key, value in parameters.items())
    assert parse_address(f" <{address}> {words} ") == (address, words)
    assert parse_address(f"{address} {words}") == (address, words)
    # A source route (RFC 5321 §4.1.2) is dropped, as qmail-smtpd drops it.
    assert parse_address(f"<@relay.test,@other.test:{address}>") == (address, "")


@settings(max_examples=60)
@given(st.text(st.characters(blacklist_characters='<>"\\ \t'), max_size=20))
def test_parse_address_reads_quotes_and_escapes_inside_brackets(local: str) -> None:
    """Only an '@' as typed starts a source route: a quoted or escaped one is
    part of the local part (<""@x> is the address @x, not an empty route)."""
    assert parse_address(f'<"{local}"@{DOMAIN}>') in ((f"{local}@{DOMAIN}", ""), None)
    if local:
        escaped = "".join("\\" + char for char in local)
        assert parse_address(f"<{escaped}@{DOMAIN}>") in ((f"{local}@{DOMAIN}", ""), None)


@settings(max_examples=150)
@given(st.text(max_size=80))
def test_parse_parameters_never_raises_and_upcases_keys(text: str) -> None:
    parameters = parse_parameters(text)
    assert all(key == key.upper() for key in parameters)


@settings(max_examples=100)
@given(st.lists(st.tuples(parameter_key, parameter_value), max_size=5))
def test_parse_parameters_round_trip(pairs: list) -> None:
    expected = {}
    for key, value in pairs:
        expected[key.upper()] = value  # the last one wins
    assert parse_parameters(" ".join(f"{key}={value}" for key, value in pairs)) == expected


# -- message data ---------------------------------------------------------------------------------

def _unstuffed_by_lines(raw: bytes) -> bytes:
    return b"\n".join(line[1:] if line.startswith(b".") else line for line in raw.split(b"\r\n"))


@settings(max_examples=150)
@given(st.binary(max_size=200) | st.lists(st.sampled_from([b"\r\n", b".", b"..", b"a", b"\r", b"\n"]),
                                          max_size=30).map(b"".join))
def test_unstuff_drops_one_leading_dot_per_line_and_ends_lines_with_lf(raw: bytes) -> None:
    assert unstuff(raw) == _unstuffed_by_lines(raw)


header_line = st.sampled_from([b"Received: from x", b"RECEIVED: by y", b"Delivered-To: a@b", b"delivered-to:c",
                               b"Subject: Received: no", b"X-Received: no", b" Received: folded"])


@settings(max_examples=60)
@given(st.integers(MAX_HOPS - 3, MAX_HOPS + 3), st.lists(header_line, max_size=10), st.randoms(),
       st.binary(max_size=100))
def test_too_many_hops_counts_header_lines_only(hops: int, others: list, random, body: bytes) -> None:
    lines = [b"Received: from relay%d" % number for number in range(hops // 2)]
    lines += [b"Delivered-To: user%d@example.test" % number for number in range(hops - hops // 2)]
    lines += [line for line in others if not line.lower().startswith((b"received:", b"delivered-to:"))]
    random.shuffle(lines)
    trailer = b"\n".join([b"Received: in the body"] * MAX_HOPS)
    message = b"\n".join(lines) + b"\n\n" + body + b"\n" + trailer
    assert too_many_hops(message) is (hops >= MAX_HOPS)


@settings(max_examples=100)
@given(st.binary(max_size=300))
def test_too_many_hops_never_raises(message: bytes) -> None:
    assert too_many_hops(message) in (True, False)


@settings(max_examples=150)
@given(helo=st.text(max_size=60), ip=st.ip_addresses().map(str), user=st.sampled_from(["", f"alice@{DOMAIN}"]),
       cipher=st.sampled_from(["", "TLS_AES_256_GCM_SHA384"]), protocol=st.sampled_from(["SMTP", "ESMTPSA"]),
       now=st.floats(0, 4e9))
def test_received_header_takes_no_line_break_from_the_helo_name(helo, ip, user, cipher, protocol, now) -> None:
    header = received_header(helo, ip, "mx.example.test", protocol, now, cipher, user)
    assert header.startswith(b"Received: from unknown (HELO ")
    assert header.count(b"\n") == 2 and header.endswith(b"\n") and b"\r" not in header
    shown = header[len(b"Received: from unknown (HELO "):].split(b")", 1)[0]
    assert re.fullmatch(rb"[A-Za-z0-9.@%+/=:?-]+", shown)
    assert len(shown) == (len(helo) or len("unknown"))


def _outcome(reader: DataReader, chunks: list[bytes]):
    """What the reader makes of ``chunks`` fed one at a time, as the server
    feeds them: ('end', message, everything after it), ('bare',) or ('open',)."""
    for index, chunk in enumerate(chunks):
        reader.feed(chunk)
        try:
            ended = reader.end()
        except BareLF:
            return ("bare",)
        if ended is not None:
            message, after = ended
            return ("end", message, after + b"".join(chunks[index + 1:]))
    return ("open",)


@st.composite
def chunked(draw, data: st.SearchStrategy[bytes]) -> list[bytes]:
    """``data`` cut at arbitrary points."""
    whole = draw(data)
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=8)))
    return [whole[start:end] for start, end in zip([0, *cuts], [*cuts, len(whole)])]


data_soup = st.lists(st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"a", b"\r\n.\r\n", b".\r\n"]) | st.binary(max_size=6),
                     max_size=30).map(b"".join)


@settings(max_examples=200)
@given(chunked(data_soup))
def test_data_reader_gives_the_same_answer_whatever_the_chunking(chunks: list[bytes]) -> None:
    """Only BareLF may come out, and how the bytes arrive changes nothing."""
    assert _outcome(DataReader(0), chunks) == _outcome(DataReader(0), [b"".join(chunks)])


# A data line as a client sends it: no LF, and not the lone '.' that would end the message.
data_line = st.binary(max_size=20).filter(lambda line: b"\n" not in line and line != b".")


@settings(max_examples=150)
@given(st.lists(data_line, max_size=10), st.binary(max_size=30), st.data())
def test_data_reader_finds_the_end_of_a_framed_message(lines: list[bytes], after: bytes, data) -> None:
    # A CR at the end of a line would make "\r\r\n": still no bare LF.
    sent = b"".join(line + b"\r\n" for line in lines)
    whole = sent + b".\r\n" + after
    chunks = data.draw(chunked(st.just(whole)))
    assert _outcome(DataReader(0), chunks) == ("end", sent, after)


@settings(max_examples=10, deadline=None)
@given(st.integers(65_536, 70_000), st.lists(st.integers(1, 20_000), min_size=1, max_size=8), st.binary(max_size=20))
def test_data_reader_finds_the_end_past_the_size_limit(size: int, cuts: list[int], after: bytes) -> None:
    """Past databytes only a tail is kept, and the terminator is still found."""
    whole = b"x" * size + b"\r\n.\r\n" + after
    positions = sorted({min(sum(cuts[:index + 1]), len(whole)) for index in range(len(cuts))})
    chunks = [whole[start:end] for start, end in zip([0, *positions], [*positions, len(whole)])]
    reader = DataReader(1)
    outcome = _outcome(reader, chunks)
    assert outcome[0] == "end" and outcome[2] == after


# -- the whole session, in memory ------------------------------------------------------------------

@pytest.fixture(scope="module")
def home(tmp_path_factory) -> MemoryHome:
    root = tmp_path_factory.mktemp("smtp-properties") / "home"
    make_home(root, controls={"databytes": f"{DATABYTES}\n"}, tcp_smtp='127.0.0.2:allow,RELAYCLIENT=""\n')
    return MemoryHome(root)


@pytest.fixture(scope="module", autouse=True)
def inline_threads():
    """The user store's worker threads run inline: an example cannot wait for the reactor."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(users_module, "deferToThread", lambda function, *args: maybeDeferred(function, *args))
        yield


class RecordingQueue:
    """Takes what the server queues and says 250 at once."""

    def __init__(self) -> None:
        self.accepted: list[tuple[str, list[str], bytes]] = []

    def accept(self, sender: str, recipients: list[str], message: bytes):
        self.accepted.append((sender, list(recipients), message))
        return succeed(SimpleNamespace(id=len(self.accepted), born=NOW))


@dataclass
class Session:
    """One client of a fresh server, on its own Clock."""

    home: MemoryHome
    ip: str = "127.0.0.1"
    clock: Clock = field(default_factory=Clock)
    queue: RecordingQueue = field(default_factory=RecordingQueue)
    read: int = 0

    def __post_init__(self) -> None:
        self.clock.advance(NOW)
        throttle = FailureThrottle(self.clock, lambda: (10, 600, 900))
        factory = SMTPFactory(settings=lambda: self.home.settings, rules=lambda: self.home.control.rules,
                              queue=self.queue, queued=lambda message: None, clock=self.clock,
                              grants=self.home.grants,
                              logins=Logins("smtpd", mail_portal(self.home.users, "smtp"), throttle, self.clock))
        self.server = SMTPServer(factory)
        self.client = SMTPClient(self.server, self.ip)

    def send(self, data: bytes) -> list[bytes]:
        """Send, let a failed login's delay pass, and return the new reply lines."""
        self.client.send(data)
        for _ in range(10):
            if not self.server.busy:
                break
            self.clock.advance(5)
        assert not self.server.busy, "the session still waits after a login's delay"
        return self.new_lines()

    def new_lines(self) -> list[bytes]:
        output = self.client.output
        assert output.endswith(b"\r\n") or len(output) == self.read, f"half a reply line: {output[self.read:]!r}"
        lines = output[self.read:].split(b"\r\n")[:-1]
        self.read = len(output)
        for line in lines:
            assert REPLY_LINE.fullmatch(line), f"not an SMTP reply line: {line!r}"
        return lines

    def end(self) -> None:
        self.server.connectionLost(None)  # cancels the idle timer


def no_failure_logged(events: list[dict]) -> None:
    failures = [formatEvent(event) for event in events if "log_failure" in event]
    assert not failures, failures


size_value = st.text(st.characters(max_codepoint=255), max_size=6) | st.integers(0, 10**6).map(str)
# Command lines: the real commands with good and bad arguments, and line noise.
address_argument = st.one_of(
    plain_address.map(lambda address: f"<{address}>"),
    st.builds(lambda address, size: f"<{address}> SIZE={size}", plain_address, size_value),
    st.sampled_from(["<>", f"<alice@{DOMAIN}> SIZE=100", f"<bob@{DOMAIN}> SIZE=99999999", "<@a,@b:c@d>",
                     '<"a b"@c>', "<unclosed", f"alice@{DOMAIN}"]),
    line_text)
auth_argument = st.sampled_from([
    "PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "", "PLAIN =", "PLAIN *",
    "PLAIN " + "AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0IGhvcnNlIGJhdHRlcnk=",  # alice's right password
    "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==",  # a wrong one
    "LOGIN YWxpY2VAZXhhbXBsZS50ZXN0",
]) | line_text
command_line = st.one_of(
    st.builds(lambda verb, name: f"{verb} {name}", st.sampled_from(["HELO", "EHLO", "helo"]), line_text),
    st.builds(lambda argument: f"MAIL FROM:{argument}", address_argument),
    st.builds(lambda argument: f"RCPT TO:{argument}", address_argument),
    st.builds(lambda argument: f"rcpt to: {argument}", address_argument),
    st.sampled_from(["DATA", "RSET", "NOOP", "VRFY alice", "HELP", "STARTTLS", "MAIL", "RCPT", "DATA x",
                     "QUIT", "", "*", "=", "bWFsbG9yeQ==", "d3Jvbmc=", "MAIL FROM:", "RCPT TO:"]),
    st.builds(lambda argument: f"AUTH {argument}", auth_argument),
    line_text,
    st.just("X" * 5000),
)
# Runs of commands that make a whole transaction, among the rest, or examples would seldom queue.
transaction = st.tuples(st.builds(lambda argument: f"MAIL FROM:{argument}", address_argument | st.just("<a@b>")),
                        st.lists(st.sampled_from([f"RCPT TO:<alice@{DOMAIN}>", "RCPT TO:<x@elsewhere.test>",
                                                  f"RCPT TO:<bob@{DOMAIN}> NOTIFY=NEVER"]), min_size=1, max_size=3),
                        st.just("DATA")).map(lambda parts: [parts[0], *parts[1], parts[2]])
command_lines = st.lists(command_line.map(lambda line: [line]) | transaction, max_size=12).map(
    lambda runs: [line for run in runs for line in run])


@settings(max_examples=100, deadline=None)
@given(command_lines, st.lists(st.lists(data_line, max_size=6), max_size=3),
       st.sampled_from(["127.0.0.1", "127.0.0.2"]))
def test_every_command_gets_one_well_formed_reply_and_only_whole_transactions_are_queued(
        home: MemoryHome, commands: list[str], messages: list[list[bytes]], ip: str) -> None:
    """A model of qmail-smtpd's transaction (MAIL 250, RCPT 250..., DATA 354,
    data, '.') decides whether the server may queue, and what."""
    with capturedLogs() as events:
        session = Session(home, ip)
        (greeting,) = session.new_lines()
        assert greeting.startswith(b"220 ")
        sender, recipients, in_auth, queued = None, 0, False, 0
        bodies = iter(messages)
        for command in commands:
            if session.client.closed:
                break
            lines = session.send(command.encode("latin-1") + b"\r\n")
            finals = [line for line in lines if line[3:4] == b" "]
            assert len(finals) == 1 and lines[-1] == finals[0], f"{command!r} got {lines!r}"
            reply = finals[0]
            verb, _, argument = command.rstrip("\r").partition(" ")  # as the server reads the line
            verb = verb.upper()
            if in_auth:
                in_auth = reply.startswith(b"334 ")
            elif verb == "AUTH":
                in_auth = reply.startswith(b"334 ")
                if reply.startswith(b"235 "):
                    event("logged in")
            elif verb in ("HELO", "EHLO", "RSET") and reply.startswith(b"250"):
                sender, recipients = None, 0
            elif verb == "MAIL" and reply == b"250 ok":
                sender, recipients = with_default_host(parse_address(argument[5:])[0], home.settings), 0
            elif verb == "RCPT" and reply == b"250 ok":
                assert sender is not None
                recipients += 1
            elif verb == "DATA" and reply == b"354 go ahead":
                assert sender is not None and recipients, "354 without a sender and a recipient"
                body_lines = next(bodies, [])
                data = b"".join(line + b"\r\n" for line in body_lines) + b".\r\n"
                (reply,) = session.send(data)
                expected = b"".join((line[1:] if line.startswith(b".") else line) + b"\n" for line in body_lines)
                if len(expected) > DATABYTES or too_many_hops(expected):
                    assert reply.startswith((b"552 ", b"554 ")), reply
                else:
                    queued += 1
                    assert reply == b"250 ok %d qp %d" % (NOW, queued), reply
                    queued_sender, queued_recipients, message = session.queue.accepted[-1]
                    assert queued_sender == sender and len(queued_recipients) == recipients
                    assert message.startswith(b"Received: from unknown ") and message.endswith(expected)
                    added = message[:len(message) - len(expected)]
                    assert added.count(b"\n") == 2 and b"\r" not in added, added
                    event("a message was queued")
                sender, recipients = None, 0
            elif verb == "DATA":
                assert reply.startswith(b"503 ") and not (sender is not None and recipients)
            elif verb == "QUIT":
                assert reply.startswith(b"221 ") and session.client.closed
            assert len(session.queue.accepted) == queued, "queued outside a whole transaction"
        session.end()
    no_failure_logged(events)


soup_piece = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"EHLO x\r\n", b"MAIL FROM:<a@b>\r\n", f"RCPT TO:<alice@{DOMAIN}>\r\n".encode(), b"DATA\r\n",
                     b"\r\n.\r\n", b"\r\n", b"\n", b"\r", b".", b"AUTH LOGIN\r\n", b"AUTH PLAIN\r\n", b"\x00",
                     b"\xff\xfe", b"RSET\r\n", b"X" * 5000,
                     f"MAIL FROM:<a@b>\r\nRCPT TO:<alice@{DOMAIN}>\r\nDATA\r\nhello\r\n.\r\n".encode()]),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(soup_piece, max_size=12), st.sampled_from(["127.0.0.1", "127.0.0.2", "::1"]))
def test_byte_soup_gets_well_formed_replies_and_queues_only_after_354(home: MemoryHome, pieces: list[bytes],
                                                                      ip: str) -> None:
    with capturedLogs() as events:
        session = Session(home, ip)
        replies = session.new_lines()
        for piece in pieces:
            if session.client.closed:
                break
            replies += session.send(piece)
        if not session.client.closed:
            # End a line, a message and an AUTH exchange, whichever is open: QUIT is then heard.
            replies += session.send(b"\r\n.\r\n*\r\nQUIT\r\n")
            assert session.client.closed and replies[-1].startswith(b"221 "), replies[-3:]
        session.end()
        go_aheads = sum(1 for line in replies if line == b"354 go ahead")
        queued = [line for line in replies if re.fullmatch(rb"250 ok \d+ qp \d+", line)]
        assert len(queued) == len(session.queue.accepted) <= go_aheads
        assert all(recipients for _, recipients, _ in session.queue.accepted)
        event(f"{len(queued)} queued, {go_aheads} DATA")
    no_failure_logged(events)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["LOGIN", "PLAIN", "CRAM-MD5"]), st.lists(line_text | st.sampled_from(
    ["*", "=", "", "YWxpY2VAZXhhbXBsZS50ZXN0", "Y29ycmVjdCBob3JzZSBiYXR0ZXJ5", "AAA=", "AGEAYg==",
     "YWxpY2VAZXhhbXBsZS50ZXN0IDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAw"]), max_size=4))
def test_auth_exchanges_end_with_a_reply_whatever_the_client_answers(home: MemoryHome, mechanism: str,
                                                                      answers: list[str]) -> None:
    with capturedLogs() as events:
        session = Session(home)
        session.new_lines()
        (reply,) = session.send(f"AUTH {mechanism}\r\n".encode())
        for answer in answers:
            if not reply.startswith(b"334 "):
                break
            (reply,) = session.send(answer.encode("latin-1") + b"\r\n")
        if reply.startswith(b"334 "):
            (reply,) = session.send(b"*\r\n")
            assert reply.startswith(b"501 ")
        assert reply[:3] in (b"235", b"501", b"535", b"454", b"504"), reply
        (after,) = session.send(b"NOOP\r\n")
        assert after == b"250 ok"
        session.end()
    no_failure_logged(events)


def test_alice_logs_in_through_the_rig(home: MemoryHome) -> None:
    """The property above can succeed too: the real store answers inline."""
    session = Session(home)
    session.new_lines()
    plain = "AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0IGhvcnNlIGJhdHRlcnk="
    assert base64.b64decode(plain) == f"\0alice@{DOMAIN}\0{PASSWORD}".encode()
    assert session.send(f"AUTH PLAIN {plain}\r\n".encode()) == [b"235 ok, go ahead (#2.0.0)"]
    session.end()

