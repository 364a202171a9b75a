"""qmail-local's job for a vpopmail home: one message to one local recipient.

A recipient of a virtual domain (HOME/domains/D) is resolved as qmail-local
plus vdelivermail would: dot-qmail files in the domain folder first
(``.qmail-user-ext``, ``.qmail-user-default``...), then the vpasswd user's
Maildir, then ``.qmail-default``.  A domain in ``locals`` without a domains/
folder has qmail's ~alias: HOME/alias/.qmail-*.  The wording of every result
is qmail's or vpopmail's, since admins and users grep logs and bounces for it.

Everything here blocks on the disk: the qmail-lspawn child (lspawn.py) runs
``deliver`` in its delivery threads, and the chkuser plugin runs
``mailbox_check`` in a worker thread.  Maildir itself (names, fsyncs,
quotas) is maildir.py's.  Forwards are returned, not sent: the scheduler
queues them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shlex
import signal
import stat
import string
import subprocess
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from qtwist import maildir
from qtwist.delivery import Outcome
from qtwist.fsutil import write_all
from qtwist.users import BOUNCE_MAIL, IUserStore, User, UserStoreUnavailable

if TYPE_CHECKING:
    from qtwist.control import Settings

NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)"
LOOPING = "This message is looping: it already has my Delivered-To line. (#5.4.6)"
PROGRAMS_DISABLED = "program delivery is disabled in this installation (#5.7.1)"
OVER_QUOTA = "Over quota. (#4.2.2)"
ACCOUNT_LOCKED = "Sorry, this account is locked: mail to it is bounced. (#5.2.1)"
DELETED = "discarded by vdelivermail delete"

# A dot-qmail program that runs longer than this is killed and the delivery deferred.
PROGRAM_TIMEOUT = 600.0
# qmail-local's patience with a locked mbox.
MBOX_LOCK_TIMEOUT = 30.0
# What qmail-local does with an empty dot-qmail file (qmail-start's usual argument).
ALIASEMPTY = "./Maildir/"

# Program exit codes qmail-local takes as permanent failures (100 and sysexits' hard ones).
_HARD_EXITS = frozenset({100, 64, 65, 70, 76, 77, 78, 112})
# Errors that mean "there is no such dot-qmail file", not "try again later"
# (qmail-local skips anything that is not a regular file, a folder included).
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})
_PATRN = 0o002  # qmail's conf-patrn: a world-writable dot-qmail is not trusted
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)


class _Stop(Exception):
    """Ends the delivery at once with this outcome, as qmail-local's exits do."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


@dataclass
class _Delivery:
    """One message for one recipient, and what has been done with it so far."""

    settings: Settings
    users: IUserStore
    recipient: str
    local: str
    host: str
    sender: str
    message: bytes
    domain_dir: str | None  # the folder under HOME/domains, None for ~alias
    dtline: bytes
    rpline: bytes
    files: int = 0
    programs: int = 0
    forwards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @cached_property
    def data(self) -> bytes:
        """The message as a mailbox stores it: Return-Path and Delivered-To first."""
        return self.rpline + self.dtline + self.message

    def success(self) -> Outcome:
        """qmail-local's report: files+forwards+programs, after any program's words."""
        did = f"did {self.files}+{len(self.forwards)}+{self.programs}"
        return Outcome.success("".join(f"{line}\n" for line in [*self.notes, did]),
                               forwards=tuple(self.forwards))


def deliver(home: Path, settings: Settings, users: IUserStore, recipient: str, sender: str,
            message: bytes) -> Outcome:
    """Deliver ``message`` (LF line ends, Received: already on top) to ``recipient``.

    Never raises for trouble on disk: that is a deferral with the OS's words.
    """
    local, at, host = recipient.rpartition("@")
    host = host.lower()
    delivery = _Delivery(
        settings=settings, users=users, recipient=recipient, local=local, host=host,
        sender=sender, message=message, domain_dir=None,
        dtline=f"Delivered-To: {_one_line(recipient)}\n".encode("utf-8", "surrogateescape"),
        rpline=f"Return-Path: <{_one_line(sender)}>\n".encode("utf-8", "surrogateescape"))
    if not at:
        return Outcome.failure(NO_MAILBOX)
    if _already_delivered(message, delivery.dtline):
        return Outcome.failure(LOOPING)
    try:
        domain_dir = settings.local_domain(host)
        if domain_dir is not None:
            delivery.domain_dir = domain_dir
            return _deliver_virtual(delivery, Path(home) / "domains" / domain_dir)
        if host in settings.locals:
            return _deliver_alias(delivery, Path(home) / "alias")
        return Outcome.failure(NO_MAILBOX)
    except _Stop as stop:
        return stop.outcome
    except OSError as error:
        return Outcome.deferral(f"Temporary error on local delivery: {_os_text(error)}. (#4.3.0)")
    except UserStoreUnavailable:
        return Outcome.deferral("Temporary failure: the user database is unavailable. (#4.3.0)")


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "_")


