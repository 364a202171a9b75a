"""What only a real process shows of the connection limits: real sockets from
many loopback addresses, the listen backlog, and a process with few descriptors."""

from __future__ import annotations

import resource
import socket
import subprocess
from contextlib import ExitStack
from pathlib import Path

from tests.support.home import DOMAIN, ME, make_home
from tests.support.server import Server
from tests.support.smtpclient import read_replies
from tests.support.waiting import DEADLINE, wait_until


def idle_connections(server: Server, sources: list[str], stack: ExitStack) -> list[socket.socket]:
    """One connection from each of ``sources``, left open and silent."""
    return [stack.enter_context(server.connect(source)) for source in sources]


def first_reply(sock: socket.socket) -> bytes:
    (reply,) = read_replies(sock, 1)
    return reply


def test_one_address_gets_its_limit_and_421_beyond_it_while_others_are_served(tmp_path: Path) -> None:
    home = make_home(tmp_path, controls={"concurrencyperip": "5\n"})
    with Server(home) as server, ExitStack() as stack:
        held = idle_connections(server, ["127.0.0.9"] * 7, stack)
        replies = [first_reply(sock) for sock in held]
        assert [reply[:4] for reply in replies] == [b"220 "] * 5 + [b"421 "] * 2
        assert replies[-1] == f"421 {ME} too many connections from your address, try again later (#4.7.0)".encode()
        with server.smtp("127.0.0.10") as client:
            client.sendmail("someone@remote.test", [f"alice@{DOMAIN}"], "Subject: served\r\n\r\nhi\r\n")
        home.wait_for_message(home.maildir(f"alice@{DOMAIN}"), b"Subject: served")


def test_a_client_at_its_limit_that_reconnects_after_each_quit_is_never_refused(tmp_path: Path) -> None:
    """smtp-source's pattern: N sessions, each reconnecting as soon as it reads
    221 (or +OK at POP3 QUIT), while the server may not have seen the old
    socket close yet."""
    home = make_home(tmp_path, controls={"concurrencyperip": "3\n", "pop3concurrencyperip": "3\n"})
    with Server(home, pop3=True) as server, ExitStack() as stack:
        for port, quit_reply in ((server.port, b"221 "), (server.pop3_port, b"+OK")):
            held = [stack.enter_context(server.connect("127.0.0.9", port=port)) for _ in range(3)]
            greetings = [first_reply(sock) for sock in held]
            for turn in range(60):
                sock = held[turn % 3]
                sock.sendall(b"QUIT\r\n")
                assert sock.recv(512).startswith(quit_reply)
                sock = held[turn % 3] = stack.enter_context(server.connect("127.0.0.9", port=port))
                greetings.append(first_reply(sock))
            assert [g for g in greetings if not g.startswith((b"220 ", b"+OK"))] == []


def test_listeners_get_a_backlog_of_1024(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    with Server(home) as server:
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True,
                                   timeout=DEADLINE, check=True).stdout.split()
        assert listening[2] == "1024", listening  # Send-Q of a listening socket is its backlog


def few_descriptors() -> None:
    """In the server's child process before exec: as if the system gave it only 400."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))


def test_with_few_descriptors_the_server_warns_keeps_a_reserve_and_recovers(tmp_path: Path) -> None:
    home = make_home(tmp_path, controls={"concurrencyperip": "0\n"})
    server = Server(home)
    with ExitStack() as stack:
        server.start(preexec_fn=few_descriptors)
        stack.callback(server.stop)
        server.wait_for_log("descriptors: 400 may be open (hard limit 400)")
        assert "allow more clients than the" in server.log
        budget = int(server.log.split("descriptors: 400 may be open (hard limit 400); ")[1].split()[0])
        flood = ExitStack()
        stack.enter_context(flood)
        # More than the budget: the ones beyond it wait in the listen backlog.
        held = idle_connections(server, [f"127.0.1.{n % 200 + 1}" for n in range(budget + 40)], flood)
        wait_until(lambda: "reach the budget of" in server.log, "the listeners to stop accepting")
        assert first_reply(held[0]).startswith(b"220 ")
        # The server's own work still has its descriptors: a message injected now is delivered.
        home.qtwist("sendmail", f"alice@{DOMAIN}", stdin="Subject: reserve\n\nstill delivered\n")
        home.wait_for_message(home.maildir(f"alice@{DOMAIN}"), b"Subject: reserve")
        flood.close()
        # The listeners accept again: a new client is greeted.
        with server.smtp("127.0.0.10") as client:
            assert client.noop()[0] == 250
        assert "Traceback" not in server.log
