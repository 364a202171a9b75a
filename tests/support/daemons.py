"""Debian's spamd and clamd for the scanning tests, each on a free loopback
port with configuration written here: spamd runs local tests only (no DNS,
no network), and clamd gets its own signature database, since it cannot
download ClamAV's: the EICAR test string as an .ndb signature."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.support.waiting import free_port, listening, wait_until

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "Qtwist-Test.EICAR"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
START_DEADLINE = 60.0


class Daemon:
    """One daemon process; ``stop`` ends it (as an admin's restart would, mid-run)."""

    def __init__(self, command: list[str], port: int, log: Path, cleanup: Path | None = None) -> None:
        self.command = command
        self.port = port
        self.log = log
        self.cleanup = cleanup  # a directory of its own to remove once it is stopped
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Daemon":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.command[0]} exited:\n{self.log.read_text(errors='replace')[-2000:]}")
            return listening("127.0.0.1", self.port)
        wait_until(up, f"{self.command[0]} on port {self.port}", START_DEADLINE)
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


def spamd(work: Path) -> Daemon:
    work.mkdir(parents=True, exist_ok=True)
    # spamd's children run as nobody and read the site configuration then: it
    # lives where nobody may read it, not under a test's private directory.
    site = Path(tempfile.mkdtemp(prefix="qtwist-spamd-site-"))
    site.chmod(0o755)
    for loader in Path("/etc/spamassassin").glob("*.pre"):  # which rule plugins load, as Debian ships it
        shutil.copy(loader, site)
    (site / "local.cf").write_text(SPAMD_SITE)
    port = free_port()
    command = ["/usr/sbin/spamd", f"--listen=127.0.0.1:{port}", "--allowed-ips=127.0.0.1", "--max-children=4",
               "--local", "--nouser-config", "--username=nobody", "--syslog=stderr", f"--siteconfigpath={site}",
               f"--pidfile={work / 'spamd.pid'}"]
    return Daemon(command, port, work / "spamd.log", cleanup=site)


def clamd(work: Path, stream_limit: str = "25M") -> Daemon:
    database = work / "db"
    database.mkdir(parents=True, exist_ok=True)
    (database / "qtwist-test.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n")
    port = free_port()
    config = work / "clamd.conf"
    config.write_text(f"DatabaseDirectory {database}\nTCPSocket {port}\nTCPAddr 127.0.0.1\nForeground yes\n"
                      f"LogFile {work / 'clamd-own.log'}\nStreamMaxLength {stream_limit}\n")
    return Daemon(["/usr/sbin/clamd", "-c", str(config)], port, work / "clamd.log")