def _os_text(error: OSError) -> str:
    return error.strerror or str(error)


def _already_delivered(message: bytes, dtline: bytes) -> bool:
    """qmail-local's loop check: our exact Delivered-To line among the header lines
    (compared without regard to case, so a forward back by another spelling is caught)."""
    if message.startswith(b"\n"):
        return False
    end = message.find(b"\n\n")
    header = b"\n" + (message if end < 0 else message[:end + 1]).lower()
    if not header.endswith(b"\n"):
        header += b"\n"
    return b"\n" + dtline.lower() in header


# -- resolving the recipient ---------------------------------------------------------------

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _dot_qmail_names(local: str) -> list[tuple[str, str | None]]:
    """qmail-local's search order for LOCAL, with the DEFAULT each name gives.

    ``a-b-c``: .qmail-a-b-c, .qmail-a-b-default, .qmail-a-default, .qmail-default.
    The extension is lowercased (ASCII only: a longer lower case would shift
    every DEFAULT) and '.' becomes ':', as qmail-local does; a name
    that would hold '/' (a path out of the folder) is never tried.
    """
    safe = local.translate(_ASCII_LOWER).replace(".", ":")
    names: list[tuple[str, str | None]] = [(f".qmail-{safe}", None)]
    for cut in range(len(safe), -1, -1):
        if cut == 0 or safe[cut - 1] == "-":
            names.append((f".qmail-{safe[:cut]}default", local[cut:]))
    return [(name, default) for name, default in names if "/" not in name and "\0" not in name]


def _deliver_virtual(delivery: _Delivery, domain_path: Path) -> Outcome:
    """dot-qmail (not .qmail-default), then the store's alias (valias, read
    first by vdelivermail), then the user, then .qmail-default."""
    names = _dot_qmail_names(delivery.local)
    for name, default in names[:-1]:
        if _follow_if_present(delivery, domain_path / name, default):
            return delivery.success()
    lines = delivery.users.aliases(delivery.local, delivery.host)
    if lines:
        _follow(delivery, domain_path / ".qmail-valias", "".join(f"{line}\n" for line in lines), None,
                forward_only=False)
        return delivery.success()
    user = _find_user(delivery)
    if user is not None:
        _deliver_user(delivery, user)
        return delivery.success()
    if _follow_if_present(delivery, domain_path / ".qmail-default", delivery.local):
        return delivery.success()
    return Outcome.failure(NO_MAILBOX)


def _deliver_alias(delivery: _Delivery, alias_path: Path) -> Outcome:
    """qmail's ~alias for a domain in locals: HOME/alias/.qmail-LOCAL, then the defaults."""
    for name, default in _dot_qmail_names(delivery.local):
        if _follow_if_present(delivery, alias_path / name, default):
            return delivery.success()
    return Outcome.failure(NO_MAILBOX)


def _find_user(delivery: _Delivery) -> User | None:
    """The vpasswd user for the local part; None outside virtual domains."""
    if delivery.domain_dir is None:
        return None
    return _vpasswd_user(delivery.users, delivery.local, delivery.domain_dir)


def _vpasswd_user(users: IUserStore, local: str, domain_dir: str) -> User | None:
    """The user for ``local``; for ``user-ext`` the longest existing ``user``
    (vpopmail's QMAIL_EXT)."""
    candidate = local.lower()
    while candidate:
        user = users.lookup(f"{candidate}@{domain_dir}")
        if user is not None:
            return user
        candidate = candidate.rpartition("-")[0]
    return None


def mailbox_check(home: Path, settings: Settings, users: IUserStore, recipient: str) -> str:
    """chkuser's question, asked at RCPT: would delivery find a mailbox?
    "ok", "unknown" or "full".  It follows deliver()'s order without
    delivering; anything it cannot judge (other programs, forwards, a
    catch-all .qmail-default) is "ok", as delivery decides later."""
    local, _, host = recipient.rpartition("@")
    domain_dir = settings.local_domain(host.lower())
    if domain_dir is None:
        return "ok"
    domain_path = Path(home) / "domains" / domain_dir
    names = _dot_qmail_names(local)
    if any((domain_path / name).is_file() for name, _ in names[:-1]) or users.aliases(local, host.lower()):
        return "ok"
    user = _vpasswd_user(users, local, domain_dir)
    if user is not None:
        if user.gid & BOUNCE_MAIL:
            return "unknown"
        quota = user.quota_bytes
        try:
            if quota is not None and maildir.quota_used(user.maildir, quota) >= quota:
                return "full"
        except OSError:
            pass  # no Maildir yet: delivery makes it
        return "ok"
    try:
        default = (domain_path / ".qmail-default").read_text("utf-8", "surrogateescape")
    except OSError:
        return "unknown"
    if any(line.startswith("|") and _bounces_unknown_users(line[1:]) for line in default.split("\n")):
        return "unknown"
    return "ok"


