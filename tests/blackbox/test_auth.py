"""Authenticated submission and TLS as real clients see them: STARTTLS on every
SMTP listener, certificates and their renewal, SMTPS, AUTH PLAIN/LOGIN/CRAM-MD5
as smtplib and swaks speak them, the submission port's rules once TLS is up,
and Received: lines naming the cipher.  The server is a real `twistd qmail` on
loopback (see tests/support/server.py); the clients are smtplib, swaks and
openssl s_client.

AUTH itself (each exchange, refusals, cancels, authzid, vpasswd flags,
authsendercheck, the brake on failed logins, passwords kept out of the log)
is tested in memory in tests/unit/test_smtpd.py.
"""

from __future__ import annotations

import base64
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.support.fakesmtp import FakeSMTP
from tests.support.home import DOMAIN, Home, ME, PASSWORD, REPO, edit_file, make_home
from tests.support.server import Server
from tests.support.smtpclient import ask, read_replies, unique
from tests.support.waiting import DEADLINE, DeadPort, wait_until
from qtwist.users import UserDB

ALICE = f"alice@{DOMAIN}"      # clear-text vpasswd field: every mechanism
BOB = f"bob@{DOMAIN}"          # hash only: no CRAM-MD5
REMOTE = "remote.test"         # routed to the sink by smtproutes
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
REPLY_AUTH_OK = b"235 ok, go ahead (#2.0.0)"
REPLY_AUTH_NEEDS_TLS = b"538 auth not available without TLS (#5.3.3)"
REPLY_AUTH_REQUIRED = b"530 Authorization required (#5.7.1)"
REPLY_RCPTHOSTS = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
REPLY_NO_TLS = b"454 TLS not available (#4.3.0)"
REPLY_TLS_READY = b"220 ready for tls"
RECEIVED = re.compile(
    rb"Received: from unknown \(HELO (?P<helo>[^)\n]*)\) \((?:(?P<user>[^()\s]+)@)?(?P<ip>[0-9.]+)\)\n"
    rb"  by " + re.escape(ME.encode()) + rb" with (?:\((?P<cipher>[^()\n]+) encrypted\) )?"
    rb"(?P<protocol>[A-Z]+); ")
# A TLS 1.2 or 1.3 cipher as the server names it: version, colon, OpenSSL's name.
TLS_CIPHER = re.compile(rb"TLSv1\.[23]:[A-Z0-9_-]+")

# -- certificates ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_pem(ca: trustme.CA, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> bytes:
    """Key and certificate in one PEM file, as control/servercert.pem holds them."""
    leaf = ca.issue_cert(ME, "127.0.0.1", common_name=ME, key_type=key_type)
    return leaf.private_key_and_cert_chain_pem.bytes()


