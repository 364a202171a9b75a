#!/usr/bin/env python3
"""Remote delivery of `twistd qmail`: relay throughput, and scheduling with a
big deferred queue.

Relay: MESSAGES messages of SIZE bytes, each to one of DOMAINS remote domains,
are sent over SMTP from 127.0.0.1 (RELAYCLIENT by tcp.smtp, a new connection
per message) and relayed by control/smtproutes to SINKS Postfix smtp-sink
processes on 127.0.0.2, 127.0.0.3, ... (high ports).  Prints accepted msgs/s
(until the last 250) and delivered msgs/s (until `qtwist qstat` shows an empty
queue).

Deferred: a queue with DEFERRED messages whose remote recipients wait for a
retry a day away (written with qtwist.queue's record functions before the
server starts, routed to an smtp-sink that answers 4xx should they be tried).
Prints the server's start-up time (spawn to the first SMTP greeting, which
includes reading the queue) and memory, then the latency and rate of new
messages delivered to the tests' fake SMTP server (tests/support/fakesmtp.py),
in this process, which notes when each arrives: PROBES one at a time, then a
BURST over SESSIONS sessions.  The same run on an empty queue is the baseline.

    python bench/relay.py [--messages 5000] [--size 10240] [--domains 50] [--sinks 5]
                          [--deferred 100000] [--probes 200] [--burst 2000]
                          [--skip-relay | --skip-deferred]

Uses the installed qtwist (twistd and qtwist beside this Python, else on PATH)
and Postfix's smtp-sink.  Everything stays on loopback; every wait is bounded
by --max-seconds.  Work
files go to a fresh directory under --work and are removed at the end unless
--keep (the queue segments are a few large files, cheap to delete).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
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

from accept import _cpu as cpu_seconds
from accept import qtwist, tool
from tests.support.fakesmtp import FakeSMTP
from tests.support.waiting import free_port, listening, poll
from qtwist.queue.records import SEGMENT_LIMIT, Recipient, Records, queue_key

SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = "bench@source.test"


def greets(port: int) -> bool:
    """The server's 220 came: it has started (twistd binds ports before the
    services start, so a bare connect succeeds while the queue is still read)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
            return client.recv(512).startswith(b"220")
    except OSError:
        return False


def message(to: str, subject: str, size: int) -> bytes:
    """A message of about ``size`` bytes in SMTP form (CRLF, no line starting with '.')."""
    head = f"From: <{SENDER}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\n".encode()
    line = b"x" * 78 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


# -- the parties -------------------------------------------------------------------------

class Processes:
    """Child processes of the run, ended (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []

    def start(self, command: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.children.append(child)
        return child

    def stop(self, child: subprocess.Popen) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=10)
        self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


def start_smtp_sink(processes: Processes, host: str, work: Path, *options: str) -> int:
    """Postfix's smtp-sink on host:port (a fresh high port); returns the port."""
    port = free_port(host)
    privileges = ["-u", "nobody"] if os.geteuid() == 0 else []
    processes.start([SMTP_SINK, *privileges, *options, f"{host}:{port}", "256"], work / f"smtp-sink-{host}.log")
    if not poll(lambda: listening(host, port), 10):
        raise SystemExit(f"smtp-sink did not start on {host}:{port}")
    return port


def make_home(home: Path, routes: list[str], controls: list[str]) -> None:
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_text("bench.test\n")
    (home / "control" / "smtproutes").write_text("".join(f"{route}\n" for route in routes))
    for setting in controls:
        name, _, value = setting.partition("=")
        (home / "control" / name).write_text(value + "\n")
    (home / "tcp.smtp").write_text('127.0.0.1:allow,RELAYCLIENT=""\n')


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    started_in: float


