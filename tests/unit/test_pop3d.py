"""The POP3 server, driven by the stdlib poplib client (and a raw socket where the wire matters).

Each test listens on an ephemeral 127.0.0.1 port in the test's reactor and
runs the client in a worker thread.
"""

from __future__ import annotations

import io
import os
import poplib
import shutil
import socket
import ssl
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import CertificateOptions
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from qtwist.control import Settings
from qtwist.grants import Grants
from qtwist.login import FailureThrottle, Logins, mail_portal
from qtwist.maildir import SEEN, with_flag
from qtwist.pop3d import POP3Factory, crlf_chunks, dot_stuffed, top_chunks
from qtwist.users import UserDB

ALICE = "alice@example.test"
PASSWORD = "secret"
HOST = "127.0.0.1"
TIMEOUT = 10

# LF line ends as qmail-local writes them; a dot line, a lone dot, a CRLF line.
MESSAGE = (b"From: bob@example.net\n"
           b"Subject: dots\n"
           b"\n"
           b"first line\n"
           b".leading dot\n"
           b".\n"
           b"already crlf\r\n"
           b"last line\n")
MESSAGE_AS_SENT = MESSAGE.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def read_line(conn: socket.socket) -> bytes:
    """One reply line, read a byte at a time so nothing after it is consumed."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return line


def as_sent(raw: bytes) -> bytes:
    return b"".join(crlf_chunks(io.BytesIO(raw)))


@pytest.mark.parametrize("raw, expected", [
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\r\nb", b"a\r\nb\r\n"),
    (b"a\r", b"a\r\n"),
    (b"", b""),
    (b"\n\n", b"\r\n\r\n"),
])
def test_crlf_chunks_end_every_line_with_crlf(raw: bytes, expected: bytes) -> None:
    assert as_sent(raw) == expected


def test_crlf_chunks_keep_a_crlf_split_between_two_reads() -> None:
    raw = b"x" * 9 + b"\r\nnext\n"
    chunks = list(crlf_chunks(io.BytesIO(raw), chunk_size=10))
    assert b"".join(chunks) == b"x" * 9 + b"\r\nnext\r\n"
    assert all(not chunk.endswith(b"\r") for chunk in chunks)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 65536])
def test_top_cuts_after_the_requested_body_lines_whatever_the_chunking(chunk_size: int) -> None:
    def top(lines: int) -> bytes:
        return b"".join(top_chunks(crlf_chunks(io.BytesIO(MESSAGE), chunk_size), lines))
    assert top(0) == b"From: bob@example.net\r\nSubject: dots\r\n\r\n"
    assert top(2) == b"From: bob@example.net\r\nSubject: dots\r\n\r\nfirst line\r\n.leading dot\r\n"
    assert top(100) == MESSAGE_AS_SENT


def test_top_of_a_message_without_body_is_the_whole_message() -> None:
    assert b"".join(top_chunks(iter([b"Subject: x\r\n"]), 3)) == b"Subject: x\r\n"


def test_dot_stuffing_doubles_leading_dots_across_chunks() -> None:
    stuffed = b"".join(dot_stuffed(iter([b".a\r\n", b".b\r\nc\r\n.", b"d\r\n"])))
    assert stuffed == b"..a\r\n..b\r\nc\r\n..d\r\n.\r\n"


@pytest.mark.parametrize("name, expected", [
    ("123.abc.host", "123.abc.host:2,S"),
    ("123.abc.host:2,", "123.abc.host:2,S"),
    ("123.abc.host:2,FT", "123.abc.host:2,FST"),
    ("123.abc.host:2,S", "123.abc.host:2,S"),
])
def test_seen_flag_is_added_in_ascii_order(name: str, expected: str) -> None:
    assert with_flag(name, SEEN) == expected


class POP3ServerTests(unittest.TestCase):
    """A real server on 127.0.0.1 with a real vpasswd home."""

    tls_options = None
    settings = Settings(me="mx.example.test")

    def setUp(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="qtwist-pop3d-"))
        self.addCleanup(shutil.rmtree, self.home)
        self.users = UserDB(self.home)
        self.users.add_domain("example.test")
        self.users.add_user(ALICE, PASSWORD, cleartext=True)
        self.maildir = self.home / "domains" / "example.test" / "alice" / "Maildir"
        self.grants = Grants(self.home)
        self.throttle = FailureThrottle(reactor, lambda: (self.settings.authfaillimit,
                                                          self.settings.authfailwindow,
                                                          self.settings.authfailblock))
        self.factory = POP3Factory(logins=Logins("pop3d", mail_portal(self.users, "pop3"), self.throttle, reactor),
                                   grants=self.grants, settings=lambda: self.settings,
                                   tls_options=self.tls_options)
        # Tracks the server side of each connection, so a test ends only once all have closed.
        self.connections = WrappingFactory(self.factory)
        self.listener = self.listen(self.connections)
        self.port = self.listener.getHost().port
        self.addCleanup(self._stop)

    @defer.inlineCallbacks
    def _stop(self):
        yield self.listener.stopListening()
        yield self.all_closed()

    @defer.inlineCallbacks
    def all_closed(self):
        """Wait until the server has seen every connection end."""
        deadline = time.monotonic() + TIMEOUT
        while self.connections.protocols:
            self.assertLess(time.monotonic(), deadline, "server connections still open")
            yield task.deferLater(reactor, 0.01, lambda: None)

    # -- helpers --------------------------------------------------------------------

    def listen(self, factory: WrappingFactory) -> IListeningPort:
        return reactor.listenTCP(0, factory, interface=HOST)

    def drop(self, raw: bytes, mtime: float | None = None, folder: str = "new",
             name: str | None = None) -> Path:
        """Deliver the Maildir way: tmp/ then rename."""
        name = name or f"{int(time.time())}.P{os.getpid()}Q{uuid.uuid4().hex[:8]}.mx.example.test"
        tmp = self.maildir / "tmp" / name.split(":")[0]
        tmp.write_bytes(raw)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        final = self.maildir / folder / name
        os.rename(tmp, final)
        return final

    def files(self) -> list[str]:
        return sorted(f"{sub}/{name}" for sub in ("new", "cur")
                      for name in os.listdir(self.maildir / sub))

    def connect(self) -> poplib.POP3:
        return poplib.POP3(HOST, self.port, timeout=TIMEOUT)

    def session(self) -> poplib.POP3:
        """A session ready for USER/PASS (the TLS variant runs STLS first)."""
        return self.connect()

    def login(self, user: str = ALICE, password: str = PASSWORD) -> poplib.POP3:
        pop = self.session()
        try:
            pop.user(user)
            pop.pass_(password)
        except poplib.error_proto:
            pop.close()
            raise
        return pop

    def open_socket(self) -> socket.socket:
        """A raw connection past the greeting, ready for USER/PASS."""
        conn = socket.create_connection((HOST, self.port), timeout=TIMEOUT)
        read_line(conn)
        return conn

    def raw(self, commands: bytes, until: bytes) -> bytes:
        """Send ``commands`` in one write; return the replies up to ``until``."""
        with self.open_socket() as conn:
            conn.sendall(commands)
            received = b""
            while until not in received:
                data = conn.recv(65536)
                if not data:
                    break
                received += data
        return received

    # -- login ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_login_with_user_and_pass(self):
        def client():
            pop = self.login()
            welcome = pop.getwelcome()
            stat = pop.stat()
            pop.quit()
            return welcome, stat
        welcome, stat = yield deferToThread(client)
        self.assertRegex(welcome, rb"^\+OK <[^<>@]+@mx\.example\.test>$")
        self.assertEqual(stat, (0, 0))

    @defer.inlineCallbacks
    def test_login_accepts_percent_for_at(self):
        def client():
            pop = self.login("alice%example.test")
            pop.quit()
        yield deferToThread(client)

    @defer.inlineCallbacks
    def test_wrong_password_is_refused_after_a_delay_and_grants_nothing(self):
        def client():
            pop = self.session()
            pop.user(ALICE)
            started = time.monotonic()
            with self.assertRaises(poplib.error_proto) as refused:
                pop.pass_("wrong")
            elapsed = time.monotonic() - started
            pop.quit()
            return refused.exception.args[0], elapsed
        reply, elapsed = yield deferToThread(client)
        self.assertEqual(reply, b"-ERR [AUTH] authorization failed")
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertFalse(self.grants.is_live(HOST, 10800))

    @defer.inlineCallbacks
    def test_ip_that_failed_too_often_is_refused_without_a_password_check(self):
        self.settings = Settings(me="mx.example.test", pop3requiretls=self.settings.pop3requiretls,
                                 authfaillimit=2, authfailblock=600)

        def client():
            pop = self.session()
            for _ in range(2):
                pop.user(ALICE)
                with self.assertRaises(poplib.error_proto):
                    pop.pass_("wrong")
            replies = []
            pop.user(ALICE)
            for attempt in (lambda: pop.pass_(PASSWORD), lambda: pop.apop(ALICE, PASSWORD)):
                with self.assertRaises(poplib.error_proto) as refused:
                    attempt()
                replies.append(refused.exception.args[0])
            pop.quit()
            return replies
        replies = yield deferToThread(client)
        self.assertEqual(replies, [b"-ERR [SYS/TEMP] too many failed logins from your address, "
                                   b"try again later"] * 2)
        self.assertTrue(self.throttle.blocked(HOST))
        self.assertFalse(self.grants.is_live(HOST, 10800))

    @defer.inlineCallbacks
    def test_good_login_forgets_earlier_failures(self):
        def client():
            pop = self.session()
            pop.user(ALICE)
            with self.assertRaises(poplib.error_proto):
                pop.pass_("wrong")
            pop.user(ALICE)
            pop.pass_(PASSWORD)
            pop.quit()
        yield deferToThread(client)
        self.assertNotIn(HOST, self.throttle.failures)

    @defer.inlineCallbacks
    def test_unknown_user_gets_the_same_answer_as_a_wrong_password(self):
        def client():
            pop = self.session()
            pop.user("nobody@example.test")
            with self.assertRaises(poplib.error_proto) as refused:
                pop.pass_(PASSWORD)
            pop.quit()
            return refused.exception.args[0]
        self.assertEqual((yield deferToThread(client)), b"-ERR [AUTH] authorization failed")

    @defer.inlineCallbacks
    def test_user_without_pop_rights_is_refused(self):
        vpasswd = self.home / "domains" / "example.test" / "vpasswd"
        fields = vpasswd.read_text().rstrip("\n").split(":")
        fields[3] = "2"  # vpopmail's NO_POP flag
        vpasswd.write_text(":".join(fields) + "\n")

        def client():
            pop = self.session()
            pop.user(ALICE)
            with self.assertRaises(poplib.error_proto) as refused:
                pop.pass_(PASSWORD)
            pop.quit()
            return refused.exception.args[0]
        self.assertEqual((yield deferToThread(client)), b"-ERR [AUTH] authorization failed")
        self.assertFalse(self.grants.is_live(HOST, 10800))

    @defer.inlineCallbacks
    def test_pass_before_user_and_stat_before_login_are_refused(self):
        def client():
            pop = self.session()
            with self.assertRaises(poplib.error_proto):
                pop.pass_(PASSWORD)
            with self.assertRaises(poplib.error_proto):
                pop.stat()
            pop.quit()
        yield deferToThread(client)

    @defer.inlineCallbacks
    def test_successful_login_records_a_relay_grant_for_the_client_ip(self):
        self.assertFalse(self.grants.is_live(HOST, 10800))

        def client():
            self.login().quit()
        yield deferToThread(client)
        self.assertTrue(self.grants.is_live(HOST, 10800))
        self.assertEqual([ip for ip, _ in self.grants.list()], [HOST])

    @defer.inlineCallbacks
    def test_apop_login_with_the_greeting_timestamp(self):
        self.drop(MESSAGE)

        def client():
            pop = self.session()
            pop.apop(ALICE, PASSWORD)
            count = pop.stat()[0]
            pop.quit()
            return count
        self.assertEqual((yield deferToThread(client)), 1)
        self.assertTrue(self.grants.is_live(HOST, 10800))

    @defer.inlineCallbacks
    def test_apop_with_a_wrong_secret_is_refused(self):
        def client():
            pop = self.session()
            with self.assertRaises(poplib.error_proto) as refused:
                pop.apop(ALICE, "wrong")
            pop.quit()
            return refused.exception.args[0]
        self.assertEqual((yield deferToThread(client)), b"-ERR [AUTH] authorization failed")

    @defer.inlineCallbacks
    def test_second_session_on_a_locked_maildrop_is_refused_until_the_first_ends(self):
        def client():
            first = self.login()
            second = self.session()
            second.user(ALICE)
            with self.assertRaises(poplib.error_proto) as refused:
                second.pass_(PASSWORD)
            first.quit()
            second.user(ALICE)
            second.pass_(PASSWORD)
            second.quit()
            return refused.exception.args[0]
        self.assertEqual((yield deferToThread(client)), b"-ERR [IN-USE] maildrop already locked")

    @defer.inlineCallbacks
    def test_dropped_session_releases_the_lock(self):
        def client():
            self.login().close()
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    pop = self.login()
                except poplib.error_proto:
                    assert time.monotonic() < deadline, "the lock was never released"
                    continue
                pop.quit()
                return
        yield deferToThread(client)

    # -- CAPA -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_capa_lists_what_is_available(self):
        def client():
            pop = self.connect()
            before = pop.capa()
            pop.user(ALICE)
            pop.pass_(PASSWORD)
            after = pop.capa()
            pop.quit()
            return before, after
        before, after = yield deferToThread(client)
        self.assertEqual(before, {"TOP": [], "UIDL": [], "USER": [], "PIPELINING": [], "RESP-CODES": [],
                                  "AUTH-RESP-CODE": [], "IMPLEMENTATION": ["qtwist"]})
        self.assertNotIn("USER", after)
        self.assertIn("UIDL", after)

    # -- the maildrop ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_stat_list_retr_are_byte_exact_with_crlf_and_dot_lines(self):
        self.drop(MESSAGE)

        def client():
            pop = self.login()
            stat = pop.stat()
            listing = pop.list()[1]
            one = pop.list(1)
            _, lines, octets = pop.retr(1)
            pop.quit()
            return stat, listing, one, lines, octets
        stat, listing, one, lines, octets = yield deferToThread(client)
        size = len(MESSAGE_AS_SENT)
        self.assertEqual(stat, (1, size))
        self.assertEqual(listing, [b"1 %d" % size])
        self.assertEqual(one, b"+OK 1 %d" % size)
        self.assertEqual(lines, MESSAGE_AS_SENT.split(b"\r\n")[:-1])
        self.assertEqual(octets, size)

    @defer.inlineCallbacks
    def test_retr_on_the_wire_is_dot_stuffed_with_crlf_and_a_final_dot(self):
        self.drop(MESSAGE)
        wire = yield deferToThread(
            self.raw, f"USER {ALICE}\r\nPASS {PASSWORD}\r\nRETR 1\r\nQUIT\r\n".encode(), b"\r\n.\r\n")
        body = wire.split(b"+OK message follows\r\n", 1)[1]
        self.assertEqual(body.split(b"\r\n.\r\n")[0] + b"\r\n.\r\n",
                         MESSAGE_AS_SENT.replace(b"\r\n.", b"\r\n..") + b".\r\n")

    @defer.inlineCallbacks
    def test_retr_streams_a_large_message_intact(self):
        # Many chunks long, with a CRLF straddling the first 64 KiB chunk boundary.
        head = b"Subject: big\n\n" + (b"x" * 99 + b"\n") * 655
        head += b"z" * (65535 - len(head))
        raw = head + b"\r\n" + b".dot\nline\n" * 50000
        self.drop(raw)

        def client():
            pop = self.login()
            size = pop.stat()[1]
            _, lines, octets = pop.retr(1)
            pop.quit()
            return size, lines, octets
        size, lines, octets = yield deferToThread(client)
        self.assertEqual(size, len(as_sent(raw)))
        self.assertEqual(octets, size)
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", as_sent(raw))

    @defer.inlineCallbacks
    def test_top_sends_headers_and_the_first_body_lines(self):
        self.drop(MESSAGE)

        def client():
            pop = self.login()
            top0 = pop.top(1, 0)[1]
            top2 = pop.top(1, 2)[1]
            pop.quit()
            return top0, top2
        top0, top2 = yield deferToThread(client)
        self.assertEqual(top0, [b"From: bob@example.net", b"Subject: dots", b""])
        self.assertEqual(top2, [b"From: bob@example.net", b"Subject: dots", b"", b"first line",
                                b".leading dot"])

    @defer.inlineCallbacks
    def test_messages_are_numbered_by_delivery_time(self):
        self.drop(b"Subject: newer\n\nb\n", mtime=2_000_000_000, name="1000.a.host")
        self.drop(b"Subject: older\n\na\n", mtime=1_000_000_000, name="2000.b.host")

        def client():
            pop = self.login()
            first = pop.top(1, 0)[1]
            uids = pop.uidl()[1]
            pop.quit()
            return first, uids
        first, uids = yield deferToThread(client)
        self.assertIn(b"Subject: older", first)
        self.assertEqual(uids, [b"1 2000.b.host", b"2 1000.a.host"])

    @defer.inlineCallbacks
    def test_uidl_is_the_maildir_unique_name_and_stable_across_sessions(self):
        delivered = self.drop(MESSAGE)

        def session():
            pop = self.login()
            listing = pop.uidl()[1]
            one = pop.uidl(1)
            pop.retr(1)
            pop.quit()
            return listing, one
        first = yield deferToThread(session)
        second = yield deferToThread(session)
        self.assertEqual(first, ([b"1 " + delivered.name.encode()], b"+OK 1 " + delivered.name.encode()))
        self.assertEqual(second, first)

    @defer.inlineCallbacks
    def test_login_moves_new_to_cur_and_retr_marks_seen_keeping_flags(self):
        fresh = self.drop(MESSAGE, mtime=1_000_000_000)
        flagged = self.drop(MESSAGE, mtime=2_000_000_000, folder="cur", name="2000.flagged.host:2,F")
        (self.maildir / "new" / ".hidden").write_bytes(b"not mail")
        (self.maildir / "tmp" / "3000.partial.host").write_bytes(b"half a delivery")

        def client():
            pop = self.login()
            count = pop.stat()[0]
            pop.retr(1)
            pop.retr(2)
            pop.quit()
            return count
        self.assertEqual((yield deferToThread(client)), 2)
        self.assertEqual(self.files(), sorted([f"cur/{flagged.name.split(':')[0]}:2,FS",
                                               f"cur/{fresh.name}:2,S", "new/.hidden"]))

    @defer.inlineCallbacks
    def test_symlinks_in_the_maildir_are_not_messages(self):
        secret = self.home / "secret"
        secret.write_bytes(b"not for POP3 clients\n")
        (self.maildir / "new" / "1000.link.host").symlink_to(secret)
        (self.maildir / "cur" / "1001.link.host:2,").symlink_to(secret)

        def client():
            pop = self.login()
            stat = pop.stat()
            pop.quit()
            return stat
        self.assertEqual((yield deferToThread(client)), (0, 0))

    @defer.inlineCallbacks
    def test_top_does_not_mark_the_message_seen(self):
        fresh = self.drop(MESSAGE)

        def client():
            pop = self.login()
            pop.top(1, 1)
            pop.quit()
        yield deferToThread(client)
        self.assertEqual(self.files(), [f"cur/{fresh.name}:2,"])

    @defer.inlineCallbacks
    def test_dele_then_quit_removes_the_message(self):
        self.drop(b"Subject: keep\n\nk\n", mtime=1_000_000_000)
        self.drop(b"Subject: remove\n\nr\n", mtime=2_000_000_000)

        def client():
            pop = self.login()
            pop.dele(2)
            count_after_dele = pop.stat()[0]
            quit_reply = pop.quit()
            pop = self.login()
            left = pop.top(1, 0)[1]
            pop.quit()
            return count_after_dele, quit_reply, left
        count_after_dele, quit_reply, left = yield deferToThread(client)
        self.assertEqual(count_after_dele, 1)
        self.assertTrue(quit_reply.startswith(b"+OK"))
        self.assertIn(b"Subject: keep", left)
        self.assertEqual(len(self.files()), 1)

    @defer.inlineCallbacks
    def test_dele_then_dropped_connection_removes_nothing(self):
        self.drop(MESSAGE)

        def client():
            pop = self.login()
            pop.dele(1)
            pop.close()
        yield deferToThread(client)
        yield self.all_closed()
        self.assertEqual(len(self.files()), 1)

    @defer.inlineCallbacks
    def test_retr_then_dropped_connection_flags_nothing(self):
        fresh = self.drop(MESSAGE)

        def client():
            pop = self.login()
            pop.retr(1)
            pop.close()
        yield deferToThread(client)
        yield self.all_closed()
        self.assertEqual(self.files(), [f"cur/{fresh.name}:2,"])

    @defer.inlineCallbacks
    def test_connection_dropped_during_retr_keeps_the_message_and_frees_the_lock(self):
        self.drop(b"Subject: big\n\n" + b"line of a long message\n" * 200000)

        def client():
            with self.open_socket() as conn:
                conn.sendall(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nDELE 1\r\nRSET\r\nRETR 1\r\n".encode())
                received = b""
                while b"message follows" not in received:
                    received += conn.recv(4096)
        yield deferToThread(client)
        yield self.all_closed()
        self.assertEqual(len(self.files()), 1)

        def next_session():
            pop = self.login()
            count = pop.stat()[0]
            pop.quit()
            return count
        self.assertEqual((yield deferToThread(next_session)), 1)

    @defer.inlineCallbacks
    def test_rset_undoes_dele(self):
        self.drop(MESSAGE)

        def client():
            pop = self.login()
            pop.dele(1)
            with self.assertRaises(poplib.error_proto):
                pop.retr(1)
            pop.rset()
            count = pop.stat()[0]
            pop.quit()
            return count
        self.assertEqual((yield deferToThread(client)), 1)
        self.assertEqual(len(self.files()), 1)

    @defer.inlineCallbacks
    def test_bad_message_numbers_get_err(self):
        self.drop(MESSAGE)

        def client():
            pop = self.login()
            replies = []
            for command in ("RETR 0", "RETR 2", "RETR x", "LIST 9", "DELE -1", "TOP 1", "UIDL 3"):
                with self.assertRaises(poplib.error_proto) as refused:
                    pop._shortcmd(command)
                replies.append(refused.exception.args[0])
            pop.quit()
            return replies
        replies = yield deferToThread(client)
        self.assertTrue(all(reply.startswith(b"-ERR") for reply in replies), replies)

    @defer.inlineCallbacks
    def test_pipelined_commands_are_answered_in_order(self):
        self.drop(MESSAGE)
        commands = f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\nUIDL 1\r\nNOOP\r\nQUIT\r\n".encode()
        wire = yield deferToThread(self.raw, commands, b"\r\n+OK\r\n+OK\r\n")
        replies = wire.split(b"\r\n")
        self.assertEqual(replies[0:3], [b"+OK", b"+OK", b"+OK 1 %d" % len(MESSAGE_AS_SENT)])
        self.assertTrue(replies[3].startswith(b"+OK 1 "))
        self.assertEqual(replies[4:6], [b"+OK", b"+OK"])

    @defer.inlineCallbacks
    def test_idle_session_is_closed_after_the_timeout(self):
        self.factory.idle_timeout = 0.2

        def client():
            pop = self.connect()
            return pop.file.readline(), pop.file.readline()
        line, end = yield deferToThread(client)
        self.assertTrue(line.startswith(b"-ERR"))
        self.assertEqual(end, b"")


class TLSMixin:
    """A trustme CA, the server's CertificateOptions and a verifying client context."""

    ca: trustme.CA

    def make_certificate(self) -> CertificateOptions:
        self.ca = trustme.CA()
        server_cert = self.ca.issue_cert(HOST)
        return CertificateOptions(
            privateKey=load_pem_private_key(server_cert.private_key_pem.bytes(), None),
            certificate=x509.load_pem_x509_certificate(server_cert.cert_chain_pems[0].bytes()))

    def client_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(context)
        return context