def certificate_in(pem: bytes) -> x509.Certificate:
    """The first certificate of a PEM text (a key before it is skipped)."""
    block = re.search(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    assert block, pem[-500:]
    return x509.load_pem_x509_certificate(block.group())


def fingerprint(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(hashes.SHA256())


def presented_certificate(port: int, ca_file: Path, starttls: bool = True) -> x509.Certificate:
    """What `openssl s_client` is shown, checked against ``ca_file`` and the name ``me``."""
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", ME,
               "-CAfile", str(ca_file), "-verify_hostname", ME, "-verify_return_error"]
    if starttls:
        command += ["-starttls", "smtp"]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    assert f"CN = {ME}".encode() in done.stdout, done.stdout[:1500]
    return certificate_in(done.stdout)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


# -- homes and servers ----------------------------------------------------------------------

def auth_home(root: Path, sink: FakeSMTP, dead_port: DeadPort, *, certificate: bytes | None,
              controls: dict[str, str] | None = None) -> Home:
    """alice and bob with PASSWORD (alice's kept in the clear too, for CRAM-MD5);
    REMOTE routed to the sink and everything else to a port that refuses, so
    nothing leaves loopback."""
    routes = f"{REMOTE}:127.0.0.1:{sink.port}\n:127.0.0.1:{dead_port.port}\n"
    home = make_home(root, controls={"smtproutes": routes, **(controls or {})})
    UserDB(root).set_password(ALICE, PASSWORD, cleartext=True)
    if certificate is not None:
        (root / "control" / "servercert.pem").write_bytes(certificate)
    return home


@pytest.fixture(scope="module")
def mx(tmp_path_factory, ca: trustme.CA, sink: FakeSMTP, dead_port: DeadPort) -> Iterator[Server]:
    """The shared server: a certificate, and the smtp, submission and smtps listeners."""
    home = auth_home(tmp_path_factory.mktemp("mx"), sink, dead_port, certificate=server_pem(ca))
    server = Server(home, dns_port=dead_port.port, submission=True, smtps=True).start()
    yield server
    server.stop()


@pytest.fixture
def start_server(tmp_path: Path, ca: trustme.CA, sink: FakeSMTP,
                 dead_port: DeadPort) -> Iterator[Callable[..., Server]]:
    """A server of the test's own, for one that changes control files or counts failures."""
    servers: list[Server] = []

    def start(controls: dict[str, str] | None = None, certificate: bool = True) -> Server:
        home = auth_home(tmp_path / f"home{len(servers)}", sink, dead_port,
                         certificate=server_pem(ca) if certificate else None, controls=controls)
        server = Server(home, dns_port=dead_port.port, submission=True, smtps=True).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


# -- clients ------------------------------------------------------------------------------

def greeted(port: int) -> socket.socket:
    """A raw client of any of the listeners, past the banner."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    banner, = read_replies(sock, 1)
    assert banner.startswith(b"220 "), banner
    return sock


def starttls(sock: socket.socket, ca: trustme.CA) -> ssl.SSLSocket:
    assert ask(sock, "STARTTLS") == [REPLY_TLS_READY]
    return client_context(ca).wrap_socket(sock, server_hostname=ME)


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain_response(authcid: str, password: str, authzid: str = "") -> str:
    """RFC 4616: authzid NUL authcid NUL password, in base64."""
    return b64(f"{authzid}\0{authcid}\0{password}")


def extensions(ehlo_reply: bytes) -> list[str]:
    """The EHLO keywords after the first line, e.g. ['PIPELINING', 'AUTH LOGIN CRAM-MD5 PLAIN']."""
    return [line[4:].decode() for line in ehlo_reply.split(b"\r\n")[1:]]


def auth_line(ehlo_reply: bytes) -> str | None:
    return next((line for line in extensions(ehlo_reply) if line.startswith("AUTH ")), None)


def smtp_client(port: int, source: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE, source_address=(source, 0))


def smtplib_auth(client: smtplib.SMTP, mechanism: str, user: str, password: str) -> tuple[int, bytes]:
    """AUTH with smtplib's own implementation of ``mechanism``; the final reply."""
    client.user, client.password = user, password
    method = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login, "CRAM-MD5": client.auth_cram_md5}
    try:
        return client.auth(mechanism, method[mechanism])
    except smtplib.SMTPAuthenticationError as refused:
        return refused.smtp_code, refused.smtp_error


def message(marker: str) -> str:
    """alice's message to carl at REMOTE, found again by ``marker``."""
    return f"From: <{ALICE}>\r\nTo: <carl@{REMOTE}>\r\nSubject: {marker}\r\n\r\n{marker}\r\n"


def received_of(data: bytes) -> re.Match:
    """The top Received: line of a message (sink or Maildir, CRLF or LF)."""
    found = RECEIVED.search(data.replace(b"\r\n", b"\n"))
    assert found, data[:400]
    return found


