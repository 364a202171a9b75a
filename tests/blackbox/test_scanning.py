"""Content filtering through the real daemons (Debian's spamd and clamd, on
loopback ports or unix sockets, see tests/support/daemons.py): the
spamassassin and clamav plugins at the data hook, steered by
control/simcontrol; and a daemon gone wrong (stopped, answering garbage,
hung) as the server meets it."""

from __future__ import annotations

import base64
import smtplib
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.daemons import EICAR, EICAR_SIGNATURE, GTUBE, Daemon, Faulty, clamd, spamd
from tests.support.home import DOMAIN, Home, make_home
from tests.support.server import Server
from tests.support.smtpclient import unique
from tests.support.waiting import wait_until

ALICE = f"alice@{DOMAIN}"
OTHER = "other.test"
CAROL = f"carol@{OTHER}"
OUTSIDER = "127.0.0.3"  # no tcp.smtp rights: an Internet sender, spam-checked
TCP_SMTP = '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n'


@pytest.fixture(scope="module")
def daemons(tmp_path_factory) -> Iterator[tuple[Daemon, Daemon]]:
    work = tmp_path_factory.mktemp("daemons")
    spam, virus = spamd(work / "spamd").start(), clamd(work / "clamd").start()
    yield spam, virus
    spam.stop()
    virus.stop()


def scanning_home(root: Path, spam: Daemon | Faulty, virus: Daemon | Faulty, simcontrol: str) -> Home:
    home = make_home(root, tcp_smtp=TCP_SMTP)
    home.qtwist("domain", "add", OTHER)
    home.qtwist("user", "add", CAROL, "--password", "carol-secret")
    home.control("plugins", "clamav\nspamassassin\n")
    home.control("spamdserver", spam.address + "\n")
    home.control("clamdserver", virus.address + "\n")
    home.control("simcontrol", simcontrol)
    return home


def message(marker: str, body: str = "Just a note about lunch on Friday.\n", headers: str = "") -> str:
    return (f"From: <friend@outside.test>\r\nTo: <{ALICE}>\r\nSubject: {marker}\r\n"
            f"Date: Thu, 03 Dec 2026 19:00:00 +0000\r\nMessage-ID: <{marker}@outside.test>\r\n{headers}\r\n"
            f"{body.replace(chr(10), chr(13) + chr(10))}")


def attachment(marker: str, name: str, data: bytes) -> str:
    encoded = base64.encodebytes(data).decode()
    return message(marker, headers="MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=sep\r\n",
                   body=f"--sep\nContent-Type: text/plain\n\nsee attached\n--sep\n"
                        f"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
                        f"Content-Disposition: attachment; filename=\"{name}\"\n\n{encoded}--sep--\n")


def send(server: Server, recipient: str, text: str, timeout: float = 10,
         source: str = OUTSIDER) -> tuple[int, bytes]:
    """The reply to the message's DATA (the code and the text)."""
    with server.smtp(source, timeout) as client:
        client.mail("friend@outside.test")
        assert client.rcpt(recipient)[0] == 250
        try:
            return client.data(text.encode())
        except smtplib.SMTPDataError as refused:
            return refused.smtp_code, refused.smtp_error


@pytest.fixture
def scanning(tmp_path: Path, daemons) -> Iterator[tuple[Server, Home]]:
    spam, virus = daemons
    home = scanning_home(tmp_path, spam, virus, f":clam=yes,spam=yes,spam_hits=12\n{DOMAIN}:attach=.scr:.exe\n")
    with Server(home) as server:
        yield server, home
    assert "Traceback" not in server.log


def test_gtube_is_refused_and_a_clean_message_is_tagged_with_its_score(scanning):
    server, home = scanning
    code, text = send(server, ALICE, message(unique("gtube"), body=GTUBE.decode() + "\n"))
    assert code == 554 and b"spam" in text
    marker = unique("clean")
    assert send(server, ALICE, message(marker))[0] == 250
    stored = home.wait_for_message(home.maildir(ALICE), marker.encode())
    assert b"X-Spam-Status: No, score=" in stored and b"required=5.0" in stored
    assert b"X-Spam-Flag" not in stored
    server.wait_for_log("spamassassin: score")


