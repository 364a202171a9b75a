#!/usr/bin/env python3
"""An MX under an idle-connection flood: is a well-behaved client still served?

Starts the installed `twistd qmail` on a fresh home (tcp.smtp treats every
client as an ordinary Internet client: no RELAYCLIENT) with the server's
descriptor limit at --nofile (1,024, soft and hard, as many systems give a
service).  Then:

1. opens --flood-one idle SMTP connections from one address (127.0.1.1) and
   --flood-many from --addresses other addresses (127.0.0.x), and reads the
   first reply of each (220, or the server's 421);
2. sends one message from yet another address (127.0.2.1) and prints how long
   it waited for its 250, and whether the message reached the Maildir;
3. injects a message with `qtwist sendmail` and prints how long it took to
   reach the Maildir (the server's own work must still have descriptors).

Then, on a server with the limits opened up (concurrencyincoming 20000, no
per-address limit, the system's descriptor limit), it prints the server's
RSS with --idle-low and with --idle-high idle connections held open.

    python bench/flood.py [--nofile 1024] [--flood-one 5000] [--flood-many 2000]
                          [--idle-low 1000] [--idle-high 10000]

Everything stays on loopback; every wait is bounded by --max-seconds.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from accept import qtwist, tool
from tests.support.waiting import free_port, listening, poll

GOOD_CLIENT = "127.0.2.1"
MESSAGE = b"From: <good@client.test>\r\nSubject: flood-bench\r\n\r\nserved\r\n"


class Server:
    """`twistd -n qmail` on a loopback port for ``home``, with its descriptor limit."""

    def __init__(self, home: Path, log: Path, nofile: int | None) -> None:
        self.home = home
        self.port = free_port()
        self.log = log
        command = [tool("twistd"), "-n", "--pidfile=", "qmail", "--home", str(home),
                   "--smtp", f"tcp:{self.port}:interface=127.0.0.1", "--submission", "none", "--pop3", "none"]

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=limit)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def make_home(home: Path, controls: dict[str, str]) -> Path:
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_text("mx.flood.test\n")
    for name, value in controls.items():
        (home / "control" / name).write_text(value + "\n")
    (home / "tcp.smtp").write_text(":allow\n")
    qtwist(home, "domain", "add", "example.test")
    qtwist(home, "user", "add", "joe@example.test", "--password", "bench-pass")
    return home


def idle(port: int, source: str, stack: ExitStack, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    return stack.enter_context(sock)


def first_reply_codes(sockets: list[socket.socket]) -> dict[str, int]:
    """How many got a 220 and how many a 421 (or nothing, or a closed connection)."""
    counts: dict[str, int] = {}
    for sock in sockets:
        try:
            code = sock.recv(4)[:3].decode("ascii", "replace") or "closed"
        except OSError:
            code = "error"
        counts[code] = counts.get(code, 0) + 1
    return counts


def send_one(port: int, timeout: float) -> tuple[float, bytes]:
    """(seconds from connect to the 250 after DATA, that reply)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(GOOD_CLIENT, 0)) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            while True:
                line = reader.readline()
                if not line or line[3:4] != b"-":
                    return line.rstrip()

        replies = [reply()]
        for command in (b"EHLO good.client.test", b"MAIL FROM:<good@client.test>",
                        b"RCPT TO:<joe@example.test>", b"DATA", MESSAGE + b"."):
            if replies[-1][:1] not in (b"2", b"3"):
                return time.monotonic() - started, b" / ".join(replies)
            sock.sendall(command + b"\r\n")
            replies.append(reply())
        waited = time.monotonic() - started
        sock.sendall(b"QUIT\r\n")
    return waited, replies[-1]


def maildir_has(home: Path, marker: bytes) -> bool:
    new = home / "domains" / "example.test" / "joe" / "Maildir" / "new"
    return any(marker in path.read_bytes() for path in new.iterdir()) if new.is_dir() else False


