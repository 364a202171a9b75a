#!/usr/bin/env python3
"""POP3 logins and retrievals per second of `twistd qmail`.

Starts qtwist on a fresh home with USERS mailbox users (sha512-crypt
passwords, as `qtwist user add` writes them) and POP3 on a loopback port, then

  (a) logins: CLIENTS parallel clients, each from its own 127.0.0.x address,
      repeat connect / USER / PASS / QUIT (every login records a
      POP-before-SMTP grant) until LOGINS logins are done or LOGIN_SECONDS
      have passed; prints logins/s, the per-hour rate and latencies;
  (b) retrieval: every user's Maildir is filled with MESSAGES files of SIZE
      bytes (written directly, as a delivery agent would), then CLIENTS
      parallel sessions log in and RETR every message one by one; prints
      messages/s and MiB/s.

    python bench/pop3.py [--users 50] [--clients 50] [--logins 5000] [--login-seconds 60]
                         [--messages 40] [--size 10240] [--userdb URL]

With --userdb, users and grants live in that database (control/userdb), so
every login is a look-up there and a write to its relay and lastauth tables.

The load generator is one asyncio thread on raw sockets; its CPU time is
printed next to the server's so it can be seen not to dominate the machine.
Work files go to a fresh directory under --work (default: a temporary
directory) and are left in place, as bench/accept.py does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from accept import _cpu as server_cpu
from accept import tool
from tests.support.waiting import free_port, listening, poll
from qtwist.grants import SQLGrants
from qtwist.sqldb import parse_userdb
from qtwist.sqlusers import SQLUserStore
from qtwist.users import open_store

DOMAIN = "bench.test"
PASSWORD = "bench-pass"
HOST = "127.0.0.1"


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_address(index: int) -> str:
    """127.0.0.2, 127.0.0.3, ...: one grant file per client, as with real customers."""
    return f"127.0.{2 + index // 250}.{2 + index % 250}"


def user_name(index: int) -> str:
    return f"user{index:05d}@{DOMAIN}"


def make_home(work: Path, users: int, userdb: str | None) -> Path:
    """A home with ``users`` users, in vpasswd or in the database at ``userdb``
    (where users of an earlier run are replaced)."""
    home = work / "home"
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_text(f"mx.{DOMAIN}\n")
    if userdb:
        (home / "control" / "userdb").write_text(userdb + "\n")
    db = open_store(home)
    db.add_domain(DOMAIN)
    for index in range(users):
        if userdb and db.lookup(user_name(index)) is not None:
            db.delete_user(user_name(index))
        db.add_user(user_name(index), PASSWORD)
    return home


def grants_recorded(home: Path) -> int:
    """The grant files, or the rows of the database's relay table."""
    db = open_store(home)
    if isinstance(db, SQLUserStore):
        return len(SQLGrants(db.database).list())
    return len(os.listdir(home / "open-smtp")) if (home / "open-smtp").is_dir() else 0