class POP3TLSTests(TLSMixin, POP3ServerTests):
    """The same server with a certificate and control/pop3requiretls: STLS before USER/PASS."""

    settings = Settings(me="mx.example.test", pop3requiretls=True)

    def setUp(self) -> None:
        self.tls_options = self.make_certificate()
        super().setUp()

    def session(self) -> poplib.POP3:
        pop = self.connect()
        pop.stls(context=self.client_context())
        return pop

    def open_socket(self) -> socket.socket:
        conn = super().open_socket()
        conn.sendall(b"STLS\r\n")
        read_line(conn)
        return self.client_context().wrap_socket(conn, server_hostname=HOST)

    @defer.inlineCallbacks
    def test_capa_lists_what_is_available(self):
        def client():
            pop = self.connect()
            before = pop.capa()
            pop.stls(context=self.client_context())
            after = pop.capa()
            pop.quit()
            return before, after
        before, after = yield deferToThread(client)
        self.assertIn("STLS", before)
        self.assertNotIn("USER", before)
        self.assertNotIn("STLS", after)
        self.assertIn("USER", after)

    @defer.inlineCallbacks
    def test_user_in_the_clear_is_refused_when_tls_is_required(self):
        def client():
            pop = self.connect()
            with self.assertRaises(poplib.error_proto) as refused:
                pop.user(ALICE)
            with self.assertRaises(poplib.error_proto) as no_user:
                pop.pass_(PASSWORD)
            pop.quit()
            return refused.exception.args[0], no_user.exception.args[0]
        refused, no_user = yield deferToThread(client)
        self.assertEqual(refused, b"-ERR [AUTH] use STLS before logging in")
        self.assertTrue(no_user.startswith(b"-ERR"))
        self.assertFalse(self.grants.is_live(HOST, 10800))

    @defer.inlineCallbacks
    def test_apop_in_the_clear_is_allowed_when_tls_is_required(self):
        # APOP sends a digest, never the password, so pop3requiretls does not apply to it.
        self.drop(MESSAGE)

        def client():
            pop = self.connect()
            pop.apop(ALICE, PASSWORD)
            count = pop.stat()[0]
            pop.quit()
            return count
        self.assertEqual((yield deferToThread(client)), 1)

    @defer.inlineCallbacks
    def test_stls_certificate_verifies_and_the_session_works(self):
        self.drop(MESSAGE)

        def client():
            pop = self.login()
            peer = pop.sock.getpeercert()
            _, lines, _ = pop.retr(1)
            with self.assertRaises(poplib.error_proto):
                pop._shortcmd("STLS")
            pop.quit()
            return peer, lines
        peer, lines = yield deferToThread(client)
        self.assertIn(("IP Address", HOST), peer["subjectAltName"])
        self.assertEqual(lines, MESSAGE_AS_SENT.split(b"\r\n")[:-1])

    @defer.inlineCallbacks
    def test_commands_pipelined_after_stls_in_the_clear_are_discarded(self):
        def client():
            with socket.create_connection((HOST, self.port), timeout=TIMEOUT) as conn:
                reader = conn.makefile("rb")
                reader.readline()
                conn.sendall(b"STLS\r\nCAPA\r\n")
                started = reader.readline()
                tls = self.client_context().wrap_socket(conn, server_hostname=HOST)
                tls.sendall(b"NOOP\r\n")
                tls_reader = tls.makefile("rb")
                reply = tls_reader.readline()
                tls.sendall(b"QUIT\r\n")
                tls_reader.readline()
                tls_reader.close()
                tls.close()
                reader.close()
                return started, reply
        started, reply = yield deferToThread(client)
        self.assertTrue(started.startswith(b"+OK"))
        self.assertEqual(reply, b"+OK\r\n")


class POP3ImplicitTLSTests(TLSMixin, POP3ServerTests):
    """The same server behind implicit TLS (pop3s): pop3requiretls is met from the first byte."""

    settings = Settings(me="mx.example.test", pop3requiretls=True)

    def setUp(self) -> None:
        self.tls_options = self.make_certificate()
        super().setUp()

    def listen(self, factory: WrappingFactory) -> IListeningPort:
        return reactor.listenTCP(0, TLSMemoryBIOFactory(self.tls_options, False, factory), interface=HOST)

    def connect(self) -> poplib.POP3:
        return poplib.POP3_SSL(HOST, self.port, timeout=TIMEOUT, context=self.client_context())

    def open_socket(self) -> socket.socket:
        conn = socket.create_connection((HOST, self.port), timeout=TIMEOUT)
        conn = self.client_context().wrap_socket(conn, server_hostname=HOST)
        read_line(conn)
        return conn

    @defer.inlineCallbacks
    def test_capa_lists_what_is_available(self):
        def client():
            pop = self.connect()
            capabilities = pop.capa()
            pop.quit()
            return capabilities
        capabilities = yield deferToThread(client)
        self.assertIn("USER", capabilities)
        self.assertNotIn("STLS", capabilities)
