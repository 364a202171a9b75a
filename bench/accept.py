#!/usr/bin/env python3
"""Acceptance and delivery throughput of `twistd qmail`, without Postfix.

Starts qtwist on a fresh home (made with its own CLI) on a loopback port,
sends MESSAGES messages of SIZE bytes to one local user over SESSIONS
concurrent SMTP sessions (a new connection per message, like Postfix's
smtp-source), and prints accepted msgs/s (until the last 250) and delivered
msgs/s (until the Maildir holds every message and the queue is empty).

    python bench/accept.py [--sessions 20] [--messages 5000] [--size 10240]

Plugin overhead: the same run with the shipped plugins doing real work, DNS
answered by a local server (--dns: SPF pass for the sender's domain, a DNSBL
that lists nobody):

    python bench/accept.py --dns --plugins rbl,spf,chkuser,dkim \
        --control rblservers=bl.bench.test --control spfbehavior=3

The user in a database (control/userdb), next to the vpasswd figure of the
same run; with chkuser, every RCPT asks the user store:

    python bench/accept.py --repeat 3 --plugins chkuser --userdb mysql://root@127.0.0.1/qtwist_bench \
        --userdb postgresql://postgres@127.0.0.1/qtwist_bench

Everything stays on 127.0.0.1; the run is bounded by --max-seconds.
Work files go to a fresh directory under --work (default: a temporary
directory) and are left in place: deleting thousands of files slows later
file creation on some file systems for minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The helpers the tests use (tests/support), from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qtwist.sqldb import parse_userdb  # noqa: E402
from tests.support.dns import ZoneServer  # noqa: E402
from tests.support.waiting import free_port, listening, poll  # noqa: E402

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    beside = BIN / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def qtwist(home: Path, *args: str) -> str:
    return subprocess.run([tool("qtwist"), "--home", str(home), *args], check=True,
                          capture_output=True, text=True).stdout


def make_body(size: int) -> bytes:
    head = b"From: <bench@source.test>\r\nTo: <joe@example.test>\r\nSubject: bench\r\n\r\n"
    line = b"x" * 78 + b"\r\n"
    lines = (size - len(head)) // len(line) + 1
    return head + line * lines


def greets(host: str, port: int) -> bool:
    """One whole SMTP session (220, QUIT, 221).  The server has then also seen
    the end of the bare probe connection before it, which would otherwise count
    against the 20 connections one address may hold while the load starts."""
    with socket.create_connection((host, port), timeout=10) as sock, sock.makefile("rwb") as stream:
        if not stream.readline().startswith(b"220"):
            return False
        stream.write(b"QUIT\r\n")
        stream.flush()
        return stream.readline().startswith(b"221")


async def session_worker(port: int, body: bytes, counter: list[int], total: int, errors: list[str]) -> None:
    while counter[0] < total:
        counter[0] += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            replies = []

            async def reply() -> bytes:
                while True:
                    line = await reader.readline()
                    if not line or line[3:4] != b"-":
                        replies.append(line)
                        return line

            await reply()
            for command in (b"EHLO source.test\r\n", b"MAIL FROM:<bench@source.test>\r\n",
                            b"RCPT TO:<joe@example.test>\r\n", b"DATA\r\n"):
                writer.write(command)
                await reply()
            writer.write(body + b".\r\n")
            final = await reply()
            writer.write(b"QUIT\r\n")
            await reply()
            writer.close()
            if not final.startswith(b"250"):
                errors.append(" / ".join(line.decode(errors="replace").strip() for line in replies))
        except OSError as error:
            errors.append(repr(error))


async def load(port: int, sessions: int, messages: int, body: bytes) -> list[str]:
    counter, errors = [0], []
    await asyncio.gather(*(session_worker(port, body, counter, messages, errors) for _ in range(sessions)))
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--work", default=None, help="directory for the run's files")
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--plugins", default="", help="control/plugins entries, comma separated")
    parser.add_argument("--control", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra control file for the run (repeatable)")
    parser.add_argument("--dns", action="store_true",
                        help="answer the server's DNS look-ups from a local zone (for plugins)")
    parser.add_argument("--accept-only", action="store_true",
                        help="measure acceptance alone: no local deliveries (concurrencylocal 0)")
    parser.add_argument("--userdb", action="append", default=[], metavar="URL",
                        help="also run with the user in this database (control/userdb; repeatable), "
                             "beside a run with vpasswd files, and compare")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each user store, in rotating order; the comparison takes medians")
    args = parser.parse_args()

    stores: list[str | None] = [None, *args.userdb]
    results: dict[str | None, list[tuple[float, float]]] = {store: [] for store in stores}
    for repeat in range(args.repeat):
        # Each round in another order, so the machine's slow and fast minutes spread evenly.
        for store in stores[repeat % len(stores):] + stores[:repeat % len(stores)]:
            result = run(args, store)
            if result is None:
                return 1
            results[store].append(result)
    if args.userdb:
        baseline = statistics.median(accepted for accepted, _ in results[None])
        print(f"\n{'user store (median of ' + str(args.repeat) + ')':52} accepted msgs/s  delivered msgs/s  of vpasswd")
        for store in stores:
            accepted = statistics.median(rate for rate, _ in results[store])
            delivered = statistics.median(rate for _, rate in results[store])
            print(f"{_without_password(store or 'vpasswd'):52} {accepted:15.1f}  {delivered:16.1f}  "
                  f"{accepted / baseline * 100:9.1f}%")
    return 0


def _without_password(url: str) -> str:
    return str(parse_userdb(url) or "vpasswd")


def run(args: argparse.Namespace, userdb: str | None) -> tuple[float, float] | None:
    """One run; (accepted, delivered) msgs/s, or None when it failed."""
    work = Path(tempfile.mkdtemp(prefix="qtwist-bench-", dir=args.work))
    home = work / "home"
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_text("bench.test\n")
    for setting in args.control + (["concurrencylocal=0"] if args.accept_only else []):
        name, _, value = setting.partition("=")
        (home / "control" / name).write_text(value + "\n")
    if args.plugins:
        (home / "control" / "plugins").write_text("\n".join(args.plugins.split(",")) + "\n")
    if userdb:
        (home / "control" / "userdb").write_text(userdb + "\n")
    qtwist(home, "domain", "add", "example.test")
    if userdb:  # a database may still hold joe from an earlier run (with another home)
        subprocess.run([tool("qtwist"), "--home", str(home), "user", "del", "joe@example.test"],
                       capture_output=True)
    qtwist(home, "user", "add", "joe@example.test", "--password", "bench-pass")
    port = free_port()
    log = open(work / "twistd.log", "wb")
    command = [tool("twistd"), "-n", "--pidfile=", "qmail", "--home", str(home),
               "--smtp", f"tcp:{port}:interface=127.0.0.1", "--submission", "none", "--pop3", "none"]
    dns = None
    if args.dns:
        dns = ZoneServer({"source.test": {"TXT": ['"v=spf1 ip4:127.0.0.0/8 -all"'], "MX": ["10 mx.source.test."]},
                          "mx.source.test": {"A": ["127.0.0.1"]}})
        command += ["--nameserver", f"127.0.0.1:{dns.address[1]}"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        if not poll(lambda: listening("127.0.0.1", port), 20) or not greets("127.0.0.1", port):
            print(f"server did not start; see {work / 'twistd.log'}", file=sys.stderr)
            return None
        body = make_body(args.size)
        maildir_new = home / "domains" / "example.test" / "joe" / "Maildir" / "new"
        cpu_before = _cpu(server.pid)
        started = time.monotonic()
        errors = asyncio.run(asyncio.wait_for(load(port, args.sessions, args.messages, body), args.max_seconds))
        accepted = time.monotonic() - started

        def delivered() -> bool:
            return (maildir_new.is_dir() and len(os.listdir(maildir_new)) >= args.messages - len(errors)
                    and re.search(r"messages in queue: 0\b", qtwist(home, "qstat")) is not None)
        complete = not args.accept_only and poll(delivered, args.max_seconds, 0.05)
        finished = time.monotonic() - started
        cpu = _cpu(server.pid) - cpu_before
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
        if dns is not None:
            dns.stop()
        if userdb:
            subprocess.run([tool("qtwist"), "--home", str(home), "user", "del", "joe@example.test"],
                           capture_output=True)
    ok = args.messages - len(errors)
    print(f"user store: {_without_password(userdb) if userdb else 'vpasswd'}")
    print(f"sessions={args.sessions} messages={args.messages} size={args.size} errors={len(errors)}")
    if errors:
        print(f"first error: {errors[0]}")
    print(f"accepted: {ok / accepted:.1f} msgs/s ({accepted:.2f} s)")
    if complete:
        print(f"delivered: {ok / finished:.1f} msgs/s ({finished:.2f} s)")
    else:
        print("delivered: INCOMPLETE (not every message reached the Maildir in time)")
    print(f"server CPU: {cpu:.2f} s ({cpu / max(ok, 1) * 1000:.2f} ms/msg)")
    print(f"work directory: {work}")
    if not (complete or args.accept_only) or errors:
        return None
    return ok / accepted, (ok / finished if complete else 0.0)


def _cpu(pid: int) -> float:
    """CPU seconds of the server and its running children (the local delivery process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for process in [pid, *map(int, children)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # a child that ended meanwhile
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
