"""POP3 and POP-before-SMTP against a real `twistd qmail`, with real clients:
poplib (plain, STLS, pop3s), smtplib for delivery and relay checks, and fetchmail.

Client addresses 127.0.0.2-127.0.0.5 stand for different customers: grants and
the failed-login throttle are per client IP.
"""

from __future__ import annotations

import base64
import os
import poplib
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trustme

from tests.support.pop3client import SourcedPOP3
from tests.support.home import DOMAIN, Home, PASSWORD, make_home, set_flags
from tests.support.server import Server
from tests.support.waiting import DEADLINE, wait_until
from qtwist.pop3d import unique_id
from qtwist.users import UserDB

ALICE = f"alice@{DOMAIN}"
OUTSIDE = "friend@outside.test"
REMOTE = "someone@remote.test"
LOOPBACK = "127.0.0.1"


class MailServer(Server):
    """The test server with POP3 on a loopback port, and pop3s when asked for."""

    def __init__(self, home: Home, pop3s: bool = False) -> None:
        super().__init__(home, pop3=True, pop3s=pop3s)

    def pop3(self, source: str = LOOPBACK) -> SourcedPOP3:
        return SourcedPOP3(self.pop3_port, source)

    def login(self, source: str = LOOPBACK, user: str = ALICE, password: str = PASSWORD) -> poplib.POP3:
        pop = self.pop3(source)
        pop.user(user)
        pop.pass_(password)
        return pop

    def login_unless_in_use(self, source: str = LOOPBACK) -> poplib.POP3 | None:
        """A login, or None when another session holds the maildrop; any other refusal raises."""
        pop = self.pop3(source)
        pop.user(ALICE)
        try:
            pop.pass_(PASSWORD)
        except poplib.error_proto as refused:
            pop.close()
            if b"[IN-USE]" not in refused.args[0]:
                raise
            return None
        return pop

    def login_when_free(self, source: str = LOOPBACK) -> poplib.POP3:
        """A login, retried while another session still holds the maildrop."""
        return wait_until(lambda: self.login_unless_in_use(source), "the maildrop to be free")

    def rcpt_code(self, source: str, recipient: str = REMOTE) -> int:
        """The reply code to RCPT TO:<recipient> from ``source``; nothing is sent."""
        with self.smtp(source) as client:
            client.ehlo("client.test")
            client.mail(ALICE)
            code, _ = client.rcpt(recipient)
            client.rset()
        return code

    def peak_memory_kib(self) -> int:
        """The server process's high-water mark of resident memory (VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path / "home")


@pytest.fixture
def server(home: Home):
    with MailServer(home) as running:
        yield running


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(home: Home, ca: trustme.CA):
    """A server with control/servercert.pem issued by ``ca``, and pop3s listening."""
    # fetchmail wants the name in the subject's CN too, not only in subjectAltName.
    certificate = ca.issue_cert(LOOPBACK, "mx.example.test", common_name="mx.example.test")
    certificate.private_key_and_cert_chain_pem.write_to_path(str(home.path / "control" / "servercert.pem"))
    with MailServer(home, pop3s=True) as running:
        yield running


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def deliver(server: Server, home: Home, marker: str, body: str = "") -> bytes:
    """Send a message through SMTP; return the Maildir file its delivery wrote (LF line ends)."""
    text = f"Subject: {marker}\r\n\r\n{marker}\r\n{body}"
    with server.smtp() as client:
        client.sendmail(OUTSIDE, [ALICE], text)
    return home.wait_for_message(home.maildir(ALICE), marker.encode())


def drop(home: Home, raw: bytes, name: str) -> Path:
    """Put a message straight into new/, as a delivery agent does (tmp/ then rename)."""
    maildir = home.maildir(ALICE)
    (maildir / "tmp" / name).write_bytes(raw)
    os.rename(maildir / "tmp" / name, maildir / "new" / name)
    return maildir / "new" / name


def maildir_files(home: Home) -> list[str]:
    maildir = home.maildir(ALICE)
    return sorted(name for sub in ("new", "cur") for name in os.listdir(maildir / sub))


def as_sent(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# -- the maildrop over plain POP3 ----------------------------------------------------


def test_smtp_delivered_messages_are_listed_with_exact_sizes_and_retrieved_intact(server, home):
    delivered = [deliver(server, home, f"exact-{number}", body)
                 for number, body in enumerate(["plain line\r\n", ".dot first\r\n..two dots\r\n.\r\n",
                                                "long " * 300 + "\r\n"])]
    pop = server.login()
    count, total = pop.stat()
    sizes = {int(number): int(size) for number, size in (line.split() for line in pop.list()[1])}
    retrieved = {}
    for number in sizes:
        _, lines, octets = pop.retr(number)
        retrieved[number] = (b"\r\n".join(lines) + b"\r\n", octets)
    pop.quit()
    assert count == 3 and total == sum(sizes.values())
    assert sorted(text for text, _ in retrieved.values()) == sorted(as_sent(raw) for raw in delivered)
    for number, (text, octets) in retrieved.items():
        assert sizes[number] == len(text) == octets


def test_uidl_stays_the_same_across_sessions_and_a_restart(server, home):
    deliver(server, home, "uid-one")
    deliver(server, home, "uid-two")

    def uids() -> list[bytes]:
        pop = server.login_when_free()
        listing = pop.uidl()[1]
        pop.retr(1)  # marks it seen: a rename that must not change its UIDL
        pop.quit()
        return listing

    first = uids()
    assert uids() == first
    server.stop()
    server.start()
    assert uids() == first
    cur_names = os.listdir(home.maildir(ALICE) / "cur")
    assert sorted(line.split()[1] for line in first) == sorted(unique_id(name).encode() for name in cur_names)


def test_dele_removes_files_only_at_quit_and_a_dropped_connection_removes_nothing(server, home):
    for number in range(3):
        deliver(server, home, f"dele-{number}")
    pop = server.login()
    pop.dele(1)
    pop.dele(2)
    assert len(maildir_files(home)) == 3
    pop.close()  # no QUIT
    pop = server.login_when_free()
    assert pop.stat()[0] == 3
    pop.dele(1)
    pop.dele(3)
    assert len(maildir_files(home)) == 3
    assert pop.quit().startswith(b"+OK")
    assert len(maildir_files(home)) == 1


def test_mail_arriving_during_a_session_waits_for_the_next_one(server, home):
    deliver(server, home, "before-login")
    pop = server.login()
    deliver(server, home, "during-session")
    assert pop.stat()[0] == 1
    pop.dele(1)
    pop.quit()
    pop = server.login()
    _, lines, _ = pop.retr(1)
    assert pop.stat()[0] == 1
    pop.quit()
    assert b"during-session" in lines


def test_parallel_sessions_on_one_mailbox_take_each_message_exactly_once(server, home):
    markers = {f"parallel-{number}" for number in range(24)}
    for number, marker in enumerate(sorted(markers)):
        name = f"{1000 + number}.P1Q{number}.mx.example.test"
        drop(home, f"Subject: {marker}\n\n{marker}\n".encode(), name)
    taken: list[str] = []
    problems: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60

    def worker(source: str) -> None:
        while time.monotonic() < deadline:
            try:
                pop = server.login_unless_in_use(source)
                if pop is None:
                    continue
                if pop.stat()[0] == 0:
                    pop.quit()
                    return
                _, lines, _ = pop.retr(1)
                pop.dele(1)
                pop.quit()
            except Exception as error:  # reported below, so a failing thread cannot pass silently
                with lock:
                    problems.append(repr(error))
                return
            with lock:
                taken.append(lines[-1].decode())
        with lock:
            problems.append(f"{source} ran out of time")

    threads = [threading.Thread(target=worker, args=(f"127.0.0.{2 + index}",)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(70)
    assert not problems
    assert sorted(taken) == sorted(markers)
    assert maildir_files(home) == []


def test_large_message_is_streamed_not_loaded_whole(server, home):
    megabytes = 48
    line = b"0123456789" * 10 + b"\n"
    raw = b"Subject: large\n\n" + line * (megabytes * 1024 * 1024 // len(line))
    drop(home, raw, "1000.P1Qlarge.mx.example.test")
    before = server.peak_memory_kib()
    pop = server.login()
    size = int(pop.list(1).split()[2])
    top = pop.top(1, 2)[1]
    pop.sock.sendall(b"RETR 1\r\n")
    assert pop.file.readline().startswith(b"+OK")
    received, tail = 0, b""
    while not tail.endswith(b"\r\n.\r\n"):
        chunk = pop.file.read1(1 << 20)
        assert chunk, "the connection closed during RETR"
        received += len(chunk)
        tail = (tail + chunk)[-5:]
    pop.quit()
    growth_mib = (server.peak_memory_kib() - before) / 1024
    assert top == [b"Subject: large", b"", line.rstrip(), line.rstrip()]
    assert size == len(as_sent(raw))
    assert received == size + len(b".\r\n")  # no line starts with '.', so nothing is stuffed
    assert growth_mib < megabytes / 4, f"the server grew {growth_mib:.0f} MiB for a {megabytes} MiB message"


# -- TLS ----------------------------------------------------------------------------------


def test_stls_then_login_and_retr_with_a_verified_certificate(tls_server, home, ca):
    delivered = deliver(tls_server, home, "over-stls")
    pop = tls_server.pop3()
    assert "STLS" in pop.capa()
    pop.stls(context=client_context(ca))
    assert "STLS" not in pop.capa()
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    _, lines, _ = pop.retr(1)
    pop.quit()
    assert b"\r\n".join(lines) + b"\r\n" == as_sent(delivered)


def test_pop3s_login_retr_and_dele(tls_server, home, ca):
    # Several of the server's 64 KiB chunks: streamed through the TLS wrapper.
    delivered = deliver(tls_server, home, "over-pop3s", "".join(f"line {index}\r\n" for index in range(30000)))
    pop = poplib.POP3_SSL(LOOPBACK, tls_server.pop3s_port, timeout=DEADLINE, context=client_context(ca))
    capabilities = pop.capa()
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    _, lines, _ = pop.retr(1)
    pop.dele(1)
    pop.quit()
    assert "USER" in capabilities and "STLS" not in capabilities
    assert b"\r\n".join(lines) + b"\r\n" == as_sent(delivered)
    assert maildir_files(home) == []


def test_pop3requiretls_is_read_live_and_leaves_apop_usable(tls_server, home, ca):
    UserDB(home.path).add_user(f"carol@{DOMAIN}", PASSWORD, cleartext=True)
    pop = tls_server.pop3()
    assert "USER" in pop.capa()
    pop.quit()
    home.control("pop3requiretls", "1\n")

    def user_hidden() -> bool:
        session = tls_server.pop3()
        hidden = "USER" not in session.capa()
        session.quit()
        return hidden
    wait_until(user_hidden, "USER to leave CAPA after control/pop3requiretls")

    pop = tls_server.pop3()
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        pop.user(ALICE)
    pop.apop(f"carol@{DOMAIN}", PASSWORD)  # a digest, not the password: fine in the clear
    pop.quit()
    pop = tls_server.pop3()
    pop.stls(context=client_context(ca))
    assert "USER" in pop.capa()
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    pop.quit()
    pop = poplib.POP3_SSL(LOOPBACK, tls_server.pop3s_port, timeout=DEADLINE, context=client_context(ca))
    assert "USER" in pop.capa()  # pop3s is encrypted from the first byte
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    pop.quit()


def test_commands_pipelined_with_stls_in_the_clear_are_discarded(tls_server, ca):
    with socket.create_connection((LOOPBACK, tls_server.pop3_port), timeout=DEADLINE) as conn:
        reader = conn.makefile("rb")
        assert reader.readline().startswith(b"+OK <")
        # A USER injected behind STLS in the clear must not count once TLS is up (RFC 2595 §4).
        conn.sendall(f"STLS\r\nUSER {ALICE}\r\n".encode())
        assert reader.readline() == b"+OK begin TLS negotiation\r\n"
        reader.close()
        with client_context(ca).wrap_socket(conn, server_hostname=LOOPBACK) as tls:
            tls_reader = tls.makefile("rb")
            replies = []
            for command in (f"PASS {PASSWORD}", "STLS", "QUIT"):
                tls.sendall(f"{command}\r\n".encode())
                replies.append(tls_reader.readline())
            tls_reader.close()
    assert replies == [b"-ERR USER first\r\n", b"-ERR already using TLS\r\n", b"+OK\r\n"]


@pytest.mark.parametrize("last", ["QUIT", "X" * 2000])
def test_the_server_closes_a_tls_session_after_quit_or_a_line_too_long(tls_server, ca, last):
    """TLS does not close while the session is the transport's producer."""
    with socket.create_connection((LOOPBACK, tls_server.pop3_port), timeout=DEADLINE) as conn:
        reader = conn.makefile("rb")
        assert reader.readline().startswith(b"+OK <")
        conn.sendall(b"STLS\r\n")
        assert reader.readline() == b"+OK begin TLS negotiation\r\n"
        reader.close()
        with client_context(ca).wrap_socket(conn, server_hostname=LOOPBACK) as tls:
            tls.sendall(f"{last}\r\n".encode())
            tls_reader = tls.makefile("rb")
            assert tls_reader.readline() in (b"+OK\r\n", b"-ERR line too long\r\n")
            assert tls_reader.read() == b""  # the server's close, well before DEADLINE
            tls_reader.close()

