"""A real ``twistd qmail`` with its users in vpopmail's SQL tables (MariaDB
and PostgreSQL on 127.0.0.1): logins, mail and grants as clients see them,
the database failing under it, and two nodes sharing one database."""

from __future__ import annotations

import os
import poplib
import smtplib
import ssl
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from qtwist.sqldb import Database, parse_userdb
from qtwist.sqlusers import SQLUserStore
from tests.support.databases import KINDS, Proxy, ScratchDatabase, fresh_database, lastauth_table, user_table
from tests.support.home import DOMAIN, Home, make_home
from tests.support.pop3client import SourcedPOP3
from tests.support.server import Server
from tests.support.smtpclient import unique
from tests.support.waiting import DEADLINE, poll, wait_until

JOE = f"joe@{DOMAIN}"
SECRET = "it's 100% s3cr"  # vpopmail's MySQL pw_clear_passwd holds 16 characters
OUTSIDER = "127.0.0.3"  # tcp.smtp gives it no rights: it relays only by a POP grant
TCP_SMTP = '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n'


@pytest.fixture(params=KINDS)
def database(request) -> Iterator[ScratchDatabase]:
    with fresh_database(request.param) as scratch:
        scratch.execute(user_table(scratch.kind, "5.6"), lastauth_table(scratch.kind))
        yield scratch


def sql_home(root: Path, url: str) -> Home:
    """A home whose users live at ``url``, with joe (clear text stored) in it."""
    home = make_home(root, users=(), tcp_smtp=TCP_SMTP, controls={"selfsignedcert": "1\n"})
    home.control("userdb", url + "\n")
    home.qtwist("user", "add", JOE, "--password", SECRET, "--cleartext")
    return home


