"""A qtwist home in a temporary folder, as an admin would set one up: control
files, tcp.smtp, a virtual domain with users and Maildirs, and the ``qtwist``
command to run on it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qtwist.fsutil import replace_file
from qtwist.users import UserDB

REPO = Path(__file__).resolve().parent.parent.parent
ME = "mx.example.test"
DOMAIN = "example.test"
PASSWORD = "correct horse battery"


def edit_file(path: Path, content: str | bytes) -> None:
    """Write as an admin's tools do (a new file renamed into place), and move
    the mtime forward, so a watcher comparing stat data cannot miss it."""
    data = content.encode() if isinstance(content, str) else content
    try:
        old_mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        old_mtime = 0
    replace_file(path, data, 0o644, durable=False)
    stamp = max(time.time_ns(), old_mtime + 1_000_000_000)
    os.utime(path, ns=(stamp, stamp))


def child_environment(extra_path: Path | None = None) -> dict[str, str]:
    """The repository first on the path (then ``extra_path``, e.g. a plugin
    package installed for a test), and unbuffered output so a log file shows
    each line as it is written."""
    environment = dict(os.environ)
    paths = [str(REPO)] + ([str(extra_path)] if extra_path else [])
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


@dataclass
class Home:
    """A qtwist home: control files, tcp.smtp, domains with Maildirs."""

    path: Path
    _read_cache: dict[Path, bytes] = field(default_factory=dict, repr=False)

    def control(self, name: str, text: str) -> None:
        edit_file(self.path / "control" / name, text)

    def tcp_smtp(self, text: str) -> None:
        edit_file(self.path / "tcp.smtp", text)

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

    def messages_with(self, maildir: Path, marker: bytes) -> list[bytes]:
        return [data for data in self.mailbox(maildir).values() if marker in data]

    def wait_for_message(self, maildir: Path, marker: bytes, timeout: float | None = None) -> bytes:
        """The one message in ``maildir`` that contains ``marker``, once it is there."""
        from tests.support.waiting import DEADLINE, wait_until

        found = wait_until(lambda: self.messages_with(maildir, marker),
                           f"a message with {marker[:60]!r} in {maildir}", timeout or DEADLINE)
        assert len(found) == 1, f"{len(found)} messages with {marker!r} in {maildir}"
        return found[0]

    def qtwist(self, *args: str, check: bool = True, extra_path: Path | None = None,
               stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run the ``qtwist`` command (as ``python -m qtwist``) on this home."""
        done = subprocess.run([sys.executable, "-m", "qtwist", "--home", str(self.path), *args], input=stdin,
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


def set_flags(root: Path, address: str, flags: int) -> None:
    """vpopmail's flag bits (qtwist.users: NO_POP, NO_RELAY...) in a user's
    vpasswd gid field, as vmoduser sets them."""
    name, _, domain = address.partition("@")
    vpasswd = root / "domains" / domain / "vpasswd"
    lines = []
    for line in vpasswd.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            fields[3] = str(flags)
        lines.append(":".join(fields))
    edit_file(vpasswd, "\n".join(lines) + "\n")


def make_home(root: Path, *, users: tuple[str, ...] = ("alice", "bob"),
              controls: dict[str, str] | None = None, tcp_smtp: str | None = None,
              cleartext: bool = False) -> Home:
    """A home for ``me`` = mx.example.test with the virtual domain example.test
    (in rcpthosts) and its users (with the clear-text field CRAM-MD5 and APOP
    need when ``cleartext``), plus qmail's ~alias postmaster for envnoathost
    addresses: HOME/alias/.qmail-postmaster delivers to HOME/alias/Maildir/."""
    root.mkdir(parents=True, exist_ok=True)
    home = Home(root)
    (root / "control").mkdir(exist_ok=True)
    (root / "control" / "me").write_text(f"{ME}\n")
    db = UserDB(root)
    db.add_domain(DOMAIN)
    for user in users:
        db.add_user(f"{user}@{DOMAIN}", PASSWORD, cleartext=cleartext)
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