# -- logins: flags and throttling ---------------------------------------------------------


def test_failed_pop3_logins_block_the_ip_for_pop3_and_smtp_auth_but_no_one_else(tmp_path):
    home = make_home(tmp_path / "home", controls={"authfaillimit": "3\n", "authfailblock": "600\n"})
    with MailServer(home) as server:
        guesser = server.pop3("127.0.0.2")
        for _ in range(3):
            guesser.user(ALICE)
            with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
                guesser.pass_("guess")
        guesser.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] too many failed logins"):
            guesser.pass_(PASSWORD)
        guesser.quit()

        with server.smtp("127.0.0.2") as client:
            client.ehlo("client.test")
            plain = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
            code, _ = client.docmd("AUTH", f"PLAIN {plain}")
        assert code == 454

        started = time.monotonic()
        server.login("127.0.0.3").quit()
        assert time.monotonic() - started < 0.9  # a failure's first delay is 1 s




def add_user_with_flags(home: Home, name: str, flags: int) -> None:
    """A user whose vpasswd gid field holds vpopmail flag bits, as vmoduser sets them."""
    UserDB(home.path).add_user(f"{name}@{DOMAIN}", PASSWORD)
    set_flags(home.path, f"{name}@{DOMAIN}", flags)


def test_user_flags_refuse_pop_or_withhold_the_relay_grant(server, home):
    add_user_with_flags(home, "nopop", 0x02)  # vpopmail's NO_POP
    add_user_with_flags(home, "norelay", 0x20)  # vpopmail's NO_RELAY
    refused = server.pop3("127.0.0.2")
    refused.user(f"nopop@{DOMAIN}")
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        refused.pass_(PASSWORD)
    refused.quit()
    server.login("127.0.0.3", f"norelay@{DOMAIN}").quit()
    assert server.rcpt_code("127.0.0.2") == 553
    assert server.rcpt_code("127.0.0.3") == 553
    assert home.qtwist("relay", "list").stdout == ""