def tls_smtp(server: Server, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = server.smtp(source)
    client.starttls(context=ssl._create_unverified_context())
    return client


def pop3_login(server: Server, user: str = JOE, password: str = SECRET, source: str = "127.0.0.1") -> int:
    """Log in by POP3 from ``source``; the number of messages in the maildrop."""
    client = SourcedPOP3(server.pop3_port, source)
    try:
        client.user(user)
        client.pass_(password)
        return client.stat()[0]
    finally:
        client.quit()


def rcpt_reply(server: Server, recipient: str, source: str = OUTSIDER) -> tuple[int, bytes]:
    with server.smtp(source) as client:
        client.mail("sender@outside.test")
        return client.rcpt(recipient)


def may_relay(server: Server, source: str) -> bool:
    with server.smtp(source) as client:
        client.mail("sender@outside.test")
        code, _ = client.rcpt("someone@remote.test")
        return code == 250


def test_users_in_sql_log_in_by_every_mechanism_and_get_their_mail(tmp_path: Path, database: ScratchDatabase):
    home = sql_home(tmp_path, database.url)
    home.control("plugins", "chkuser\n")
    with Server(home, pop3=True) as server:
        for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
            with tls_smtp(server) as client:
                client.user, client.password = JOE, SECRET
                code, _ = client.auth(mechanism, getattr(client, "auth_" + mechanism.lower().replace("-", "_")))
                assert code == 235, mechanism
        marker = unique("sql-delivery")
        with server.smtp(OUTSIDER) as client:
            client.sendmail("friend@outside.test", [JOE], f"Subject: {marker}\r\n\r\nhello\r\n")
            client.mail("friend@outside.test")
            assert client.rcpt(f"nobody@{DOMAIN}")[0] == 550  # chkuser asks the database
        home.wait_for_message(home.maildir(JOE), marker.encode())
        assert pop3_login(server) == 1
        apop = poplib.POP3("127.0.0.1", server.pop3_port, timeout=DEADLINE)
        apop.apop(JOE, SECRET)  # the clear-text column makes APOP possible
        apop.quit()
        wait_until(lambda: database.rows("SELECT remote_ip FROM lastauth"), "the lastauth row")
        assert database.rows("SELECT domain, remote_ip FROM lastauth") == [(DOMAIN, "127.0.0.1")]
        wait_until(lambda: database.rows("SELECT ip_addr FROM relay") == [("127.0.0.1",)], "the relay row")
    assert "Traceback" not in server.log


def test_the_database_failing_gives_temporary_failures_only(tmp_path: Path, database: ScratchDatabase):
    proxy = Proxy(database.port)
    database.port = proxy.port
    home = sql_home(tmp_path, database.url)
    try:
        with Server(home, pop3=True) as server:
            pop3_login(server, source=OUTSIDER)
            wait_until(lambda: may_relay(server, OUTSIDER), "the POP grant")

            proxy.cut()
            # The relay table is read every half second: the outage is known within a second.
            wait_until(lambda: rcpt_reply(server, JOE)[0] == 451, "RCPT to a local user to get 451")
            outages, recoveries = server.log.count("cannot be reached"), server.log.count("reachable again")
            assert b"user database" in rcpt_reply(server, JOE)[1]
            assert rcpt_reply(server, "someone@remote.test")[0] == 553  # the grant is not trusted blindly
            with tls_smtp(server) as client:
                with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                    client.login(JOE, SECRET)
                assert refused.value.smtp_code == 454
            with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                pop3_login(server)
            marker = unique("queued-in-outage")
            home.qtwist("sendmail", JOE, stdin=f"Subject: {marker}\n\nwaits for the database\n")
            server.wait_for_log("deferral: Temporary_failure:_the_user_database_is_unavailable")

            proxy.restore()
            wait_until(lambda: server.log.count("reachable again") > recoveries, "the recovery's log line")

            def retried_and_delivered() -> bool:
                # The delivery child tries the database again a second after its own failure.
                home.qtwist("queue", "flush")
                return bool(poll(lambda: home.messages_with(home.maildir(JOE), marker.encode()), 1.0))
            wait_until(retried_and_delivered, "the deferred delivery to be retried and done")
            assert pop3_login(server) == 1
        log = server.log
        # One line when the outage began, one when it ended: none for each failed call in between.
        assert log.count("cannot be reached") == outages and log.count("reachable again") == recoveries + 1
        assert "bounce msg" not in log and "Traceback" not in log
    finally:
        proxy.close()


def test_a_hung_database_gives_temporary_failures_within_seconds(tmp_path: Path, database: ScratchDatabase):
    """The database accepts connections but answers nothing (a hung server)."""
    proxy = Proxy(database.port)
    database.port = proxy.port
    home = sql_home(tmp_path, database.url)
    home.qtwist("user", "add", f"ann@{DOMAIN}", "--password", "ann-secret")
    try:
        with Server(home, pop3=True) as server:
            assert pop3_login(server) == 0
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                pop3_login(server, f"ann@{DOMAIN}", "ann-secret")  # not in the cache: the database is asked
            assert time.monotonic() - started < 8
            with server.smtp(OUTSIDER) as client:
                client.mail("sender@outside.test")
                assert client.rcpt(JOE)[0] == 451
            proxy.restore()
            wait_until(lambda: _logs_in(server, JOE, SECRET), "logins to work again", timeout=20)
        assert "Traceback" not in server.log
    finally:
        proxy.close()


def test_a_wrong_password_in_the_url_is_one_clear_line_at_start(tmp_path: Path, database: ScratchDatabase):
    user = "root" if database.kind == "mysql" else "nobody_here"
    home = sql_home(tmp_path, database.url)
    home.control("userdb", f"{database.kind}://{user}:wrong-secret@127.0.0.1:{database.port}/no_such_db\n")
    with Server(home, pop3=True) as server:
        server.wait_for_log("cannot be reached")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            pop3_login(server)
    assert "wrong-secret" not in server.log and "Traceback" not in server.log


# -- two nodes -------------------------------------------------------------------------------------

def node_home(root: Path, shared: Home) -> Home:
    """A second node: its own queue, the first one's control/, domains/ and database."""
    root.mkdir()
    for name in ("control", "domains", "alias"):
        os.symlink(shared.path / name, root / name)
    (root / "tcp.smtp").write_text(TCP_SMTP)
    return Home(root)


def test_two_nodes_act_as_one_system(tmp_path: Path, database: ScratchDatabase):
    home_a = sql_home(tmp_path / "a", database.url)
    home_b = node_home(tmp_path / "b", home_a)
    with Server(home_a, pop3=True) as node_a, Server(home_b, pop3=True) as node_b:
        # A POP3 login on A lets that address relay through B within a second.
        source = "127.0.0.4"
        assert not may_relay(node_b, source)
        pop3_login(node_a, source=source)
        started = time.monotonic()
        wait_until(lambda: may_relay(node_b, source), "B to honour A's grant", timeout=3)
        assert time.monotonic() - started < 1.5

        # A user added through A logs in on B within a second.
        home_a.qtwist("user", "add", f"ann@{DOMAIN}", "--password", "ann-secret")
        started = time.monotonic()
        wait_until(lambda: _logs_in(node_b, f"ann@{DOMAIN}", "ann-secret"), "ann on B", timeout=3)
        assert time.monotonic() - started < 1.5

        # Both nodes under load at once, for one mailbox: each message exactly once.
        sent: list[str] = []
        lock = threading.Lock()

        def send(node: Server, label: str) -> None:
            for number in range(40):
                marker = unique(f"{label}-{number}")
                with node.smtp() as client:
                    client.sendmail("load@outside.test", [JOE], f"Subject: {marker}\r\n\r\n{marker}\r\n")
                with lock:
                    sent.append(marker)
        senders = [threading.Thread(target=send, args=(node, label)) for node, label in ((node_a, "a"),
                                                                                          (node_b, "b"))]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(120)
        assert len(sent) == 80
        maildir = home_a.maildir(JOE)
        wait_until(lambda: len(home_a.mailbox(maildir)) >= 80, "80 deliveries", timeout=60)
        bodies = list(home_a.mailbox(maildir).values())
        assert sorted(sum(body.count(marker.encode()) > 0 for body in bodies) for marker in sent) == [1] * 80
        assert len(bodies) == 80
        # A POP3 session on B sees what A delivered (and B's own).
        assert pop3_login(node_b) == 80
    for node in (node_a, node_b):
        assert "Traceback" not in node.log


def _logs_in(server: Server, user: str, password: str) -> bool:
    try:
        pop3_login(server, user, password)
    except poplib.error_proto:
        return False
    return True


def test_the_store_reads_what_the_server_wrote(tmp_path: Path, database: ScratchDatabase):
    """The command and the server agree on where a user's mail lives."""
    home = sql_home(tmp_path, database.url)
    store = SQLUserStore(tmp_path, Database(parse_userdb(database.url)))
    joe = store.lookup(JOE)
    assert joe.maildir == home.maildir(JOE)
    assert (joe.cleartext, joe.quota, joe.uid, joe.gid) == (SECRET, "NOQUOTA", 1, 0)
