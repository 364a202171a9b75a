"""A real `twistd qmail` for black-box tests: a home in a temporary folder, the
server as a child process on a free loopback port, and deadline-bound waits.

Why a child process: what a client sees (banner timing, replies under
pipelining, what survives kill -9) depends on the whole program, the reactor,
the plugin lookup and the queue's threads, not on the protocol class alone.

`python -m twisted` runs `twist`, not `twistd` (other options, no -n), so the
server is started as ``python -c "...twistd.run()"`` with the repository first
on PYTHONPATH.  Twisted then finds the repository's `twisted/plugins` (every
such directory on sys.path counts), and whichever copy of the `qmail` plugin
file it reads, the module it names, `qtwist.service`, comes from the repository.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from qtwist.users import UserDB

REPO = Path(__file__).resolve().parent.parent
ME = "mx.example.test"
DOMAIN = "example.test"
PASSWORD = "correct horse battery"
DEADLINE = 10.0
START_DEADLINE = 30.0
TWISTD = "from twisted.scripts.twistd import run; run()"

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = DEADLINE,
               interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nobody listens on right now (the kernel's pick for port 0), and
    never one this test process was given before: a server asks for several,
    and the kernel may pick a closed probe's port again."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


class DeadPort:
    """A loopback port that refuses every connection for as long as this object
    lives: bound, never listening, so no other program can take it meanwhile."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]

    def close(self) -> None:
        self._socket.close()


def replace_file(path: Path, content: str | bytes) -> None:
    """Write through a temporary file and a rename, as an admin's tools do, and
    move the mtime forward so a watcher comparing stat data cannot miss it."""
    data = content.encode() if isinstance(content, str) else content
    try:
        old_mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        old_mtime = 0
    scratch = path.with_name(f".{path.name}.new")
    scratch.write_bytes(data)
    os.replace(scratch, path)
    stamp = max(time.time_ns(), old_mtime + 1_000_000_000)
    os.utime(path, ns=(stamp, stamp))


@dataclass
class Home:
    """A qtwist home: control files, tcp.smtp, domains with Maildirs."""

    path: Path
    _read_cache: dict[Path, bytes] = field(default_factory=dict, repr=False)

    def control(self, name: str, text: str) -> None:
        replace_file(self.path / "control" / name, text)

    def tcp_smtp(self, text: str) -> None:
        replace_file(self.path / "tcp.smtp", text)

    def maildir(self, address: str) -> Path:
        user, _, domain = address.partition("@")
        return self.path / "domains" / domain / user / "Maildir"

    def mailbox(self, maildir: Path) -> dict[Path, bytes]:
        """Every delivered file of a Maildir (new/ and cur/) with its bytes.
        Delivered files never change, so each is read once."""
        found = {}
        for sub in ("new", "cur"):
            for entry in (maildir / sub).iterdir():
                if entry not in self._read_cache:
                    self._read_cache[entry] = entry.read_bytes()
                found[entry] = self._read_cache[entry]
        return found

    def wait_for_message(self, maildir: Path, marker: bytes, timeout: float = DEADLINE) -> bytes:
        """The one message in ``maildir`` that contains ``marker``, once it is there."""
        def matching() -> list[bytes]:
            return [data for data in self.mailbox(maildir).values() if marker in data]
        found = wait_until(matching, f"a message with {marker[:60]!r} in {maildir}", timeout)
        assert len(found) == 1, f"{len(found)} messages with {marker!r} in {maildir}"
        return found[0]

    def messages_with(self, maildir: Path, marker: bytes) -> list[bytes]:
        return [data for data in self.mailbox(maildir).values() if marker in data]

    def qtwist(self, *args: str, check: bool = True, extra_path: Path | None = None) -> subprocess.CompletedProcess:
        """Run the ``qtwist`` command (as ``python -m qtwist``) on this home."""
        done = subprocess.run([sys.executable, "-m", "qtwist", "--home", str(self.path), *args],
                              capture_output=True, text=True, env=child_environment(extra_path), timeout=60)
        if check:
            assert done.returncode == 0, f"qtwist {' '.join(args)}: {done.stderr}"
        return done

    def qstat(self) -> tuple[int, int]:
        """(messages in queue, not yet preprocessed), read from ``qtwist qstat``."""
        lines = self.qtwist("qstat").stdout.splitlines()
        return int(lines[0].rpartition(":")[2]), int(lines[1].rpartition(":")[2])

    def qread(self) -> str:
        return self.qtwist("qread").stdout


