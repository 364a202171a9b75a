"""Plugins against a real `twistd qmail`: the shipped rbl, spf, chkuser and dkim
with a local DNS server, a third-party plugin package installed with pip, and
plugins that fail or never answer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.fakesmtp import FakeSMTP
from tests.support.home import DOMAIN, child_environment, make_home
from tests.support.server import Server, session
from tests.support.smtpclient import ask, read_replies, unique, wire
from tests.support.dns import ZoneServer

REPO = Path(__file__).resolve().parents[2]
ALICE = f"alice@{DOMAIN}"
LISTED = "127.0.0.2"  # the DNSBL lists this client
PLAIN = "127.0.0.3"   # no tcp.smtp rights, not listed
TCP_SMTP = f"127.0.0.1:allow,RELAYCLIENT=\"\"\n{LISTED}:allow\n{PLAIN}:allow\n127.0.0.4:allow,RBLSMTPD=\"\"\n" \
           "127.0.0.5:allow,RBLSMTPD=\"-go away\"\n127.0.0.6:allow,SPFBEHAVIOR=\"1\"\n"

ZONE = {
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ['"listed in bl.test for testing"']},
    "2.0.0.127.perm.test": {"A": ["127.0.0.2"]},
    "fail.test": {"TXT": ['"v=spf1 -all"'], "MX": ["10 mx.fail.test."]},
    "pass.test": {"TXT": ['"v=spf1 ip4:127.0.0.0/8 -all"'], "A": ["127.0.0.9"]},
    "soft.test": {"TXT": ['"v=spf1 ~all"'], "A": ["127.0.0.9"]},
    "nomx.test": {"TXT": ['"v=spf1 ?all"']},
}


@pytest.fixture
def dns_server():
    server = ZoneServer(ZONE, servfail=frozenset({"broken.test"}))
    yield server
    server.stop()


@pytest.fixture
def start(tmp_path, dns_server):
    """start(plugins, controls=...) -> a running server with those plugins enabled."""
    servers = []

    def starting(plugins: list[str], controls: dict[str, str] | None = None, pythonpath: Path | None = None,
                 users: tuple[str, ...] = ("alice", "bob")) -> Server:
        controls = dict(controls or {})
        controls["plugins"] = "".join(f"{name}\n" for name in plugins)
        home = make_home(tmp_path / f"home{len(servers)}", controls=controls, tcp_smtp=TCP_SMTP, users=users)
        server = Server(home, dns_port=dns_server.address[1], extra_path=pythonpath)
        servers.append(server)
        return server.start()
    yield starting
    for server in servers:
        server.stop()


def transaction(server: Server, sender: str, recipients: list[str], source: str = PLAIN,
                body: bytes = b"Subject: test\n\nhello\n") -> list[bytes]:
    """HELO, MAIL, RCPTs and (if any RCPT got 250) DATA; the replies."""
    with session(server, source) as sock:
        replies = ask(sock, "HELO client.example.test", f"MAIL FROM:<{sender}>",
                      *(f"RCPT TO:<{r}>" for r in recipients))
        if any(reply.startswith(b"250") for reply in replies[2:]):
            replies += ask(sock, "DATA")
            if replies[-1].startswith(b"354"):
                sock.sendall(wire(body) + b".\r\n")
                replies += read_replies(sock, 1)
    return replies


# -- the qtwist plugins command ------------------------------------------------------------------

def test_plugins_command_lists_installed_and_enabled_in_order(tmp_path):
    home = make_home(tmp_path / "home", controls={"plugins": "chkuser\nrbl\n"})
    listed = home.qtwist("plugins").stdout
    lines = {line.split()[0]: line for line in listed.splitlines() if line.strip()}
    for name in ("rbl", "spf", "chkuser", "dkim"):
        assert name in lines, listed
    assert "enabled 1" in lines["chkuser"] and "enabled 2" in lines["rbl"], listed
    assert "enabled" not in lines["spf"] and "enabled" not in lines["dkim"], listed


# -- rbl -------------------------------------------------------------------------------------------

def test_rbl_refuses_a_listed_client_at_mail_with_the_txt_text(start):
    server = start(["rbl"], {"rblservers": "bl.test\n"})
    listed = transaction(server, "someone@remote.test", [ALICE], source=LISTED)
    assert listed[1] == b"451 listed in bl.test for testing"
    clean = transaction(server, "someone@remote.test", [ALICE], source=PLAIN)
    assert clean[1:3] == [b"250 ok", b"250 ok"] and clean[-1].startswith(b"250 ok ")


def test_rbl_zone_with_a_dash_refuses_for_good(start):
    server = start(["rbl"], {"rblservers": "-perm.test\n"})
    assert transaction(server, "someone@remote.test", [ALICE], source=LISTED)[1] == \
        b"553 127.0.0.2 is listed in perm.test"


def test_rbl_follows_rblsmtpd_from_tcp_smtp_and_spares_relay_clients(start):
    server = start(["rbl"], {"rblservers": "bl.test\n"})
    assert transaction(server, "someone@remote.test", [ALICE], source="127.0.0.4")[1] == b"250 ok"
    assert transaction(server, "someone@remote.test", [ALICE], source="127.0.0.5")[1] == b"553 go away"
    assert transaction(server, "someone@remote.test", [ALICE], source="127.0.0.1")[1] == b"250 ok"


# -- spf -------------------------------------------------------------------------------------------

def test_spf_fail_is_refused_at_spfbehavior_3_and_pass_gets_received_spf(start):
    server = start(["spf"], {"spfbehavior": "3\n"})
    refused = transaction(server, "someone@fail.test", [ALICE])
    assert refused[1].startswith(b"550 sorry, SPF fail for <someone@fail.test>")
    marker = unique("spf")
    accepted = transaction(server, "someone@pass.test", [ALICE], body=f"Subject: {marker}\n\nhi\n".encode())
    assert accepted[-1].startswith(b"250 ok ")
    stored = server.home.wait_for_message(server.home.maildir(ALICE), marker.encode())
    assert b"\nReceived-SPF: pass " in stored
    assert stored.index(b"Received-SPF:") < stored.index(b"Received: from")


def test_spf_softfail_passes_at_3_and_is_refused_at_4(start):
    assert transaction(start(["spf"], {"spfbehavior": "3\n"}), "a@soft.test", [ALICE])[1] == b"250 ok"
    assert transaction(start(["spf"], {"spfbehavior": "4\n"}), "a@soft.test", [ALICE])[1].startswith(b"550 ")


def test_spf_annotates_only_at_1_and_tcp_smtp_overrides(start):
    server = start(["spf"], {"spfbehavior": "6\n"})
    assert transaction(server, "someone@nomx.test", [ALICE])[1].startswith(b"550 ")
    marker = unique("annotate")
    replies = transaction(server, "someone@fail.test", [ALICE], source="127.0.0.6",
                          body=f"Subject: {marker}\n\nhi\n".encode())
    assert replies[-1].startswith(b"250 ok ")
    stored = server.home.wait_for_message(server.home.maildir(ALICE), marker.encode())
    assert b"\nReceived-SPF: fail " in stored


def test_spf_dns_failure_is_temporary_from_spfbehavior_2(start):
    server = start(["spf"], {"spfbehavior": "2\n"})
    assert transaction(server, "someone@broken.test", [ALICE])[1].startswith(b"451 SPF lookup")


# -- chkuser ---------------------------------------------------------------------------------------

def test_chkuser_refuses_unknown_local_mailboxes_at_rcpt(start):
    server = start(["chkuser"])
    replies = transaction(server, "someone@remote.test", [f"nobody@{DOMAIN}", ALICE])
    assert replies[2] == b"550 5.1.1 sorry, no mailbox here by that name (chkuser)"
    assert replies[3] == b"250 ok"
    assert replies[-1].startswith(b"250 ok ")


def test_chkuser_refuses_a_full_mailbox_with_552(start):
    server = start(["chkuser"])
    carol = f"carol@{DOMAIN}"
    server.home.qtwist("user", "add", carol, "--password", "x", "--quota", "10")
    maildir = server.home.maildir(carol)
    (maildir / "new").mkdir(parents=True, exist_ok=True)
    (maildir / "new" / "1.old.host,S=100").write_bytes(b"x" * 100)
    replies = transaction(server, "someone@remote.test", [carol])
    assert replies[2] == b"552 5.2.2 sorry, mailbox full (chkuser)"


def test_chkuser_sender_check_wants_mx_or_a(start):
    server = start(["chkuser"], {"chkusersender": "1\n"})
    assert transaction(server, "a@nomx.test", [ALICE])[1] == \
        b"550 5.1.8 sorry, can't find a valid MX for sender domain (chkuser)"
    assert transaction(server, "a@fail.test", [ALICE])[1] == b"250 ok"
    assert transaction(server, "a@pass.test", [ALICE])[1] == b"250 ok"


# -- dkim ------------------------------------------------------------------------------------------

def test_dkim_signs_outbound_mail_that_verifies(start):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    sink = FakeSMTP()
    try:
        server = start(["dkim"], {"smtproutes": f"remote.test:127.0.0.1:{sink.port}\n"})
        keys = server.home.path / "control" / "dkim"
        keys.mkdir()
        (keys / f"{DOMAIN}.key").write_bytes(private)
        (keys / f"{DOMAIN}.selector").write_text("sel\n")
        marker = unique("dkim")
        body = f"From: Alice <{ALICE}>\nTo: x@remote.test\nSubject: {marker}\n\nsigned\n".encode()
        assert transaction(server, ALICE, ["x@remote.test"], source="127.0.0.1", body=body)[-1].startswith(b"250")
        sent = sink.wait_for(marker.encode())
    finally:
        sink.close()
    assert sent.data.startswith(b"DKIM-Signature: ")
    assert b"d=example.test" in sent.data and b"s=sel" in sent.data
    record = b"v=DKIM1; k=rsa; p=" + __import__("base64").b64encode(public)
    assert dkim.verify(sent.data, dnsfunc=lambda name, timeout=5: record
                       if name == b"sel._domainkey.example.test." else None)


# -- third-party plugins ---------------------------------------------------------------------------

@pytest.fixture
def thirdparty(tmp_path) -> Path:
    """The package in tests/thirdparty_plugin, installed with pip into its own folder."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "tests" / "thirdparty_plugin", source)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                    "--target", str(target), str(source)], check=True, timeout=120, env=child_environment())
    return target