def swaks_send(port: int, mechanism: str, marker: str, *tls: str) -> subprocess.CompletedProcess:
    """swaks sends alice's message to REMOTE, authenticating with ``mechanism``
    (``tls``: swaks' -tls or --tls-on-connect)."""
    command = ["swaks", "--server", "127.0.0.1", "--port", str(port),
               "--helo", "swaks.example.test", "--timeout", str(int(DEADLINE)),
               "--from", ALICE, "--to", f"carl@{REMOTE}", "--header", f"Subject: {marker}", "--body", marker,
               "--auth", mechanism, "--auth-user", ALICE, "--auth-password", PASSWORD, *tls]
    return subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE * 3)


# -- STARTTLS and the certificate ------------------------------------------------------------

@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_starttls_is_offered_and_shows_the_servercert_certificate(mx, ca, ca_file, listener):
    port = mx.port if listener == "smtp" else mx.submission_port
    with greeted(port) as sock:
        ehlo, = ask(sock, "EHLO client.example.test")
        assert "STARTTLS" in extensions(ehlo)
    in_file = certificate_in((mx.home.path / "control" / "servercert.pem").read_bytes())
    shown = presented_certificate(port, ca_file)
    assert fingerprint(shown) == fingerprint(in_file)
    assert shown.subject == in_file.subject


def test_starttls_forgets_everything_said_in_the_clear(mx, ca):
    """RFC 3207 §4.2: the EHLO name, a mail transaction and an AUTH from before
    the handshake are gone; a command pipelined behind STARTTLS is never run."""
    marker = unique("reset")
    with greeted(mx.port) as sock:
        assert "STARTTLS" in extensions(ask(sock, "EHLO before-tls.example.test")[0])
        assert ask(sock, f"AUTH PLAIN {plain_response(ALICE, PASSWORD)}", f"MAIL FROM:<{ALICE}>") \
            == [REPLY_AUTH_OK, b"250 ok"]
        sock.sendall(b"STARTTLS\r\nRSET\r\n")
        assert read_replies(sock, 1) == [REPLY_TLS_READY]
        with client_context(ca).wrap_socket(sock, server_hostname=ME) as tls:
            assert ask(tls, f"RCPT TO:<{ALICE}>") == [b"503 MAIL first (#5.5.1)"]
            ehlo, = ask(tls, "EHLO after-tls.example.test")
            assert "STARTTLS" not in extensions(ehlo)
            assert auth_line(ehlo) == "AUTH LOGIN CRAM-MD5 PLAIN"  # not authenticated any more
            assert ask(tls, "STARTTLS") == [REPLY_NO_TLS]
            assert ask(tls, f"MAIL FROM:<{ALICE}>", f"RCPT TO:<carl@{REMOTE}>", f"RCPT TO:<{ALICE}>", "DATA") \
                == [b"250 ok", REPLY_RCPTHOSTS, b"250 ok", b"354 go ahead"]
            tls.sendall(f"Subject: {marker}\r\n\r\n{marker}\r\n.\r\n".encode())
            assert read_replies(tls, 1)[0].startswith(b"250 ok ")
    received = received_of(mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode()))
    assert received["helo"] == b"after-tls.example.test"
    assert received["protocol"] == b"ESMTPS" and received["user"] is None
    assert TLS_CIPHER.fullmatch(received["cipher"]), received.group()


def test_starttls_with_an_argument_is_a_syntax_error(mx):
    with greeted(mx.port) as sock:
        assert ask(sock, "EHLO c", "STARTTLS now", "NOOP")[1:] == \
            [b"501 Syntax error (no parameters allowed) (#5.5.4)", b"250 ok"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ssl.TLSVersion.TLSv1_1 is, on purpose
def test_tls_older_than_1_2_fails_the_handshake(mx, ca):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # lets this OpenSSL offer TLS 1.1 at all
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    for port in (mx.port, mx.submission_port):
        with greeted(port) as sock:
            assert ask(sock, "EHLO c", "STARTTLS")[1] == REPLY_TLS_READY
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):  # the server's alert
                old.wrap_socket(sock, server_hostname=ME)
    with socket.create_connection(("127.0.0.1", mx.smtps_port), timeout=DEADLINE) as sock:
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            old.wrap_socket(sock, server_hostname=ME)

    tls12 = client_context(ca)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with smtp_client(mx.port) as client:
        client.starttls(context=tls12)
        assert client.sock.version() == "TLSv1.2"
        assert client.noop()[0] == 250


