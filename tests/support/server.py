"""A real ``twistd qmail`` for black-box tests: the server as a child process
on free loopback ports, its log in HOME/twistd.log.

Why a child process: what a client sees (banner timing, TLS, what survives
kill -9, signals, the local delivery child) depends on the whole program, the
reactor, the plugin lookup and the queue's threads, not on the protocol
classes alone, which the unit tests drive in memory.

`python -m twisted` runs `twist`, not `twistd` (other options, no -n), so the
server is started as ``python -c "...twistd.run()"`` with the repository first
on PYTHONPATH.  Twisted then finds the repository's `twisted/plugins` (every
such directory on sys.path counts), and whichever copy of the `qmail` plugin
file it reads, the module it names, `qtwist.service`, comes from the repository.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

from tests.support.home import Home, child_environment
from tests.support.smtpclient import greeted
from tests.support.waiting import DEADLINE, free_port, listening, wait_until

START_DEADLINE = 30.0
TWISTD = "from twisted.scripts.twistd import run; run()"


def loopback_endpoint(port: int | None) -> str:
    return "none" if port is None else f"tcp:{port}:interface=127.0.0.1"


class Server:
    """``twistd -n qmail`` for ``home``: SMTP on ``port``, and the other
    listeners only when asked for; ``options`` are added to the command line.
    The log (stdout and stderr) goes to HOME/twistd.log, appended across restarts."""

    def __init__(self, home: Home, port: int | None = None, dns_port: int | None = None, *,
                 submission: bool = False, smtps: bool = False, pop3: bool = False, pop3s: bool = False,
                 options: tuple[str, ...] = (), extra_path: Path | None = None) -> None:
        self.home = home
        self.extra_path = extra_path
        self.options = options
        self.port = port or free_port()
        self.dns_port = dns_port
        self.submission_port = free_port() if submission else None
        self.smtps_port = free_port() if smtps else None
        self.pop3_port = free_port() if pop3 else None
        self.pop3s_port = free_port() if pop3s else None
        self.log_path = home.path / "twistd.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        command = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "qmail",
                   "--home", str(self.home.path),
                   "--smtp", loopback_endpoint(self.port),
                   "--submission", loopback_endpoint(self.submission_port),
                   "--smtps", loopback_endpoint(self.smtps_port),
                   "--pop3", loopback_endpoint(self.pop3_port),
                   "--pop3s", loopback_endpoint(self.pop3s_port)]
        if self.dns_port is not None:
            command += ["--nameserver", f"127.0.0.1:{self.dns_port}"]
        return command + list(self.options)

    @property
    def ports(self) -> list[int]:
        every = (self.port, self.submission_port, self.smtps_port, self.pop3_port, self.pop3s_port)
        return [port for port in every if port is not None]

    def start(self, timeout: float = START_DEADLINE, preexec_fn: Callable[[], None] | None = None) -> Server:
        """Start twistd and wait until every listener accepts; ``preexec_fn`` runs
        in the child before exec (to lower its resource limits, say)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.home.path,
                                            env=child_environment(self.extra_path), preexec_fn=preexec_fn)

        def started() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited with {self.process.returncode}:\n{self.log}")
            return all(listening("127.0.0.1", port) for port in self.ports)
        wait_until(started, f"twistd to listen on ports {self.ports}", timeout)
        return self

    def stop(self, timeout: float = DEADLINE) -> None:
        """SIGTERM, then SIGKILL if it has not ended by the deadline."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def kill(self) -> None:
        """kill -9: no shutdown code runs, as in a crash."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(DEADLINE)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = DEADLINE) -> None:
        wait_until(lambda: text in self.log, f"{text!r} in the server log", timeout)

    def connect(self, source: str = "127.0.0.1", timeout: float = DEADLINE, port: int | None = None) -> socket.socket:
        """A raw client socket from ``source`` (any 127.x address: tcp.smtp tells them apart)."""
        return socket.create_connection(("127.0.0.1", port or self.port), timeout=timeout,
                                        source_address=(source, 0))

    def smtp(self, source: str = "127.0.0.1", timeout: float = DEADLINE) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=timeout, source_address=(source, 0))

    def barrier(self, recipient: str, tag: str) -> None:
        """Queue a message from ``<tag@barrier.test>`` and wait for its queue log
        line.  Whatever the server queued before it is in the log by then, so a
        message missing from the log was never queued."""
        with self.smtp() as client:
            client.sendmail(f"{tag}@barrier.test", [recipient], f"Subject: {tag}\r\n\r\nbarrier\r\n")
        self.wait_for_log(f"from <{tag}@barrier.test>")


def session(server: Server, source: str = "127.0.0.1") -> socket.socket:
    """A client connected to the server's SMTP port that has read the banner."""
    return greeted(server.connect(source))