# -- POP-before-SMTP grants ---------------------------------------------------------------


def test_pop3_login_lets_that_ip_relay_and_the_grant_survives_a_restart(server, home):
    assert server.rcpt_code("127.0.0.2") == 553
    server.login("127.0.0.2").quit()
    assert server.rcpt_code("127.0.0.2") == 250
    assert server.rcpt_code("127.0.0.3") == 553
    server.stop()
    server.start()
    assert server.rcpt_code("127.0.0.2") == 250
    assert "127.0.0.2\t" in home.qtwist("relay", "list").stdout


def test_expired_grant_is_ignored_at_once_and_removed_by_the_server(tmp_path):
    home = make_home(tmp_path / "home", controls={"relaygrantlifetime": "3600\n"})
    stale = home.path / "open-smtp" / "127.0.0.9"
    with MailServer(home) as server:
        server.login("127.0.0.2").quit()
        assert server.rcpt_code("127.0.0.2") == 250
        grant = home.path / "open-smtp" / "127.0.0.2"
        an_hour_ago = time.time() - 3601
        os.utime(grant, (an_hour_ago, an_hour_ago))
        assert server.rcpt_code("127.0.0.2") == 553
        stale.touch()
        os.utime(stale, (an_hour_ago, an_hour_ago))
    # The cleaner runs when the server starts, then every few minutes.
    with MailServer(home):
        wait_until(lambda: not grant.exists() and not stale.exists(), "the expired grants to be removed")