def test_renewed_servercert_is_used_by_new_connections_without_a_restart(start_server, ca, ca_file):
    server = start_server()
    certificate = server.home.path / "control" / "servercert.pem"
    first = certificate_in(certificate.read_bytes())
    assert fingerprint(presented_certificate(server.port, ca_file)) == fingerprint(first)

    with smtp_client(server.port) as before:
        before.starttls(context=client_context(ca))
        renewed = server_pem(ca, trustme.KeyType.RSA)
        edit_file(certificate, renewed)
        expected = fingerprint(certificate_in(renewed))
        wait_until(lambda: fingerprint(presented_certificate(server.port, ca_file)) == expected,
                   "the renewed certificate on a new connection")
        assert fingerprint(presented_certificate(server.smtps_port, ca_file, starttls=False)) == expected
        assert before.noop()[0] == 250  # a session begun with the old one goes on
    assert server.process.poll() is None
    assert server.log.count("tls: loaded control/servercert.pem") == 2


def test_home_without_servercert_offers_no_tls(start_server):
    """A production home: no certificate, none made up."""
    server = start_server(certificate=False)
    for port in (server.port, server.submission_port):
        with greeted(port) as sock:
            ehlo, starttls_reply = ask(sock, "EHLO client.example.test", "STARTTLS")
            assert "STARTTLS" not in extensions(ehlo)
            assert starttls_reply == REPLY_NO_TLS
    with pytest.raises((ssl.SSLError, OSError)):
        smtplib.SMTP_SSL("127.0.0.1", server.smtps_port, timeout=DEADLINE).quit()
    server.wait_for_log("smtps: no usable control/servercert.pem; closed the connection from 127.0.0.1")
    assert not (server.home.path / "control" / "servercert.pem").exists()
    assert "self-signed" not in server.log


def test_demo_home_makes_a_self_signed_certificate_once(tmp_path):
    root = tmp_path / "conf"
    shutil.copytree(REPO / "conf", root, ignore=shutil.ignore_patterns(
        "servercert.pem", ".servercert.pem.new", "queue", "open-smtp", "Maildir", "twistd.log"))
    home = Home(root)
    certificate = root / "control" / "servercert.pem"
    with Server(home) as server:
        server.wait_for_log(f"tls: made a self-signed certificate for {ME} in control/servercert.pem")
        made = certificate.read_bytes()
        # Self-signed: the certificate is its own authority.
        assert fingerprint(presented_certificate(server.port, certificate)) == fingerprint(certificate_in(made))
    assert certificate.stat().st_mode & 0o077 == 0  # the key is no one else's to read
    with Server(home):
        assert certificate.read_bytes() == made
    assert home.path.joinpath("twistd.log").read_text().count("made a self-signed certificate") == 1


# -- SMTPS ----------------------------------------------------------------------------------

def test_smtps_is_tls_from_the_first_byte_with_submission_rules(mx, ca, ca_file, sink):
    in_file = certificate_in((mx.home.path / "control" / "servercert.pem").read_bytes())
    assert fingerprint(presented_certificate(mx.smtps_port, ca_file, starttls=False)) == fingerprint(in_file)
    marker = unique("smtps")
    with smtplib.SMTP_SSL("127.0.0.1", mx.smtps_port, timeout=DEADLINE, context=client_context(ca)) as client:
        code, reply = client.ehlo("smtps.example.test")
        assert code == 250 and b"STARTTLS" not in reply
        assert client.has_extn("auth") and set(client.esmtp_features["auth"].split()) == set(MECHANISMS)
        assert client.mail(ALICE) == (530, REPLY_AUTH_REQUIRED[4:])
        assert client.login(ALICE, PASSWORD) == (235, REPLY_AUTH_OK[4:])
        assert client.sendmail(ALICE, [f"carl@{REMOTE}"], message(marker)) == {}
    received = received_of(sink.wait_for(marker.encode()).data)
    assert (received["protocol"], received["user"]) == (b"ESMTPSA", ALICE.encode())
    assert TLS_CIPHER.fullmatch(received["cipher"]), received.group()