def start_server(processes: Processes, home: Path, deadline: float) -> Server:
    port = free_port("127.0.0.1")
    log = home.parent / f"{home.name}-twistd.log"
    began = time.monotonic()
    process = processes.start([tool("twistd"), "-n", "--pidfile=", "qmail", "--home", str(home),
                               "--smtp", f"tcp:{port}:interface=127.0.0.1", "--submission", "none",
                               "--pop3", "none"], log)
    if not poll(lambda: greets(port) or process.poll() is not None, deadline, 0.01) \
            or process.poll() is not None:
        raise SystemExit(f"the server did not start; see {log}")
    return Server(process, port, log, time.monotonic() - began)


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


# -- SMTP client ------------------------------------------------------------------------------

async def send_one(port: int, recipient: str, body: bytes) -> float | str:
    """One message over a new connection: when its 250 came, or the problem."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        return repr(error)
    try:
        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if not line or line[3:4] != b"-":
                    return line
        await reply()
        writer.write(f"EHLO source.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
        for _ in range(4):
            await reply()
        writer.write(body + b".\r\nQUIT\r\n")
        final = await reply()
        accepted_at = time.monotonic()
        await reply()
        return accepted_at if final.startswith(b"250") else final.decode(errors="replace").strip()
    except OSError as error:
        return repr(error)
    finally:
        writer.close()


async def send_all(port: int, jobs: list[tuple[str, bytes]], sessions: int,
                   accepted_at: dict[int, float]) -> list[str]:
    """Send every (recipient, message) over ``sessions`` concurrent clients;
    note when each got its 250."""
    pending = iter(enumerate(jobs))
    errors: list[str] = []

    async def client() -> None:
        for number, (recipient, body) in pending:
            result = await send_one(port, recipient, body)
            if isinstance(result, float):
                accepted_at[number] = result
            else:
                errors.append(result)
    await asyncio.gather(*(client() for _ in range(sessions)))
    return errors


# -- when probes arrive at the fake SMTP server ----------------------------------------

class Arrivals:
    """When each 'Subject: probe N' message reached the fake SMTP server."""

    def __init__(self, sink: FakeSMTP) -> None:
        self.sink = sink
        self.at: dict[int, float] = {}
        self._seen: set[int] = set()  # transactions already looked at (they finish in any order)

    def _update(self) -> None:
        for transaction in self.sink.delivered():
            if id(transaction) not in self._seen:
                self._seen.add(id(transaction))
                found = re.search(rb"\r\nSubject: probe (\d+)\r\n", transaction.raw)
                if found:
                    self.at[int(found.group(1))] = transaction.arrived_at

    async def wait_for(self, numbers: range, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._update()
            if all(n in self.at for n in numbers):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.002)


# -- part 1: relay throughput --------------------------------------------------------------

def relay(args: argparse.Namespace, work: Path, processes: Processes) -> bool:
    hosts = [f"127.0.0.{2 + n}" for n in range(args.sinks)]
    ports = {host: start_smtp_sink(processes, host, work) for host in hosts}
    domains = [f"d{n:02d}.relay.test" for n in range(args.domains)]
    routes = [f"{domain}:{hosts[n % len(hosts)]}:{ports[hosts[n % len(hosts)]]}" for n, domain in enumerate(domains)]
    home = work / "relay"
    # The default route takes anything else (a bounce to source.test would go there).
    make_home(home, routes + [f":{hosts[0]}:{ports[hosts[0]]}"], args.control)
    server = start_server(processes, home, 30)
    jobs = [(f"user{n}@{domains[n % len(domains)]}",
             message(f"user{n}@{domains[n % len(domains)]}", f"relay {n}", args.size))
            for n in range(args.messages)]
    cpu_before = cpu_seconds(server.process.pid)
    started = time.monotonic()
    errors = asyncio.run(asyncio.wait_for(send_all(server.port, jobs, args.sessions, {}), args.max_seconds))
    accepted = time.monotonic() - started
    empty = poll(lambda: re.search(r"messages in queue: 0\n", qtwist(home, "qstat")) is not None,
                       args.max_seconds, 0.5)
    finished = time.monotonic() - started
    cpu = cpu_seconds(server.process.pid) - cpu_before
    rss, hwm = memory_mib(server.process.pid)
    processes.stop(server.process)
    log = server.log.read_text(errors="replace")
    successes = len(re.findall(r"delivery \d+: success:", log))
    ok = args.messages - len(errors)
    print(f"relay: messages={args.messages} size={args.size} domains={args.domains} sinks={args.sinks} "
          f"sessions={args.sessions} errors={len(errors)}")
    if errors:
        print(f"  first error: {errors[0]}")
    print(f"  accepted:  {ok / accepted:7.1f} msgs/s ({accepted:.2f} s)")
    if empty:
        print(f"  delivered: {ok / finished:7.1f} msgs/s ({finished:.2f} s until qstat showed an empty queue; "
              f"{successes} successful deliveries in the log)")
    else:
        print(f"  delivered: INCOMPLETE after {finished:.0f} s ({successes} successful deliveries in the log)")
    print(f"  server: {cpu:.2f} s CPU ({cpu / max(ok, 1) * 1000:.2f} ms/msg), RSS {rss:.0f} MiB, peak {hwm:.0f} MiB")
    return empty and not errors and successes == ok


# -- part 2: scheduling with a big deferred queue ------------------------------------------

def fill_deferred_queue(home: Path, count: int, size: int, domain: str) -> float:
    """Segments holding ``count`` messages, each with one remote recipient
    deferred until a day from now; returns the seconds it took (fsynced)."""
    began = time.monotonic()
    seg_dir = home / "queue" / "seg"
    seg_dir.mkdir(parents=True)
    records = Records(queue_key(home / "queue", create=True).key)
    now = time.time()
    body = message(f"waiting@{domain}", "deferred", size).replace(b"\r\n", b"\n")
    handle, written = None, SEGMENT_LIMIT
    for number in range(1, count + 1):
        if written >= SEGMENT_LIMIT:
            if handle is not None:
                os.fsync(handle.fileno())
                handle.close()
            handle, written = open(seg_dir / f"{number:012d}", "wb"), 0
        born = now - random.uniform(600, 86400)
        recipient = Recipient(f"user{number}@{domain}")
        record, _ = records.message(number, born, SENDER, [recipient], body)
        record += records.deferral(number, 0, now + 86400 + random.uniform(0, 3600),
                                  "Connected to 127.0.0.20 but sender was rejected./Remote host said: 450 later")
        handle.write(record)
        written += len(record)
    if handle is not None:
        os.fsync(handle.fileno())
        handle.close()
    return time.monotonic() - began


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def probe(server: Server, args: argparse.Namespace, sink_host: str) -> dict[str, float]:
    """Latency of PROBES messages sent one at a time, then the rate and latency
    of a BURST; every message goes to the fake SMTP server in this process."""
    sink = FakeSMTP(host=sink_host, port=args.probe_port)
    arrivals = Arrivals(sink)
    results: dict[str, float] = {}
    try:
        def job(number: int) -> tuple[str, bytes]:
            return f"user{number}@probe.test", message(f"user{number}@probe.test", f"probe {number}", args.size)

        single = []
        for number in range(args.probes):
            accepted_at = await send_one(server.port, *job(number))
            if not isinstance(accepted_at, float):
                raise SystemExit(f"probe {number} was refused: {accepted_at}")
            if not await arrivals.wait_for(range(number, number + 1), args.max_seconds):
                raise SystemExit(f"probe {number} did not arrive; see {server.log}")
            single.append(arrivals.at[number] - accepted_at)
        results["single_p50_ms"] = statistics.median(single) * 1000
        results["single_p95_ms"] = percentile(single, 0.95) * 1000
        results["single_max_ms"] = max(single) * 1000

        first = args.probes
        burst = [job(first + n) for n in range(args.burst)]
        burst_accepted: dict[int, float] = {}
        cpu_before = cpu_seconds(server.process.pid)
        started = time.monotonic()
        errors = await send_all(server.port, burst, args.sessions, burst_accepted)
        numbers = range(first, first + args.burst)
        complete = await arrivals.wait_for(range(first, first + len(burst) - len(errors)) if errors else numbers,
                                           args.max_seconds)
        if not complete or errors:
            raise SystemExit(f"burst incomplete ({len(errors)} errors); see {server.log}")
        finished = max(arrivals.at[n] for n in numbers) - started
        latencies = [arrivals.at[first + n] - burst_accepted[n] for n in burst_accepted]
        results["burst_msgs_per_s"] = args.burst / finished
        results["burst_p50_ms"] = statistics.median(latencies) * 1000
        results["burst_p95_ms"] = percentile(latencies, 0.95) * 1000
        results["burst_cpu_ms_per_msg"] = (cpu_seconds(server.process.pid) - cpu_before) / args.burst * 1000
    finally:
        # The server ends its sessions with QUIT after the last 250.
        await asyncio.to_thread(poll, lambda: sink.sessions_open == 0, 10)
        sink.close()
    return results


def deferred(args: argparse.Namespace, work: Path, processes: Processes, count: int) -> bool:
    refusing_host, probe_host = "127.0.0.20", "127.0.0.21"
    refusing_port = start_smtp_sink(processes, refusing_host, work, "-r", "MAIL")
    args.probe_port = free_port(probe_host)
    home = work / f"deferred-{count}"
    make_home(home, [f"later.test:{refusing_host}:{refusing_port}",
                     f"probe.test:{probe_host}:{args.probe_port}"], args.control)
    filled = fill_deferred_queue(home, count, args.deferred_size, "later.test") if count else 0.0
    server = start_server(processes, home, args.max_seconds)
    rss_started, _ = memory_mib(server.process.pid)
    results = asyncio.run(probe(server, args, probe_host))
    rss, hwm = memory_mib(server.process.pid)
    processes.stop(server.process)
    log = server.log.read_text(errors="replace")
    tried = len(re.findall(r"starting delivery \d+: msg \d+ to remote user\d+@later\.test", log))
    label = f"{count} deferred"
    if count:
        print(f"{label}: queue written in {filled:.1f} s ({count} x {args.deferred_size} bytes)")
    print(f"{label}: start to first greeting {server.started_in:.2f} s; RSS after start {rss_started:.0f} MiB, "
          f"at the end {rss:.0f} MiB, peak {hwm:.0f} MiB")
    print(f"{label}: one at a time ({args.probes}): latency p50 {results['single_p50_ms']:.1f} ms, "
          f"p95 {results['single_p95_ms']:.1f} ms, max {results['single_max_ms']:.1f} ms")
    print(f"{label}: burst ({args.burst} over {args.sessions} sessions): {results['burst_msgs_per_s']:.1f} msgs/s, "
          f"latency p50 {results['burst_p50_ms']:.1f} ms, p95 {results['burst_p95_ms']:.1f} ms, "
          f"server CPU {results['burst_cpu_ms_per_msg']:.2f} ms/msg")
    print(f"{label}: deferred messages tried during the run: {tried}")
    return tried == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--domains", type=int, default=50)
    parser.add_argument("--sinks", type=int, default=5, help="smtp-sink processes (127.0.0.2 and up)")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--deferred", type=int, default=100_000)
    parser.add_argument("--deferred-size", type=int, default=10240)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--control", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra control file for the servers (repeatable)")
    parser.add_argument("--skip-relay", action="store_true")
    parser.add_argument("--skip-deferred", action="store_true")
    parser.add_argument("--work", default=None, help="directory for the run's files")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args()
    if not Path(SMTP_SINK).exists():
        print(f"{SMTP_SINK} is missing (Debian: apt-get install postfix)", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="qtwist-relay-", dir=args.work))
    processes = Processes()
    good = True
    try:
        if not args.skip_relay:
            good = relay(args, work, processes) and good
        if not args.skip_deferred:
            for count in (0, args.deferred):
                good = deferred(args, work, processes, count) and good
    finally:
        processes.stop_all()
        if args.keep:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