def test_eicar_is_refused_as_a_body_and_as_a_base64_attachment(scanning):
    server, _ = scanning
    for text in (message(unique("eicar"), body=EICAR.decode() + "\n"),
                 attachment(unique("eicar-attached"), "harmless.txt", EICAR)):
        code, reply = send(server, ALICE, text)
        assert code == 554 and EICAR_SIGNATURE.encode() in reply
    server.wait_for_log(f"clamav: virus {EICAR_SIGNATURE}")


def test_a_listed_attachment_is_refused_for_its_domain_only(scanning):
    server, home = scanning
    code, reply = send(server, ALICE, attachment(unique("screensaver"), "Funny.SCR", b"MZ not really"))
    assert code == 554 and b"Funny.SCR" in reply
    marker = unique("screensaver-for-carol")
    assert send(server, CAROL, attachment(marker, "Funny.SCR", b"MZ not really"))[0] == 250
    home.wait_for_message(home.maildir(CAROL), marker.encode())


def test_broken_mime_is_judged_by_what_can_be_read_and_never_stops_the_server(scanning):
    server, home = scanning
    marker = unique("broken-mime")
    unterminated = message(marker, headers='MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="open\r\n',
                           body="--open\nContent-Disposition: attachment; filename*=utf-8''%ff%fe\n\n\x01junk\n")
    assert send(server, ALICE, unterminated)[0] == 250
    home.wait_for_message(home.maildir(ALICE), marker.encode())
    hidden = message(unique("hidden-exe"), headers="MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n",
                     body="--b\nContent-Disposition: attachment; filename*=bogus''%ff\n\nx\n--b\n"
                          'Content-Disposition: attachment; filename="run.exe"\n\nx\n--b--\n')
    code, reply = send(server, ALICE, hidden)
    assert code == 554 and b"run.exe" in reply


def test_forged_spam_headers_are_removed_before_tagging(scanning):
    server, home = scanning
    marker = unique("forged")
    forged = "X-Spam-Status: No, score=-100.0 required=5.0 tests=FORGED\r\nX-Spam-Flag: NO\r\n  continued\r\n"
    assert send(server, ALICE, message(marker, headers=forged))[0] == 250
    stored = home.wait_for_message(home.maildir(ALICE), marker.encode())
    assert b"FORGED" not in stored and b"continued" not in stored and b"X-Spam-Flag" not in stored
    assert stored.count(b"X-Spam-Status:") == 1