def flood(args: argparse.Namespace, work: Path) -> bool:
    home = make_home(work / "flood", {})
    server = Server(home, work / "flood.log", args.nofile)
    try:
        if not poll(lambda: listening("127.0.0.1", server.port), 20):
            print(f"server did not start; see {server.log}")
            return False
        with ExitStack() as stack:
            started = time.monotonic()
            one = [idle(server.port, "127.0.1.1", stack, args.max_seconds) for _ in range(args.flood_one)]
            many = [idle(server.port, f"127.0.0.{2 + n % args.addresses}", stack, args.max_seconds)
                    for n in range(args.flood_many)]
            opened = time.monotonic() - started
            print(f"flood: {len(one)} idle connections from 127.0.1.1 and {len(many)} from {args.addresses} "
                  f"other addresses opened in {opened:.1f} s (server descriptor limit {args.nofile})")
            print(f"flood: first replies from 127.0.1.1: {first_reply_codes(one)}; "
                  f"from the others: {first_reply_codes(many)}")
            print(f"flood: server RSS {server.rss_mib():.0f} MiB")
            waited, reply = send_one(server.port, args.max_seconds)
            served = reply.startswith(b"250")
            print(f"good client from {GOOD_CLIENT}: {reply.decode('latin-1')!r} after {waited * 1000:.0f} ms")
            delivered = poll(lambda: maildir_has(home, b"Subject: flood-bench"), args.max_seconds, 0.02)
            print(f"good client's message delivered: {bool(delivered)}")
            injected = time.monotonic()
            subprocess.run([tool("qtwist"), "--home", str(home), "sendmail", "joe@example.test"], check=True,
                           input=b"Subject: flood-sendmail\n\nstill works\n", timeout=args.max_seconds)
            arrived = poll(lambda: maildir_has(home, b"Subject: flood-sendmail"), args.max_seconds, 0.02)
            print(f"qtwist sendmail during the flood: delivered={bool(arrived)} "
                  f"in {time.monotonic() - injected:.2f} s")
        tracebacks = server.log.read_text(errors="replace").count("Traceback")
        print(f"tracebacks in the server log: {tracebacks}")
        return served and bool(delivered) and bool(arrived) and not tracebacks
    finally:
        server.stop()


def memory(args: argparse.Namespace, work: Path) -> bool:
    home = make_home(work / "memory", {"concurrencyincoming": "20000", "concurrencyperip": "0"})
    server = Server(home, work / "memory.log", None)
    try:
        if not poll(lambda: listening("127.0.0.1", server.port), 20):
            print(f"server did not start; see {server.log}")
            return False
        with ExitStack() as stack:
            held: list[socket.socket] = []
            for target in (args.idle_low, args.idle_high):
                before = len(held)
                while len(held) < target:
                    held.append(idle(server.port, f"127.0.3.{1 + len(held) % 200}", stack, args.max_seconds))
                # Each greeting read proves its session exists before the RSS is taken.
                greeted = first_reply_codes(held[before:])
                print(f"memory: {len(held)} idle connections held, server RSS {server.rss_mib():.0f} MiB "
                      f"(first replies of the new ones: {greeted})")
        return True
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nofile", type=int, default=1024, help="the flood server's descriptor limit")
    parser.add_argument("--flood-one", type=int, default=5000)
    parser.add_argument("--flood-many", type=int, default=2000)
    parser.add_argument("--addresses", type=int, default=100)
    parser.add_argument("--idle-low", type=int, default=1000)
    parser.add_argument("--idle-high", type=int, default=10000)
    parser.add_argument("--work", default=None, help="directory for the run's files")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--max-seconds", type=float, default=60)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.flood_one + args.flood_many + args.idle_high + 100
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    work = Path(tempfile.mkdtemp(prefix="qtwist-flood-", dir=args.work))
    try:
        good = flood(args, work)
        good = memory(args, work) and good
    finally:
        if args.keep or not good:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