def test_swaks_tls_on_connect(mx, sink):
    marker = unique("swaks-smtps")
    done = swaks_send(mx.smtps_port, "PLAIN", marker, "--tls-on-connect")
    assert done.returncode == 0, done.stdout + done.stderr
    assert REPLY_AUTH_OK.decode() in done.stdout
    assert received_of(sink.wait_for(marker.encode()).data)["protocol"] == b"ESMTPSA"


# -- AUTH mechanisms --------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_smtp_port_accepts_each_mechanism_before_starttls(mx, sink, mechanism):
    source = "127.0.0.5"
    marker = unique(f"auth-{mechanism}")
    with smtp_client(mx.port, source) as client:
        client.ehlo("client.example.test")
        assert set(client.esmtp_features["auth"].split()) == set(MECHANISMS)
        assert smtplib_auth(client, mechanism, ALICE, PASSWORD) == (235, REPLY_AUTH_OK[4:])
        assert client.sendmail(ALICE, [f"carl@{REMOTE}"], message(marker)) == {}
    received = received_of(sink.wait_for(marker.encode()).data)
    assert received["protocol"] == b"ESMTPA" and received["cipher"] is None
    assert (received["user"], received["ip"]) == (ALICE.encode(), source.encode())
    mx.wait_for_log(f"smtpd: AUTH {mechanism} login ok {ALICE} from {source}")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_swaks_submits_with_each_mechanism_over_starttls(mx, sink, mechanism):
    marker = unique(f"swaks-{mechanism}")
    done = swaks_send(mx.submission_port, mechanism, marker, "-tls")
    assert done.returncode == 0, done.stdout + done.stderr
    assert REPLY_AUTH_OK.decode() in done.stdout
    received = received_of(sink.wait_for(marker.encode()).data)
    assert (received["protocol"], received["user"]) == (b"ESMTPSA", ALICE.encode())
    assert TLS_CIPHER.fullmatch(received["cipher"]), received.group()


# -- submission ----------------------------------------------------------------------------

def test_submission_wants_auth_and_plaintext_auth_only_inside_tls(mx, ca, sink):
    marker = unique("submission")
    with greeted(mx.submission_port) as sock:
        ehlo, = ask(sock, "EHLO client.example.test")
        assert "STARTTLS" in extensions(ehlo) and auth_line(ehlo) == "AUTH CRAM-MD5"
        assert ask(sock, f"MAIL FROM:<{ALICE}>") == [REPLY_AUTH_REQUIRED]
        assert ask(sock, f"AUTH PLAIN {plain_response(ALICE, PASSWORD)}", "AUTH LOGIN", f"MAIL FROM:<{ALICE}>") \
            == [REPLY_AUTH_NEEDS_TLS, REPLY_AUTH_NEEDS_TLS, REPLY_AUTH_REQUIRED]
        with starttls(sock, ca) as tls:
            ehlo, = ask(tls, "EHLO client.example.test")
            assert "STARTTLS" not in extensions(ehlo) and auth_line(ehlo) == "AUTH LOGIN CRAM-MD5 PLAIN"
            assert ask(tls, f"MAIL FROM:<{ALICE}>") == [REPLY_AUTH_REQUIRED]
            assert ask(tls, "AUTH LOGIN", b64(ALICE), b64(PASSWORD))[2] == REPLY_AUTH_OK
            assert ask(tls, f"MAIL FROM:<{ALICE}>", f"RCPT TO:<carl@{REMOTE}>", "DATA") \
                == [b"250 ok", b"250 ok", b"354 go ahead"]
            tls.sendall(message(marker).encode() + b".\r\n")
            assert read_replies(tls, 1)[0].startswith(b"250 ok ")
    received = received_of(sink.wait_for(marker.encode()).data)
    assert (received["protocol"], received["user"]) == (b"ESMTPSA", ALICE.encode())


