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

Spam and virus scanning: naming the spamassassin or clamav plugin starts
Debian's spamd and clamd on loopback ports (clamd with a one-signature
database) and compares runs with the scanners against runs without, with the
CPU of the server apart from the daemons':

    python bench/accept.py --repeat 3 --messages 300 --plugins spamassassin,clamav
    python bench/accept.py --repeat 3 --plugins clamav      # one scanner only

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
from dataclasses import dataclass
from pathlib import Path

# The helpers the tests use (tests/support), from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qtwist.sqldb import parse_userdb  # noqa: E402
from tests.support.dns import ZoneServer  # noqa: E402
from tests.support.waiting import free_port, listening, poll  # noqa: E402

BIN = Path(sys.executable).parent
# The plugins whose runs need spamd and clamd, and are compared with runs without them.
SCANNERS = ("spamassassin", "clamav")


def tool(name: str) -> str:
    beside = BIN / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def qtwist(home: Path, *args: str) -> str:
    return subprocess.run([tool("qtwist"), "--home", str(home), *args], check=True,
                          capture_output=True, text=True).stdout


# For scanning runs: prose, as mail is.  Lines of 78 x's are the worst case of
# SpamAssassin's body rules (about four times the time of this text here).
PROSE = (b"The quarterly report is attached below; please read it before Thursday's meeting, and bring\r\n"
         b"your notes on the budget, the new office plans and the schedule for the spring release.\r\n")


def make_body(size: int, prose: bool = False) -> bytes:
    head = (b"From: <bench@source.test>\r\nTo: <joe@example.test>\r\nSubject: bench\r\n"
            b"Date: Thu, 03 Dec 2026 12:00:00 +0000\r\nMessage-ID: <bench@source.test>\r\n\r\n"
            if prose else b"From: <bench@source.test>\r\nTo: <joe@example.test>\r\nSubject: bench\r\n\r\n")
    text = PROSE if prose else b"x" * 78 + b"\r\n"
    copies = (size - len(head)) // len(text) + 1
    return head + text * copies


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
                        help="runs of each variant, in rotating order; the comparison takes medians")
    args = parser.parse_args()

    # (label, userdb, plugins) of each variant; the first is the baseline.
    plugins = [name for name in args.plugins.split(",") if name]
    variants = [("vpasswd", None, plugins)] + [(_without_password(url), url, plugins) for url in args.userdb]
    scanners = [name for name in plugins if name in SCANNERS]
    daemons = []
    if scanners:
        if args.userdb:
            parser.error("compare either user stores (--userdb) or scanning (--plugins clamav,spamassassin)")
        from tests.support.daemons import clamd, spamd

        work = Path(tempfile.mkdtemp(prefix="qtwist-bench-daemons-", dir=args.work))
        daemons = [spamd(work / "spamd").start(), clamd(work / "clamd").start()]
        args.control += [f"spamdserver={daemons[0].address}", f"clamdserver={daemons[1].address}"]
        variants = [("scanning off", None, [name for name in plugins if name not in SCANNERS]),
                    (f"scanning on ({','.join(scanners)})", None, plugins)]
    results: dict[str, list[Run]] = {label: [] for label, _, _ in variants}
    try:
        for repeat in range(args.repeat):
            # Each round in another order, so the machine's slow and fast minutes spread evenly.
            shift = repeat % len(variants)
            for label, userdb, chosen in variants[shift:] + variants[:shift]:
                result = run(args, userdb, chosen, [daemon.process.pid for daemon in daemons])
                if result is None:
                    return 1
                results[label].append(result)
    finally:
        for daemon in daemons:
            daemon.stop()
    if len(variants) > 1:
        baseline = statistics.median(result.accepted for result in results[variants[0][0]])
        print(f"\n{'median of ' + str(args.repeat):52} accepted msgs/s  delivered msgs/s  of first  "
              f"server ms/msg  daemons ms/msg")
        for label, _, _ in variants:
            runs = results[label]
            accepted = statistics.median(result.accepted for result in runs)
            print(f"{label:52} {accepted:15.1f}  {statistics.median(result.delivered for result in runs):16.1f}  "
                  f"{accepted / baseline * 100:7.1f}%  {statistics.median(r.server_ms for r in runs):13.2f}  "
                  f"{statistics.median(r.daemons_ms for r in runs):14.2f}")
    return 0


