#!/usr/bin/env python3
"""A big queue of deferred mail: start time, memory, accepting, the tools.

For each size N given, builds a queue of N deferred messages (1 KiB, one
remote recipient each, all for one destination whose host is down, born
over the last two days so their retries are spread over hours) offline,
through the queue module, in exactly the format the server writes (its
records and its index).  Then it starts ``twistd qmail`` on it, with
smtproutes sending that destination to a dead port, and measures:

- the time from start to the first 220;
- RSS of the server and its child right after start and after --settle
  seconds, and the CPU they used meanwhile (the cost of the dead destination);
- the accept rate of new local mail at 20 sessions, and how fast it is
  delivered (medians of --rounds rounds);
- how long ``qtwist qstat`` takes, how soon ``qtwist qread`` prints its first
  line (and how long it takes to the end), and how long ``qtwist queue rm
  --match`` takes to remove 1% of the queue;
- the disk the queue uses, and, once three in four messages are removed,
  how long compaction takes to give their room back (to at most twice the
  bytes of the live messages plus one segment) and the disk used then.

    python bench/bigqueue.py --sizes 0,100000,1000000

Everything stays on 127.0.0.1.  Work files go to a fresh directory under
--work (default: a temporary directory) and are removed at the end unless
--keep is given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from accept import _cpu, load, make_body, qtwist, tool  # accept puts this checkout on sys.path
from tests.support.queuefiles import build_queue
from tests.support.waiting import free_port, poll

DEAD = "dead.test"


def build(queue_dir: Path, count: int, size: int) -> float:
    """N deferred messages, as the server would have left them; seconds taken.
    Every hundredth recipient is rm-me..., for ``queue rm --match``; three
    in four of the others are gone..., removed later to make compaction work."""
    started = time.monotonic()
    build_queue(queue_dir, count, DEAD, body=make_body(size).replace(b"\r\n", b"\n"),
                recipient=lambda n: "rm-me" if n % 100 == 0 else "gone" if n % 4 else "user")
    return time.monotonic() - started


def disk(path: Path) -> int:
    return sum(entry.stat().st_blocks * 512 for entry in path.rglob("*") if entry.is_file())


def rss(pid: int) -> float:
    """MiB of the server and its children."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for process in [pid, *map(int, children)]:
        try:
            for line in Path(f"/proc/{process}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total / 1024


def banner(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                return sock.recv(100).startswith(b"220 ")
        except OSError:
            time.sleep(0.01)
    return False


def timed(home: Path, *args: str) -> tuple[float, str]:
    started = time.monotonic()
    out = qtwist(home, *args)
    return time.monotonic() - started, out


def qread_times(home: Path) -> tuple[float, float, int]:
    """(seconds to the first line, to the end, lines)."""
    started = time.monotonic()
    reader = subprocess.Popen([tool("qtwist"), "--home", str(home), "qread"], stdout=subprocess.PIPE)
    first = reader.stdout.readline()
    first_at = time.monotonic() - started
    lines = 1 if first else 0
    for _ in reader.stdout:
        lines += 1
    reader.wait()
    return first_at, time.monotonic() - started, lines


def run(count: int, args: argparse.Namespace, work: Path) -> dict[str, float]:
    home = work / f"home-{count}"
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_text("bench.test\n")
    (home / "control" / "smtproutes").write_text(f"{DEAD}:127.0.0.1:{args.dead_port}\n")
    qtwist(home, "domain", "add", "example.test")
    qtwist(home, "user", "add", "joe@example.test", "--password", "bench-pass")
    figures: dict[str, float] = {"queue": count}
    figures["build_s"] = build(home / "queue", count, args.size)
    figures["disk_mib"] = disk(home / "queue") / 2**20
    port = free_port()
    log = open(work / f"twistd-{count}.log", "wb")
    started = time.monotonic()
    server = subprocess.Popen([tool("twistd"), "-n", "--pidfile=", "qmail", "--home", str(home),
                               "--smtp", f"tcp:{port}:interface=127.0.0.1", "--submission", "none",
                               "--pop3", "none"], stdout=log, stderr=subprocess.STDOUT)
    try:
        if not banner(port, started + 120):
            raise SystemExit(f"no banner within 120 s; see {log.name}")
        figures["first_banner_s"] = time.monotonic() - started
        figures["rss_start_mib"] = rss(server.pid)
        cpu = _cpu(server.pid)
        time.sleep(args.settle)  # the measurement itself: what the server does meanwhile, idle
        figures["idle_cpu_pct"] = (_cpu(server.pid) - cpu) / args.settle * 100
        figures["rss_settled_mib"] = rss(server.pid)
        body = make_body(1024)
        maildir_new = home / "domains" / "example.test" / "joe" / "Maildir" / "new"
        accepts, deliveries, errors = [], [], 0
        cpu = _cpu(server.pid)
        for round_number in range(1, args.rounds + 1):
            accept_started = time.monotonic()
            failed = asyncio.run(asyncio.wait_for(load(port, 20, args.messages, body), args.max_seconds))
            accepts.append((args.messages - len(failed)) / (time.monotonic() - accept_started))
            errors += len(failed)
            expected = round_number * args.messages - errors
            delivered = poll(lambda: maildir_new.is_dir() and len(os.listdir(maildir_new)) >= expected,
                             args.max_seconds, 0.05)
            deliveries.append(args.messages / (time.monotonic() - accept_started) if delivered else 0.0)
        figures["load_cpu_ms_per_msg"] = (_cpu(server.pid) - cpu) * 1000 / (args.rounds * args.messages)
        figures["accept_msgs_per_s"] = statistics.median(accepts)
        figures["local_delivered_msgs_per_s"] = statistics.median(deliveries)
        figures["errors"] = errors
        figures["rss_after_load_mib"] = rss(server.pid)
        figures["qstat_s"], _ = timed(home, "qstat")
        figures["qread_first_line_s"], figures["qread_all_s"], _ = qread_times(home)
        figures["rm_match_s"], out = timed(home, "queue", "rm", "--match", "rm-me")
        figures["rm_removed"] = int(out.split()[1])
        figures["rss_end_mib"] = rss(server.pid)
        # Three in four messages go: compaction (at most a minute away) gives their room back.
        _, out = timed(home, "queue", "rm", "--match", "gone@")
        figures["rm_gone"] = int(out.split()[1])
        live = count - figures["rm_removed"] - figures["rm_gone"]

        def queued() -> int:
            return int(qtwist(home, "qstat").split()[3])
        poll(lambda: queued() <= live, args.max_seconds, 1.0)  # the server removes them a chunk at a time
        figures["disk_before_compaction_mib"] = disk(home / "queue") / 2**20
        compacting = time.monotonic()
        target = 2 * live * (args.size + 200) + 32 * 2**20
        poll(lambda: disk(home / "queue") <= target, args.max_seconds, 1.0)
        figures["compaction_s"] = time.monotonic() - compacting
        figures["disk_after_compaction_mib"] = disk(home / "queue") / 2**20
        figures["live_messages"] = queued()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,100000,1000000", help="queue sizes, comma separated")
    parser.add_argument("--size", type=int, default=1024, help="bytes per queued message")
    parser.add_argument("--messages", type=int, default=5000, help="new local messages sent in each round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of new mail (the median is shown)")
    parser.add_argument("--settle", type=float, default=120.0, help="seconds to watch the idle server")
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--work", default=None, help="directory for the run's files")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    args.dead_port = free_port()  # nothing listens there: every connection is refused
    work = Path(tempfile.mkdtemp(prefix="qtwist-bigqueue-", dir=args.work))
    try:
        results = [run(int(size), args, work) for size in args.sizes.split(",")]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    names = list(results[0])
    print("| " + " | ".join(names) + " |")
    print("|" + "---|" * len(names))
    for figures in results:
        print("| " + " | ".join(f"{figures[name]:.2f}" if isinstance(figures[name], float) else str(figures[name])
                                for name in names) + " |")
    empty = results[0]["accept_msgs_per_s"] if results[0]["queue"] == 0 else None
    if empty:
        for figures in results[1:]:
            print(f"N={figures['queue']}: accept rate {figures['accept_msgs_per_s'] / empty:.0%} of the empty queue's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