def test_exact_tcp_smtp_rule_wins_over_a_grant(tmp_path):
    home = make_home(tmp_path / "home",
                     tcp_smtp='127.0.0.4:allow\n127.0.0.5:allow,RELAYCLIENT=""\n127.0.0.:allow\n:allow\n')
    with MailServer(home) as server:
        for source in ("127.0.0.2", "127.0.0.4"):
            server.login(source).quit()
        assert server.rcpt_code("127.0.0.2") == 250  # a prefix rule does not hide the grant
        assert server.rcpt_code("127.0.0.4") == 553  # the exact rule, without RELAYCLIENT, decides
        assert server.rcpt_code("127.0.0.5") == 250  # RELAYCLIENT needs no grant


# -- fetchmail ------------------------------------------------------------------------------

FETCHMAIL = shutil.which("fetchmail")
needs_fetchmail = pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed "
                                     "(Debian/Ubuntu: apt-get install fetchmail)")


def run_fetchmail(tmp_path: Path, port: int, tls: str) -> tuple[subprocess.CompletedProcess, list[bytes]]:
    """fetchmail (verbose) with its own HOME and rc file; each message goes through an MDA
    into a file.  ``tls`` holds fetchmail's TLS options for the user."""
    fetch_home = tmp_path / "fetchmail"
    fetched = fetch_home / "fetched"
    fetched.mkdir(parents=True)
    rc = fetch_home / "fetchmailrc"
    rc.write_text(f'set no syslog\n'
                  f'poll {LOOPBACK} service {port} protocol pop3\n'
                  f'  user "{ALICE}" password "{PASSWORD}" {tls}\n'
                  f'  nokeep fetchall mda "cat > {fetched}/message.$$"\n')
    rc.chmod(0o600)
    environment = dict(os.environ, HOME=str(fetch_home))
    command = [FETCHMAIL, "--verbose", "--nodetach", "-f", str(rc), "-i", str(fetch_home / "fetchids")]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=60)
    return done, [path.read_bytes() for path in sorted(fetched.iterdir())]