@dataclass
class Run:
    accepted: float  # msgs/s until the last 250
    delivered: float  # msgs/s until the last delivery
    server_ms: float  # the server's CPU (and its delivery child's) per message
    daemons_ms: float  # the scanning daemons' CPU per message


def _without_password(url: str) -> str:
    """The database's address as logs show it."""
    return str(parse_userdb(url) or "vpasswd")


def run(args: argparse.Namespace, userdb: str | None, plugins: list[str], daemons: list[int]) -> Run | None:
    """One run, or None when it failed; ``daemons`` are the scanners' pids."""
    work = Path(tempfile.mkdtemp(prefix="qtwist-bench-", dir=args.work))
    home = work / "home"
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_text("bench.test\n")
    for setting in args.control + (["concurrencylocal=0"] if args.accept_only else []):
        name, _, value = setting.partition("=")
        (home / "control" / name).write_text(value + "\n")
    if plugins:
        (home / "control" / "plugins").write_text("\n".join(plugins) + "\n")
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
        body = make_body(args.size, prose=bool(daemons))
        maildir_new = home / "domains" / "example.test" / "joe" / "Maildir" / "new"
        cpu_before = _cpu(server.pid)
        daemons_before = sum(_cpu(pid) for pid in daemons)
        started = time.monotonic()
        errors = asyncio.run(asyncio.wait_for(load(port, args.sessions, args.messages, body), args.max_seconds))
        accepted = time.monotonic() - started

        def delivered() -> bool:
            return (maildir_new.is_dir() and len(os.listdir(maildir_new)) >= args.messages - len(errors)
                    and re.search(r"messages in queue: 0\b", qtwist(home, "qstat")) is not None)
        complete = not args.accept_only and poll(delivered, args.max_seconds, 0.05)
        finished = time.monotonic() - started
        cpu = _cpu(server.pid) - cpu_before
        daemons_cpu = sum(_cpu(pid) for pid in daemons) - daemons_before
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
    print(f"user store: {_without_password(userdb) if userdb else 'vpasswd'}; plugins: {','.join(plugins) or '-'}")
    print(f"sessions={args.sessions} messages={args.messages} size={args.size} errors={len(errors)}")
    if errors:
        print(f"first error: {errors[0]}")
    print(f"accepted: {ok / accepted:.1f} msgs/s ({accepted:.2f} s)")
    if complete:
        print(f"delivered: {ok / finished:.1f} msgs/s ({finished:.2f} s)")
    else:
        print("delivered: INCOMPLETE (not every message reached the Maildir in time)")
    print(f"server CPU: {cpu:.2f} s ({cpu / max(ok, 1) * 1000:.2f} ms/msg)"
          + (f"; scanning daemons' CPU: {daemons_cpu:.2f} s ({daemons_cpu / max(ok, 1) * 1000:.2f} ms/msg)"
             if daemons else ""))
    print(f"work directory: {work}")
    if not (complete or args.accept_only) or errors:
        return None
    return Run(ok / accepted, ok / finished if complete else 0.0, cpu / max(ok, 1) * 1000,
               daemons_cpu / max(ok, 1) * 1000)


def _cpu(pid: int) -> float:
    """CPU seconds of the server and its running children (the local delivery process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for process in [pid, *map(int, children)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # a child that ended meanwhile
        # Its own time and that of its children already reaped (spamd's, which it renews).
        total += sum(int(value) for value in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