def test_twenty_parallel_sessions_all_get_the_right_verdict(scanning):
    server, home = scanning
    results: dict[str, int] = {}
    texts = {}
    for number in range(20):
        kind = ("clean", "gtube", "eicar")[number % 3]
        marker = unique(f"parallel-{kind}")
        body = {"clean": "Lunch?\n", "gtube": GTUBE.decode() + "\n", "eicar": EICAR.decode() + "\n"}[kind]
        texts[marker] = message(marker, body=body)

    def one(marker: str) -> None:
        results[marker] = send(server, ALICE, texts[marker])[0]
    threads = [threading.Thread(target=one, args=(marker,)) for marker in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {marker: code for marker, code in results.items()} == {
        marker: 250 if "clean" in marker else 554 for marker in texts}
    for marker in texts:
        if "clean" in marker:
            assert b"X-Spam-Status: No" in home.wait_for_message(home.maildir(ALICE), marker.encode())


def test_relay_clients_skip_the_spam_check_unless_spamskiprelay_is_0_but_never_the_virus_scan(
        tmp_path: Path, daemons):
    spam, virus = daemons
    home = scanning_home(tmp_path, spam, virus, ":clam=yes,spam=yes,spam_hits=12\n")
    relay = "127.0.0.1"  # RELAYCLIENT in tcp.smtp
    with Server(home) as server:
        marker = unique("gtube-from-a-relay-client")
        assert send(server, ALICE, message(marker, body=GTUBE.decode() + "\n"), source=relay)[0] == 250
        assert b"X-Spam-Status" not in home.wait_for_message(home.maildir(ALICE), marker.encode())
        assert send(server, ALICE, message(unique("eicar"), body=EICAR.decode() + "\n"), source=relay)[0] == 554
    home.control("spamskiprelay", "0\n")
    with Server(home) as server:
        assert send(server, ALICE, message(unique("gtube"), body=GTUBE.decode() + "\n"), source=relay)[0] == 554
    assert "Traceback" not in server.log


def test_a_message_over_spamsizelimit_skips_the_spam_check_with_a_header_but_not_the_virus_scan(
        tmp_path: Path, daemons):
    spam, virus = daemons
    home = scanning_home(tmp_path, spam, virus, ":clam=yes,spam=yes,spam_hits=12\n")
    home.control("spamsizelimit", "4096\n")
    long = "a line of a long letter\n" * 300
    with Server(home) as server:
        marker = unique("long-gtube")
        forged = "X-Spam-Status: No, score=-100.0 tests=FORGED\r\n"
        assert send(server, ALICE, message(marker, body=GTUBE.decode() + "\n" + long, headers=forged))[0] == 250
        stored = home.wait_for_message(home.maildir(ALICE), marker.encode())
        assert b"X-Qtwist-Scan: spam check skipped, the message is over spamsizelimit (4096 bytes)" in stored
        assert b"FORGED" not in stored
        assert send(server, ALICE, message(unique("long-eicar"), body=EICAR.decode() + "\n" + long))[0] == 554
        server.wait_for_log("spamassassin: not checked")
    assert "Traceback" not in server.log


def test_a_message_over_clamds_stream_limit_is_accepted_unscanned_with_a_header(tmp_path: Path, daemons):
    spam, _ = daemons
    virus = clamd(tmp_path / "clamd", stream_limit="64K").start()
    home = scanning_home(tmp_path / "home", spam, virus, ":clam=yes,spam=no\n")
    try:
        with Server(home) as server:
            marker = unique("big")
            assert send(server, ALICE, message(marker, body="a line of a long letter\n" * 5000))[0] == 250
            stored = home.wait_for_message(home.maildir(ALICE), marker.encode())
            assert b"X-Qtwist-Scan: clamav check skipped, the message is over clamd's stream limit" in stored
            code, reply = send(server, ALICE, message(unique("small-eicar"), body=EICAR.decode() + "\n"))
            assert code == 554
        assert "Traceback" not in server.log
    finally:
        virus.stop()


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_daemon_that_stops_gives_451_or_with_fail_open_a_skip_header(tmp_path: Path, fail_open: bool):
    spam = spamd(tmp_path / "spamd").start()
    virus = clamd(tmp_path / "clamd").start()
    home = scanning_home(tmp_path / "home", spam, virus, ":clam=yes,spam=yes\n")
    if fail_open:
        home.control("filterfailopen", "1\n")
    try:
        with Server(home) as server:
            assert send(server, ALICE, message(unique("before")))[0] == 250
            virus.stop()
            spam.stop()
            marker = unique("daemons-gone")
            code, reply = send(server, ALICE, message(marker))
            if fail_open:
                assert code == 250
                stored = home.wait_for_message(home.maildir(ALICE), marker.encode())
                assert b"X-Qtwist-Scan: clamav check skipped" in stored
                assert b"X-Qtwist-Scan: spamassassin check skipped" in stored
            else:
                assert code == 451 and b"try again later" in reply
                assert not home.messages_with(home.maildir(ALICE), marker.encode())
        assert "Traceback" not in server.log
    finally:
        spam.stop()
        virus.stop()


def test_both_daemons_over_unix_sockets(tmp_path: Path):
    spam = spamd(tmp_path / "spamd", unix=True).start()
    virus = clamd(tmp_path / "clamd", unix=True).start()
    home = scanning_home(tmp_path / "home", spam, virus, ":clam=yes,spam=yes,spam_hits=12\n")
    try:
        assert spam.address.startswith("/") and virus.address.startswith("/")
        with Server(home) as server:
            assert send(server, ALICE, message(unique("gtube"), body=GTUBE.decode() + "\n"))[0] == 554
            assert send(server, ALICE, message(unique("eicar"), body=EICAR.decode() + "\n"))[0] == 554
            marker = unique("clean")
            assert send(server, ALICE, message(marker))[0] == 250
            assert b"X-Spam-Status: No, score=" in home.wait_for_message(home.maildir(ALICE), marker.encode())
        assert "Traceback" not in server.log
    finally:
        spam.stop()
        virus.stop()


@pytest.mark.parametrize("scanner, garbage", [
    ("spamassassin", b"SPAMD/1.1 0 EX_OK\r\nSpam: perhaps ; lots / some\r\n\r\n"),
    ("spamassassin", b"HTTP/1.1 400 Bad Request\r\n\r\n"),
    ("clamav", b"stream: \xff\xfe what is this?\0"),
    ("clamav", b""),
])
@pytest.mark.parametrize("fail_open", [False, True])
def test_a_daemon_answering_garbage_gives_451_or_with_fail_open_a_skip_header(
        tmp_path: Path, daemons, scanner: str, garbage: bytes, fail_open: bool):
    spam, virus = daemons
    with Faulty(garbage) as faulty:
        home = scanning_home(tmp_path, faulty if scanner == "spamassassin" else spam,
                             faulty if scanner == "clamav" else virus, ":clam=yes,spam=yes\n")
        if fail_open:
            home.control("filterfailopen", "1\n")
        with Server(home) as server:
            marker = unique("garbage")
            code, reply = send(server, ALICE, message(marker))
            assert faulty.requests == 1
            if fail_open:
                assert code == 250
                stored = home.wait_for_message(home.maildir(ALICE), marker.encode())
                assert f"X-Qtwist-Scan: {scanner} check skipped, its daemon failed".encode() in stored
            else:
                assert code == 451 and b"try again later" in reply
                assert not home.messages_with(home.maildir(ALICE), marker.encode())
            # A virus still meets the daemon that works.
            if scanner == "spamassassin":
                assert send(server, ALICE, message(unique("eicar"), body=EICAR.decode() + "\n"))[0] == 554
            server.wait_for_log(f"{scanner}: ")
        assert "Traceback" not in server.log


def test_a_hung_daemon_gives_451_after_plugintimeout_and_blocks_no_other_session(tmp_path: Path, daemons):
    spam, _ = daemons
    with Faulty(None) as hung:
        home = scanning_home(tmp_path, spam, hung, f":clam=yes,spam=no\n{OTHER}:clam=no,spam=no\n")
        home.control("plugintimeout", "4\n")
        with Server(home) as server:
            stuck: dict[str, tuple[int, bytes]] = {}
            marker = unique("stuck")
            waiting = threading.Thread(target=lambda: stuck.update(alice=send(server, ALICE, message(marker), 30)))
            waiting.start()
            wait_until(lambda: hung.requests == 1, "the message to reach the hung clamd")
            # Meanwhile another session goes through, its recipient unscanned.
            other = unique("meanwhile")
            assert send(server, CAROL, message(other).replace(ALICE, CAROL))[0] == 250
            home.wait_for_message(home.maildir(CAROL), other.encode())
            assert waiting.is_alive()
            waiting.join(30)
            code, reply = stuck["alice"]
            assert code == 451 and b"try again later" in reply
            assert not home.messages_with(home.maildir(ALICE), marker.encode())
            server.wait_for_log("clamav: no answer from")
        assert "Traceback" not in server.log