def test_thirdparty_plugin_loads_rejects_and_adds_headers(start, thirdparty):
    server = start(["spamtrap"], pythonpath=thirdparty)
    listed = server.home.qtwist("plugins", extra_path=thirdparty).stdout
    assert "spamtrap" in listed and "broken" in listed
    marker = unique("thirdparty")
    replies = transaction(server, "someone@remote.test", [f"trap@{DOMAIN}", ALICE],
                          body=f"Subject: {marker}\n\nhi\n".encode())
    assert replies[2] == b"550 5.7.1 that address is a spam trap"
    assert replies[-1].startswith(b"250 ok ")
    stored = server.home.wait_for_message(server.home.maildir(ALICE), marker.encode())
    assert f"\nX-Spamtrap: checked for {PLAIN}\n".encode() in stored


def test_plugin_that_raises_or_hangs_gives_451_and_the_server_goes_on(start, thirdparty):
    server = start(["broken"], {"plugintimeout": "1\n"}, pythonpath=thirdparty)
    replies = transaction(server, "someone@remote.test", [f"crash@{DOMAIN}", f"hang@{DOMAIN}", ALICE])
    assert replies[2].startswith(b"451 ") and replies[3].startswith(b"451 ")
    assert replies[4] == b"250 ok" and replies[-1].startswith(b"250 ok ")
    assert "this plugin is broken on purpose" in server.log
    assert transaction(server, "someone@remote.test", [ALICE])[-1].startswith(b"250 ok ")


def test_unknown_plugin_name_is_logged_and_mail_still_flows(start):
    server = start(["no-such-plugin", "chkuser"])
    assert transaction(server, "someone@remote.test", [f"nobody@{DOMAIN}"])[2].startswith(b"550 5.1.1")
    server.wait_for_log("no installed plugin is named 'no-such-plugin'")
