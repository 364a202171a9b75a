"""Debian's spamd and clamd for the scanning tests, each on a free loopback
port (or a unix socket) with configuration written here: spamd runs local
tests only (no DNS, no network), and clamd gets its own signature database,
since it cannot download ClamAV's: the EICAR test string as an .ndb
signature.  ``Faulty`` is the daemon that goes wrong: it answers garbage,
or takes the request and never answers."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

from tests.support.waiting import free_port, listening, wait_until

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "Qtwist-Test.EICAR"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
START_DEADLINE = 60.0


class Daemon:
    """One daemon process; ``stop`` ends it (as an admin's restart would, mid-run)."""

    def __init__(self, command: list[str], address: int | Path, log: Path, cleanup: Path | None = None) -> None:
        self.command = command
        self.port = address if isinstance(address, int) else None
        self.socket = address if isinstance(address, Path) else None
        self.log = log
        self.cleanup = cleanup  # a directory of its own to remove once it is stopped
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """As control/spamdserver and control/clamdserver take it."""
        return str(self.socket) if self.socket else f"127.0.0.1:{self.port}"

    def start(self) -> "Daemon":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.command[0]} exited:\n{self.log.read_text(errors='replace')[-2000:]}")
            return _answers_on(self.socket) if self.socket else listening("127.0.0.1", self.port)
        wait_until(up, f"{self.command[0]} on {self.address}", START_DEADLINE)
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
        if self.cleanup is not None:
            shutil.rmtree(self.cleanup, ignore_errors=True)


# No learning, no network: each check is the rules alone (a quarter of the time
# the defaults take here, where Bayes and DNS only wait).
SPAMD_SITE = """use_bayes 0
bayes_auto_learn 0
dns_available no
skip_rbl_checks 1
use_razor2 0
use_pyzor 0
"""


def _answers_on(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def spamd(work: Path, unix: bool = False) -> Daemon:
    work.mkdir(parents=True, exist_ok=True)
    # spamd's children run as nobody and read the site configuration then: it
    # lives where nobody may read it, not under a test's private directory.
    site = Path(tempfile.mkdtemp(prefix="qtwist-spamd-site-"))
    site.chmod(0o755)
    for loader in Path("/etc/spamassassin").glob("*.pre"):  # which rule plugins load, as Debian ships it
        shutil.copy(loader, site)
    (site / "local.cf").write_text(SPAMD_SITE)
    address: int | Path = work / "spamd.sock" if unix else free_port()
    listen = [f"--socketpath={address}"] if unix else [f"--listen=127.0.0.1:{address}", "--allowed-ips=127.0.0.1"]
    command = ["/usr/sbin/spamd", *listen, "--max-children=4", "--local", "--nouser-config", "--username=nobody",
               "--syslog=stderr", f"--siteconfigpath={site}", f"--pidfile={work / 'spamd.pid'}"]
    return Daemon(command, address, work / "spamd.log", cleanup=site)


def clamd(work: Path, stream_limit: str = "25M", unix: bool = False) -> Daemon:
    database = work / "db"
    database.mkdir(parents=True, exist_ok=True)
    (database / "qtwist-test.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n")
    address: int | Path = work / "clamd.sock" if unix else free_port()
    listen = f"LocalSocket {address}\n" if unix else f"TCPSocket {address}\nTCPAddr 127.0.0.1\n"
    config = work / "clamd.conf"
    config.write_text(f"DatabaseDirectory {database}\n{listen}Foreground yes\n"
                      f"LogFile {work / 'clamd-own.log'}\nStreamMaxLength {stream_limit}\n")
    return Daemon(["/usr/sbin/clamd", "-c", str(config)], address, work / "clamd.log")


class Faulty:
    """A scanning daemon gone wrong, on a free loopback port: it reads each
    request and then either answers ``garbage`` and hangs up, or (with
    ``garbage=None``) keeps the connection open without a word until closed."""

    def __init__(self, garbage: bytes | None) -> None:
        self.garbage = garbage
        self.requests = 0  # connections that have sent something
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name=f"faulty-daemon-{self.address}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with self._lock:
            self._open.append(connection)
        try:
            if connection.recv(65536):
                with self._lock:
                    self.requests += 1
                if self.garbage is not None:
                    connection.sendall(self.garbage)
                    connection.close()
        except OSError:
            pass  # closed by close() or by the client

    def close(self) -> None:
        with self._lock:
            sockets = [self._listener, *self._open]
        for each in sockets:  # shutdown wakes a thread blocked in accept() or recv()
            try:
                each.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected (any more)
            each.close()

    def __enter__(self) -> "Faulty":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