def fill_maildirs(home: Path, users: int, messages: int, size: int) -> None:
    """``messages`` files of ``size`` bytes (LF line ends, as qmail-local writes) in each new/."""
    head = b"From: <bench@source.test>\nSubject: bench\n\n"
    line = b"x" * 78 + b"\n"
    body = (head + line * (size // len(line) + 1))[:size - 1] + b"\n"
    for index in range(users):
        new = home / "domains" / DOMAIN / f"user{index:05d}" / "Maildir" / "new"
        for number in range(messages):
            (new / f"{1_700_000_000 + number}.P{index}Q{number}.mx.{DOMAIN}").write_bytes(body)


class Session:
    """One POP3 connection on raw asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str) -> Session:
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0), limit=1 << 22)
        session = cls(reader, writer)
        await session.expect_ok()
        return session

    async def expect_ok(self) -> bytes:
        line = await self.reader.readline()
        if not line.startswith(b"+OK"):
            raise RuntimeError(line.decode(errors="replace").strip() or "connection closed")
        return line

    async def command(self, text: str) -> bytes:
        self.writer.write(text.encode() + b"\r\n")
        return await self.expect_ok()

    async def login(self, user: str) -> None:
        await self.command(f"USER {user}")
        await self.command(f"PASS {PASSWORD}")

    async def retr(self, number: int) -> int:
        await self.command(f"RETR {number}")
        return len(await self.reader.readuntil(b"\r\n.\r\n"))

    async def quit(self) -> None:
        await self.command("QUIT")
        self.writer.close()
        await self.writer.wait_closed()


async def login_load(port: int, clients: int, logins: int, seconds: float) -> tuple[list[float], list[str]]:
    """Latencies of the completed logins (connect to QUIT's +OK), and the errors."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    started_count = 0

    async def client(index: int) -> None:
        nonlocal started_count
        while started_count < logins and time.monotonic() < deadline:
            started_count += 1
            began = time.monotonic()
            try:
                session = await Session.open(port, client_address(index))
                await session.login(user_name(index))
                await session.quit()
            except (OSError, RuntimeError, asyncio.IncompleteReadError) as error:
                errors.append(str(error))
                continue
            latencies.append(time.monotonic() - began)

    await asyncio.gather(*(client(index) for index in range(clients)))
    return latencies, errors


async def retr_load(port: int, clients: int, messages: int) -> tuple[int, int, list[str]]:
    """(messages retrieved, octets received, errors): each client RETRs its own mailbox."""
    retrieved, octets, errors = 0, 0, []

    async def client(index: int) -> None:
        nonlocal retrieved, octets
        try:
            session = await Session.open(port, client_address(index))
            await session.login(user_name(index))
            count = int((await session.command("STAT")).split()[1])
            if count != messages:
                errors.append(f"{user_name(index)}: STAT says {count}, expected {messages}")
            for number in range(1, count + 1):
                size = await session.retr(number)
                octets += size
                retrieved += 1
            await session.quit()
        except (OSError, RuntimeError, asyncio.IncompleteReadError) as error:
            errors.append(str(error))

    await asyncio.gather(*(client(index) for index in range(clients)))
    return retrieved, octets, errors


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50, help="mailbox users (at least --clients)")
    parser.add_argument("--clients", type=int, default=50, help="parallel POP3 clients")
    parser.add_argument("--logins", type=int, default=5000, help="logins to do in phase (a)")
    parser.add_argument("--login-seconds", type=float, default=60, help="time limit of phase (a)")
    parser.add_argument("--messages", type=int, default=40, help="messages per user for phase (b)")
    parser.add_argument("--size", type=int, default=10240, help="bytes per message")
    parser.add_argument("--work", default=None, help="directory for the run's files")
    parser.add_argument("--userdb", default=None, metavar="URL",
                        help="users and grants in this database (control/userdb) instead of files")
    args = parser.parse_args()
    if args.users < args.clients:
        parser.error("--users must be at least --clients: two sessions cannot share a maildrop")

    work = Path(tempfile.mkdtemp(prefix="qtwist-bench-pop3-", dir=args.work))
    home = make_home(work, args.users, args.userdb)
    port = free_port()
    log = open(work / "twistd.log", "wb")
    server = subprocess.Popen([tool("twistd"), "-n", "--pidfile=", "qmail", "--home", str(home),
                               "--smtp", "none", "--submission", "none",
                               "--pop3", f"tcp:{port}:interface={HOST}"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        if not poll(lambda: listening(HOST, port), 30):
            print(f"server did not start; see {work / 'twistd.log'}", file=sys.stderr)
            return 1

        cpu, own = server_cpu(server.pid), own_cpu()
        started = time.monotonic()
        latencies, login_errors = asyncio.run(login_load(port, args.clients, args.logins, args.login_seconds))
        login_elapsed = time.monotonic() - started
        login_cpu, login_own = server_cpu(server.pid) - cpu, own_cpu() - own
        grants = grants_recorded(home)

        fill_maildirs(home, args.clients, args.messages, args.size)
        cpu, own = server_cpu(server.pid), own_cpu()
        started = time.monotonic()
        retrieved, octets, retr_errors = asyncio.run(retr_load(port, args.clients, args.messages))
        retr_elapsed = time.monotonic() - started
        retr_cpu, retr_own = server_cpu(server.pid) - cpu, own_cpu() - own
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        log.close()

    done = len(latencies)
    rate = done / login_elapsed
    store = str(parse_userdb(args.userdb)) if args.userdb else "vpasswd"
    print(f"users={args.users} clients={args.clients} cpus={os.cpu_count()} user store: {store}")
    print(f"(a) logins: {done} in {login_elapsed:.2f} s = {rate:.1f} logins/s = "
          f"{rate * 3600:,.0f} logins/hour; errors={len(login_errors)}; grants recorded={grants}")
    if latencies:
        print(f"    latency ms: median {statistics.median(latencies) * 1000:.1f}, "
              f"p90 {percentile(latencies, 0.9) * 1000:.1f}, p99 {percentile(latencies, 0.99) * 1000:.1f}, "
              f"max {max(latencies) * 1000:.1f}")
    print(f"    CPU s: server {login_cpu:.2f} ({login_cpu / max(done, 1) * 1000:.2f} ms/login), "
          f"load generator {login_own:.2f}")
    print(f"(b) RETR: {retrieved} messages of {args.size} bytes in {retr_elapsed:.2f} s = "
          f"{retrieved / retr_elapsed:.1f} msgs/s, {octets / retr_elapsed / 2**20:.1f} MiB/s; "
          f"errors={len(retr_errors)}")
    print(f"    CPU s: server {retr_cpu:.2f} ({retr_cpu / max(retrieved, 1) * 1000:.2f} ms/msg), "
          f"load generator {retr_own:.2f}")
    for error in (login_errors + retr_errors)[:3]:
        print(f"    error: {error}")
    print(f"work directory: {work}")
    return 0 if not login_errors and not retr_errors and retrieved == args.clients * args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