def _bounces_unknown_users(command: str) -> bool:
    """vpopmail's usual .qmail-default: ``| vdelivermail '' bounce-no-mailbox``."""
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    return len(words) >= 3 and os.path.basename(words[0]) == "vdelivermail" and words[2] == "bounce-no-mailbox"


# -- dot-qmail files ---------------------------------------------------------------------------


def _follow_if_present(delivery: _Delivery, path: Path, default: str | None) -> bool:
    """Carry out the dot-qmail file at ``path``; False when there is none."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        if error.errno in _ABSENT:
            return False
        raise _Stop(Outcome.deferral(f"Unable to open {path}: {_os_text(error)}. (#4.3.0)"))
    with handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            return False
        if st.st_mode & _PATRN:
            raise _Stop(Outcome.deferral("Uh-oh: .qmail file is writable. (#4.7.0)"))
        text = handle.read().decode("utf-8", "surrogateescape")
    # qmail: the x bit makes a dot-qmail file forward-only (a mailing list).
    _follow(delivery, path, text or ALIASEMPTY, default, forward_only=bool(st.st_mode & 0o100))
    return True


def _follow(delivery: _Delivery, path: Path, text: str, default: str | None,
            forward_only: bool) -> None:
    """qmail-local's loop over the lines; the first trouble ends the whole delivery."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    for number, raw in enumerate(lines):
        line = raw.rstrip(" \t\r")
        if not line:
            if number == 0:
                raise _Stop(Outcome.deferral("Uh-oh: first line of .qmail file is blank. (#4.2.1)"))
            continue
        kind = line[0]
        if kind == "#":
            continue
        if "\0" in line:  # no file name, address or command holds one
            raise _Stop(Outcome.deferral(f"Uh-oh: line {number + 1} of .qmail file holds a NUL byte. (#4.2.1)"))
        if kind in "./":
            delivery.files += 1
            if forward_only:
                raise _Stop(Outcome.deferral(
                    "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)"))
            target = path.parent / line if kind == "." else Path(line)
            if line.endswith("/"):
                _write_maildir(target, delivery.data, create=False)
            else:
                _append_mbox(target, delivery)
        elif kind == "|":
            if forward_only:
                raise _Stop(Outcome.deferral(
                    "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)"))
            if _program(delivery, path, line[1:], default):
                break  # exit code 99: the program says the rest of the file is skipped
        elif kind == "+":
            forward_only = forward_only or line == "+list"
        else:
            delivery.forwards.append(line[1:] if kind == "&" else line)


# -- vpasswd users -----------------------------------------------------------------------------


def _deliver_user(delivery: _Delivery, user: User) -> None:
    """The user's Maildir, under the vpasswd quota, as vdelivermail delivers."""
    if user.gid & BOUNCE_MAIL:
        raise _Stop(Outcome.failure(ACCOUNT_LOCKED))
    size = len(delivery.data)
    quota = user.quota_bytes
    # vpopmail defers a message over quota; the scheduler bounces it at queuelifetime.
    if quota is not None and not maildir.quota_allows(user.maildir, quota, size):
        raise _Stop(Outcome.deferral(OVER_QUOTA))
    _write_maildir(user.maildir, delivery.data, create=True)
    delivery.files += 1
    if quota is not None:
        maildir.note_delivered(user.maildir, size)


# -- Maildir -----------------------------------------------------------------------------------


def _write_maildir(target: Path, data: bytes, create: bool) -> None:
    try:
        maildir.deliver(target, data, create)
    except OSError as error:
        raise _Stop(Outcome.deferral(_maildir_trouble(target, error)))