def deliver_for_fetchmail(server: Server, home: Home) -> list[bytes]:
    return [deliver(server, home, f"fetch-{number}", body) for number, body in
            enumerate(["one line\r\n", ".leading dot\r\n.\r\nafter a lone dot\r\n",
                       "".join(f"line {index} of a long message\r\n" for index in range(20000))])]


# fetchmail hands the MDA LF line ends (as the Maildir has them) and adds one header of its own.
FETCHMAIL_RECEIVED = re.compile(rb"Received: from [^\n]*\n\tby [^\n]*\(fetchmail-[^\n]*\n(?:\t[^\n]*\n)*")


def assert_fetched_intact(delivered: list[bytes], fetched: list[bytes]) -> None:
    unwrapped = [FETCHMAIL_RECEIVED.sub(b"", message, count=1) for message in fetched]
    assert sorted(unwrapped) == sorted(delivered)


@needs_fetchmail
def test_fetchmail_pulls_and_deletes_every_message(server, home, tmp_path):
    delivered = deliver_for_fetchmail(server, home)
    done, fetched = run_fetchmail(tmp_path, server.pop3_port, "sslproto ''")
    assert done.returncode == 0, done.stderr
    assert_fetched_intact(delivered, fetched)
    assert maildir_files(home) == []


@needs_fetchmail
def test_fetchmail_over_stls_with_certificate_check(tls_server, home, ca, tmp_path):
    delivered = deliver_for_fetchmail(tls_server, home)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    done, fetched = run_fetchmail(tmp_path, tls_server.pop3_port,
                                  f"sslproto tls1.2+ sslcertck sslcertfile {ca_file} "
                                  f"sslcommonname mx.example.test")
    assert done.returncode == 0, done.stderr
    assert "upgrade to TLS succeeded" in done.stdout
    assert_fetched_intact(delivered, fetched)
    assert maildir_files(home) == []