def make_home(root: Path, *, users: tuple[str, ...] = ("alice", "bob"),
              controls: dict[str, str] | None = None, tcp_smtp: str | None = None) -> Home:
    """A home for ``me`` = mx.example.test with the virtual domain example.test
    (in rcpthosts) and its users, plus qmail's ~alias postmaster for envnoathost
    addresses: HOME/alias/.qmail-postmaster delivers to HOME/alias/Maildir/."""
    root.mkdir(parents=True, exist_ok=True)
    home = Home(root)
    (root / "control").mkdir(exist_ok=True)
    (root / "control" / "me").write_text(f"{ME}\n")
    db = UserDB(root)
    db.add_domain(DOMAIN)
    for user in users:
        db.add_user(f"{user}@{DOMAIN}", PASSWORD)
    for sub in ("new", "cur", "tmp"):
        (root / "alias" / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
    dot_qmail = root / "alias" / ".qmail-postmaster"
    dot_qmail.write_text("./Maildir/\n")
    dot_qmail.chmod(0o644)
    for name, text in (controls or {}).items():
        path = root / "control" / name
        if name == "rcpthosts":
            listed = path.read_text()  # add to the domain add_domain listed
            text = listed + ("" if listed.endswith("\n") else "\n") + text
        path.write_text(text)
    if tcp_smtp is not None:
        (root / "tcp.smtp").write_text(tcp_smtp)
    return home


def child_environment(extra_path: Path | None = None) -> dict[str, str]:
    """The repository first on the path (then ``extra_path``, e.g. a plugin
    package installed for a test), and unbuffered output so the log file shows
    each line as it is written."""
    environment = dict(os.environ)
    paths = [str(REPO)] + ([str(extra_path)] if extra_path else [])
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def _loopback_endpoint(port: int | None) -> str:
    return "none" if port is None else f"tcp:{port}:interface=127.0.0.1"


class Server:
    """``twistd -n qmail`` on 127.0.0.1:``port`` for ``home``; its log (stdout and
    stderr) goes to HOME/twistd.log, appended across restarts."""

    def __init__(self, home: Home, port: int | None = None, dns_port: int | None = None, *,
                 submission: bool = False, smtps: bool = False, extra_path: Path | None = None) -> None:
        self.home = home
        self.extra_path = extra_path
        self.port = port or free_port()
        self.dns_port = dns_port
        # The submission and SMTPS listeners are off unless asked for.
        self.submission_port = free_port() if submission else None
        self.smtps_port = free_port() if smtps else None
        self.log_path = home.path / "twistd.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        command = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "qmail",
                   "--home", str(self.home.path),
                   "--smtp", f"tcp:{self.port}:interface=127.0.0.1",
                   "--submission", _loopback_endpoint(self.submission_port), "--pop3", "none"]
        if self.smtps_port is not None:
            command += ["--smtps", _loopback_endpoint(self.smtps_port)]
        if self.dns_port is not None:
            command += ["--nameserver", f"127.0.0.1:{self.dns_port}"]
        return command

    @property
    def ports(self) -> list[int]:
        return [port for port in (self.port, self.submission_port, self.smtps_port) if port is not None]

    def start(self, timeout: float = START_DEADLINE) -> Server:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.home.path,
                                            env=child_environment(self.extra_path))

        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited with {self.process.returncode}:\n{self.log}")
            try:
                for port in self.ports:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True
        wait_until(listening, f"twistd to listen on ports {self.ports}", timeout)
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

    def connect(self, source: str = "127.0.0.1", timeout: float = DEADLINE) -> socket.socket:
        """A raw client socket from ``source`` (any 127.x address: tcp.smtp tells them apart)."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout, source_address=(source, 0))

    def smtp(self, source: str = "127.0.0.1", timeout: float = DEADLINE) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=timeout, source_address=(source, 0))

    def barrier(self, recipient: str, tag: str) -> None:
        """Queue a message from ``<tag@barrier.test>`` and wait for its queue log
        line.  Whatever the server queued before it is in the log by then, so a
        message missing from the log was never queued."""
        with self.smtp() as client:
            client.sendmail(f"{tag}@barrier.test", [recipient], f"Subject: {tag}\r\n\r\nbarrier\r\n")
        self.wait_for_log(f"from <{tag}@barrier.test>")


def read_replies(sock: socket.socket, count: int, timeout: float = DEADLINE) -> list[bytes]:
    """Exactly ``count`` complete SMTP replies (multi-line ones joined), in order."""
    replies: list[bytes] = []
    buffer = b""
    current: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(replies) < count:
        while b"\r\n" in buffer and len(replies) < count:
            line, buffer = buffer.split(b"\r\n", 1)
            current.append(line)
            if line[3:4] != b"-":
                replies.append(b"\r\n".join(current))
                current = []
        if len(replies) == count:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"only {len(replies)} of {count} replies: {replies!r} then {buffer!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no reply within {timeout:g} s; got {replies!r} then {buffer!r}") from None
        if not chunk:
            raise AssertionError(f"closed after {len(replies)} of {count} replies: {replies!r} then {buffer!r}")
        buffer += chunk
    return replies


def read_until_closed(sock: socket.socket, timeout: float = DEADLINE) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"still open after {timeout:g} s; got {received[-300:]!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            raise AssertionError(f"still open after {timeout:g} s; got {received[-300:]!r}") from None
        if not chunk:
            return received
        received += chunk


# -- talking SMTP by hand ----------------------------------------------------------

def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def session(server: Server, source: str = "127.0.0.1") -> socket.socket:
    """A connected client that has read the banner."""
    sock = server.connect(source)
    banner, = read_replies(sock, 1)
    assert banner.startswith(b"220 "), banner
    return sock


def ask(sock: socket.socket, *lines: str | bytes) -> list[bytes]:
    """Send each line (CRLF added) and read its reply, one at a time."""
    replies = []
    for line in lines:
        sock.sendall((line.encode("latin-1") if isinstance(line, str) else line) + b"\r\n")
        replies += read_replies(sock, 1)
    return replies


def wire(message: bytes) -> bytes:
    """An LF message as DATA carries it: CRLF line ends, leading dots doubled.
    ``message`` is empty or ends with LF."""
    lines = message.split(b"\n")[:-1]
    return b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines)



# -- a tiny SMTP server to relay to --------------------------------------------

@dataclass
class SunkMessage:
    sender: str
    recipients: list[str]
    data: bytes  # as sent, CRLF line ends, dot-stuffing removed


class _SinkHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP (no extensions) to take mail the way a relay would."""

    server: "_SinkServer"

    def handle(self) -> None:
        self._reply(b"220 sink.example.test ESMTP")
        sender, recipients = "", []
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            argument = line.rstrip(b"\r\n")[5:].decode("latin-1")
            if verb in (b"EHLO", b"HELO"):
                self._reply(b"250 sink.example.test")
            elif verb == b"MAIL":
                sender, recipients = argument.partition(":")[2].strip().strip("<>"), []
                self._reply(b"250 ok")
            elif verb == b"RCPT":
                recipients.append(argument.partition(":")[2].strip().strip("<>"))
                self._reply(b"250 ok")
            elif verb == b"DATA":
                self._reply(b"354 go ahead")
                lines = []
                while True:
                    data_line = self.rfile.readline()
                    if not data_line or data_line == b".\r\n":
                        break
                    lines.append(data_line[1:] if data_line.startswith(b".") else data_line)
                self.server.received(SunkMessage(sender, recipients, b"".join(lines)))
                self._reply(b"250 ok sunk")
            elif verb == b"QUIT":
                self._reply(b"221 sink.example.test")
                return
            else:
                self._reply(b"250 ok")

    def _reply(self, line: bytes) -> None:
        self.wfile.write(line + b"\r\n")
        self.wfile.flush()


class _SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.messages: list[SunkMessage] = []
        self._lock = threading.Lock()

    def received(self, message: SunkMessage) -> None:
        with self._lock:
            self.messages.append(message)


class SMTPSink:
    """A loopback SMTP server in a thread that keeps every message it is given,
    to point smtproutes at."""

    def __init__(self) -> None:
        self._server = _SinkServer()
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="smtp-sink", daemon=True)
        self._thread.start()

    @property
    def messages(self) -> list[SunkMessage]:
        with self._server._lock:
            return list(self._server.messages)

    def wait_for(self, marker: bytes, timeout: float = DEADLINE) -> SunkMessage:
        def matching() -> list[SunkMessage]:
            return [message for message in self.messages if marker in message.data]
        return wait_until(matching, f"a message with {marker!r} at the sink", timeout)[0]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(DEADLINE)