def _maildir_trouble(target: Path, error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        code = "4.3.1"  # mail system full
    elif error.errno == errno.ENOENT:
        code = "4.2.1"  # no such Maildir: qmail-local's "Unable to chdir to maildir"
    else:
        code = "4.3.0"
    return f"Unable to deliver to maildir {target}: {_os_text(error)}. (#{code})"


# -- mbox ---------------------------------------------------------------------------------------


def _append_mbox(path: Path, delivery: _Delivery) -> None:
    """qmail-local's mailfile(): a From_ line, ``>From `` quoting, under an fcntl lock;
    a failed write is cut off again so the mbox stays whole."""
    sender = delivery.sender or "MAILER-DAEMON"
    for char in " \t\n":
        sender = sender.replace(char, "-")
    from_line = f"From {sender} {time.asctime(time.gmtime())}\n".encode("utf-8", "surrogateescape")
    body = _FROM_LINE.sub(rb">\1", delivery.message)
    if not body.endswith(b"\n"):
        body += b"\n"
    entry = from_line + delivery.rpline + delivery.dtline + body + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise _Stop(Outcome.deferral(f"Unable to open {path}: {_os_text(error)}. (#4.2.1)"))
    try:
        locked = _lock(fd)
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            write_all(fd, entry)
            os.fsync(fd)
        except OSError as error:
            if locked:
                os.ftruncate(fd, start)
            raise _Stop(Outcome.deferral(f"Unable to write {path}: {_os_text(error)}. (#4.3.0)"))
    finally:
        os.close(fd)


def _lock(fd: int) -> bool:
    """Exclusive locks, waiting up to MBOX_LOCK_TIMEOUT in all; False when the file
    system has none (qmail-local then appends unlocked).

    flock, as qmail-local takes on Linux, also keeps our own threads apart (fcntl
    locks belong to the process); an fcntl lock on top is what mail readers wait for.
    """
    deadline = time.monotonic() + MBOX_LOCK_TIMEOUT
    for lock in (fcntl.flock, fcntl.lockf):
        while True:
            try:
                lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    return lock is fcntl.lockf  # no fcntl locks here: flock must do
            if time.monotonic() >= deadline:
                raise _Stop(Outcome.deferral("File has been locked for 30 seconds straight. (#4.3.0)"))
            time.sleep(0.05)  # another holder; neither call can wait with a timeout
    return True


# -- programs -----------------------------------------------------------------------------------


def _program(delivery: _Delivery, path: Path, command: str, default: str | None) -> bool:
    """A ``|command`` line; True when it exits 99 (stop here).

    vdelivermail is understood, not run; other programs run only when
    control/dotqmailprograms allows it.
    """
    if _vdelivermail(delivery, path, command):
        return False
    delivery.programs += 1
    if not delivery.settings.dotqmailprograms:
        raise _Stop(Outcome.failure(PROGRAMS_DISABLED))
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "SENDER": delivery.sender,
        "NEWSENDER": delivery.sender,
        "RECIPIENT": delivery.recipient,
        "LOCAL": delivery.local,
        "HOST": delivery.host,
        "EXT": delivery.local,
        "HOME": str(path.parent),
        "DTLINE": delivery.dtline.decode("utf-8", "surrogateescape"),
        "RPLINE": delivery.rpline.decode("utf-8", "surrogateescape"),
    }
    if default is not None:
        env["DEFAULT"] = default
    process = subprocess.Popen(["/bin/sh", "-c", command], cwd=path.parent, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(delivery.message, timeout=PROGRAM_TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the shell and whatever it started
        except ProcessLookupError:
            pass  # exited at the last moment
        process.communicate()
        raise _Stop(Outcome.deferral("Timeout on program delivery. (#4.3.0)")) from None
    said = output.decode("utf-8", "replace").strip()[:1000]
    code = process.returncode
    if code < 0:
        raise _Stop(Outcome.deferral(said or "Aack, child crashed. (#4.3.0)"))
    if code in _HARD_EXITS:
        raise _Stop(Outcome.failure(said or f"Program delivery failed with exit code {code}. (#5.0.0)"))
    if code not in (0, 99):
        raise _Stop(Outcome.deferral(
            said or f"Program delivery failed with exit code {code}. (#4.3.0)"))
    if said:
        delivery.notes.append(said.rstrip("\n"))
    return code == 99


def _vdelivermail(delivery: _Delivery, path: Path, command: str) -> bool:
    """vpopmail's ``| .../vdelivermail '' ACTION`` done in-process; False for other programs.

    An existing user gets the mail first; otherwise ACTION decides:
    bounce-no-mailbox, delete, an address to forward to, or a Maildir path.
    """
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    if not words or os.path.basename(words[0]) != "vdelivermail":
        return False
    user = _find_user(delivery)
    if user is not None:
        _deliver_user(delivery, user)
        return True
    if len(words) < 3:
        raise _Stop(Outcome.deferral(
            f"Uh-oh: vdelivermail in {path} needs two arguments, as in "
            f"| vdelivermail '' bounce-no-mailbox. (#4.3.5)"))
    action = words[2]
    if action == "bounce-no-mailbox":
        raise _Stop(Outcome.failure(NO_MAILBOX))
    if action == "delete":
        delivery.notes.append(DELETED)
    elif action.startswith("/"):
        # vpopmail writes a user's folder here; the mail goes to its Maildir.
        target = action if "/Maildir" in action else action.rstrip("/") + "/Maildir/"
        _write_maildir(Path(target), delivery.data, create=False)
        delivery.files += 1
    elif "@" in action:
        delivery.forwards.append(action.lstrip("&"))
    else:
        raise _Stop(Outcome.deferral(
            f"Uh-oh: vdelivermail in {path} has an unknown action {action!r}. (#4.3.5)"))
    return True