def test_smtplib_starttls_and_login_on_submission(mx, ca, sink):
    marker = unique("smtplib-submission")
    with smtp_client(mx.submission_port) as client:
        client.ehlo("client.example.test")
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail(ALICE, [f"carl@{REMOTE}"], message(marker))
        client.starttls(context=client_context(ca))
        assert client.login(ALICE, PASSWORD)[0] == 235
        assert client.sendmail(ALICE, [f"carl@{REMOTE}"], message(marker)) == {}
    assert received_of(sink.wait_for(marker.encode()).data)["protocol"] == b"ESMTPSA"


def test_swaks_cram_md5_on_submission_needs_no_tls(mx, sink):
    marker = unique("swaks-cram-clear")
    done = swaks_send(mx.submission_port, "CRAM-MD5", marker)
    assert done.returncode == 0, done.stdout + done.stderr
    received = received_of(sink.wait_for(marker.encode()).data)
    assert (received["protocol"], received["user"], received["cipher"]) == (b"ESMTPA", ALICE.encode(), None)


def test_authrequirestls_makes_the_smtp_port_wait_for_tls(start_server, ca):
    server = start_server(controls={"authrequirestls": "1\n"})
    with greeted(server.port) as sock:
        ehlo, = ask(sock, "EHLO client.example.test")
        assert auth_line(ehlo) == "AUTH CRAM-MD5"
        assert ask(sock, f"AUTH PLAIN {plain_response(ALICE, PASSWORD)}") == [REPLY_AUTH_NEEDS_TLS]
        assert ask(sock, f"MAIL FROM:<{ALICE}>") == [b"250 ok"]  # the MX port still takes mail
        with starttls(sock, ca) as tls:
            assert auth_line(ask(tls, "EHLO client.example.test")[0]) == "AUTH LOGIN CRAM-MD5 PLAIN"
            assert ask(tls, f"AUTH PLAIN {plain_response(ALICE, PASSWORD)}") == [REPLY_AUTH_OK]


# -- what is written down ----------------------------------------------------------------------

def test_received_names_protocol_cipher_and_user(mx, ca):
    """ESMTPS (TLS), ESMTPA (AUTH) and ESMTPSA (both), for local delivery too."""
    def deliver(marker: str, tls: bool, auth: bool) -> re.Match:
        with smtp_client(mx.port) as client:
            client.ehlo("client.example.test")
            if tls:
                client.starttls(context=client_context(ca))
            if auth:
                client.login(ALICE, PASSWORD)
            client.sendmail(BOB, [ALICE], f"Subject: {marker}\r\n\r\n{marker}\r\n")
        return received_of(mx.home.wait_for_message(mx.home.maildir(ALICE), marker.encode()))

    tls_only = deliver(unique("esmtps"), tls=True, auth=False)
    assert (tls_only["protocol"], tls_only["user"]) == (b"ESMTPS", None)
    assert TLS_CIPHER.fullmatch(tls_only["cipher"])
    auth_only = deliver(unique("esmtpa"), tls=False, auth=True)
    assert (auth_only["protocol"], auth_only["user"], auth_only["cipher"]) == (b"ESMTPA", ALICE.encode(), None)
    both = deliver(unique("esmtpsa"), tls=True, auth=True)
    assert (both["protocol"], both["user"]) == (b"ESMTPSA", ALICE.encode())
    assert TLS_CIPHER.fullmatch(both["cipher"])
