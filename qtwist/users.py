"""vpopmail users: the vpasswd table, password hashes, and the admin edits.

A vpasswd line reads ``user:hash:uid:gid:gecos:dir:quota:cleartext``.  The
``gid`` field holds vpopmail's per-user flag bits (``vmoduser`` sets them);
``uid`` is 1 for users vadduser made for POP and 2 for APOP ones, and is kept
as read.  The server reads the table on every look-up after one ``stat``, so
an edit by ``qtwist user``, vpopmail's tools or an editor is seen at once.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import bcrypt
from passlib.hash import des_crypt, md5_crypt, sha256_crypt, sha512_crypt
from passlib.utils.binary import bcrypt64, h64, h64big
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from zope.interface import Attribute, Interface, implementer

from qtwist.fsutil import StatCache, fsync_directory, replace_file
from qtwist.numbers import decimal

# vpopmail's gid flag bits (vpopmail.h).
NO_PASSWD_CHNG = 0x01
NO_POP = 0x02
NO_WEBMAIL = 0x04
NO_IMAP = 0x08
BOUNCE_MAIL = 0x10
NO_RELAY = 0x20
NO_DIALUP = 0x40
V_USER0 = 0x80
V_USER1 = 0x100
V_USER2 = 0x200
V_USER3 = 0x400
NO_SMTP = 0x800
QA_ADMIN = 0x1000
V_OVERRIDE = 0x2000
NO_SPAMASSASSIN = 0x4000
DELETE_SPAM = 0x8000
SA_ADMIN = 0x10000
SA_EXPERT = 0x20000
NO_MAILDROP = 0x40000

# What vadduser writes: uid 1 means "plain POP user" (2 would be APOP), gid 0 no flags.
_VADDUSER_UID = 1
_VADDUSER_GID = 0

# vpopmail's field limits (MAX_PW_NAME, MAX_PW_DOMAIN, MAX_PW_CLEAR_PASSWD).
_MAX_USER = 32
_MAX_DOMAIN = 96
_MAX_PASSWORD = 128

# is_username_valid() in vpopmail, less "/" (a path separator in our layout);
# a leading "." is refused too, so no user can be named like .qmail-* or the lock.
_USER_RE = re.compile(r"[A-Za-z0-9!#$&'*+\-.=?^_`{|}~]+")
_USER_CHARS = "letters, digits and !#$&'*+-.=?^_`{|}~"
# is_domain_valid() in vpopmail: letters, digits, "-" and ".".
_DOMAIN_RE = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*")

# Maildir++ quota: comma-separated NNNS (bytes) and NNNC (messages) parts.
_MAILDIRPP_RE = re.compile(r"[0-9]{1,18}[SC](,[0-9]{1,18}[SC])*")
# vpopmail's format_maildirquota() also reads a plain number with an optional k/M unit.
_PLAIN_QUOTA_RE = re.compile(r"([0-9]{1,18})([kKmM]?)")

_CRYPT_HANDLERS = {"$1$": md5_crypt, "$5$": sha256_crypt, "$6$": sha512_crypt}
# Traditional DES crypt (old vpopmail tables): two salt and eleven hash characters.
_DES_RE = re.compile(r"[./0-9A-Za-z]{13}")
# passlib builds its tables and picks its backends on first use, and not
# thread-safely: the first logins checked at once in the thread pool could
# fail.  Build them now, on the importing thread.
for _engine in (h64, h64big, bcrypt64):
    _engine.encode_bytes(b"")
for _handler in (*_CRYPT_HANDLERS.values(), des_crypt):
    _handler.get_backend()
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
# bcrypt looks at 72 bytes only; crypt_blowfish (which wrote such vpasswd
# hashes) silently cut longer passwords there, the bcrypt package refuses them.
_BCRYPT_MAX_BYTES = 72


class UserStoreUnavailable(Exception):
    """The user store cannot answer now (its database is down or slow): a
    temporary failure, never a "no"."""


class UsersError(Exception):
    """A user or domain edit that cannot be done; the message says why in one sentence."""


@dataclass(frozen=True)
class User:
    """One vpasswd entry of one domain."""

    name: str
    domain: str
    hash: str
    uid: int
    gid: int
    gecos: str
    dir: Path
    quota: str
    cleartext: str

    @property
    def address(self) -> str:
        return f"{self.name}@{self.domain}"

    @property
    def quota_bytes(self) -> int | None:
        """The size limit in bytes, or None for no limit.

        ``NOQUOTA``, an empty field, a count-only quota (``1000C``) and 0
        (Maildir++'s "no limit") all mean no limit; so does a field no
        vpopmail version would write, rather than refusing all mail.
        """
        text = self.quota.strip()
        limit: int | None = None
        if _MAILDIRPP_RE.fullmatch(text):
            for part in text.split(","):
                if part.endswith("S"):
                    limit = int(part[:-1])
        elif match := _PLAIN_QUOTA_RE.fullmatch(text):
            unit = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
            limit = int(match.group(1)) * unit
        return limit or None

    @property
    def may_pop(self) -> bool:
        return not self.gid & NO_POP

    @property
    def may_smtp(self) -> bool:
        return not self.gid & NO_SMTP

    @property
    def may_relay(self) -> bool:
        return not self.gid & NO_RELAY

    @property
    def maildir(self) -> Path:
        return self.dir / "Maildir"


def hash_password(password: str) -> str:
    """sha512-crypt with glibc's implicit 5000 rounds, the form vpopmail writes."""
    return sha512_crypt.using(rounds=5000).hash(password)


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; any unknown or broken hash is False.

    The libraries compare digests in constant time.
    """
    try:
        if stored.startswith(_BCRYPT_PREFIXES):
            secret = password.encode("utf-8")[:_BCRYPT_MAX_BYTES]
            return bcrypt.checkpw(secret, stored.encode("ascii"))
        if _DES_RE.fullmatch(stored):
            return des_crypt.verify(password, stored)
        handler = _CRYPT_HANDLERS.get(stored[:3])
        return handler is not None and handler.verify(password, stored)
    except (ValueError, TypeError):
        return False


@functools.cache
def _decoy_hash() -> str:
    """A hash to check against for unknown users, so timing does not tell who exists."""
    return hash_password(secrets.token_hex(16))


def _split_address(address: str) -> tuple[str, str]:
    user, at, domain = address.strip().rpartition("@")
    if not at or not user or not domain:
        raise UsersError(f"invalid address {address!r}: expected user@domain")
    return user.lower(), domain.lower()


def _valid_domain(domain: str) -> bool:
    return len(domain) <= _MAX_DOMAIN and _DOMAIN_RE.fullmatch(domain) is not None


def _valid_user(name: str) -> bool:
    return (len(name) <= _MAX_USER and not name.startswith(".") and name != "vpasswd"
            and _USER_RE.fullmatch(name) is not None)


def _check_domain(domain: str) -> str:
    domain = domain.strip().lower()
    if not _valid_domain(domain):
        raise UsersError(f"invalid domain name {domain!r}: use letters, digits, '-' and '.' "
                         f"(at most {_MAX_DOMAIN} characters)")
    return domain


def _check_user(name: str) -> None:
    if not _valid_user(name):
        raise UsersError(f"invalid user name {name!r}: use {_USER_CHARS}, not starting with '.' "
                         f"(at most {_MAX_USER} characters)")


def _check_password(password: str) -> None:
    if not password:
        raise UsersError("the password must not be empty")
    if any(char in password for char in "\r\n\0"):
        raise UsersError("the password must not contain line breaks or NUL characters")
    if len(password) > _MAX_PASSWORD:
        raise UsersError(f"the password is longer than {_MAX_PASSWORD} characters")


def _line_name(line: str) -> str:
    return line.split(":", 1)[0].lower()


def _parse_line(line: str, domain: str, domain_dir: Path) -> User | None:
    """A User from one vpasswd line, or None for a line vpopmail could not use either."""
    fields = line.split(":")
    if len(fields) < 7 or not _valid_user(fields[0].lower()):
        return None  # also a name no address could reach: lookup() would never find it
    name, hashed, uid, gid, gecos, home_dir, quota = fields[:7]
    uid_number = decimal(uid) if uid else 0
    flags = decimal(gid) if gid else 0
    if uid_number is None or flags is None:
        return None  # unknown flags: refuse the user rather than guess its rights
    # A relative dir (handy in a home kept in a repository) is the domain folder's.
    user_dir = domain_dir / (home_dir or name)
    return User(name=name.lower(), domain=domain, hash=hashed, uid=uid_number, gid=flags,
                gecos=gecos, dir=user_dir, quota=quota,
                cleartext=":".join(fields[7:]))


def _format_line(name: str, hashed: str, uid: int, gid: int, gecos: str, user_dir: str,
                 quota: str, cleartext: str) -> str:
    return f"{name}:{hashed}:{uid}:{gid}:{gecos}:{user_dir}:{quota}:{cleartext}"


def _replace_file(path: Path, text: str, mode: int) -> None:
    replace_file(path, text.encode("utf-8", "surrogateescape"), mode)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _split_lines(text: str) -> list[str]:
    """Lines split at LF only (str.splitlines would also split at \f, \x1c...)."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _read_lines(path: Path) -> list[str]:
    try:
        return _split_lines(path.read_bytes().decode("utf-8", errors="surrogateescape"))
    except FileNotFoundError:
        return []


def _lines_text(lines: list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


class IUserStore(Interface):
    """Where users live: the vpasswd files (UserDB) or vpopmail's SQL tables
    (sqlusers.SQLUserStore), chosen by control/userdb (``open_store``).

    Logins (login.py), local delivery and chkuser read users only through
    this.  Every method but ``defer`` may block (on the disk, or on a
    database): the server runs them through ``defer``, never on the reactor
    thread.  A store that cannot answer raises ``UserStoreUnavailable``,
    which callers turn into a temporary failure, never into "no such user".
    """

    unavailable = Attribute("True while the store is known to be unreachable (nothing may be assumed)")

    def lookup(address: str) -> User | None:
        """The user for ``user@domain`` (any case), or None."""

    def authenticate(address: str, password: str) -> User | None:
        """The user when ``password`` is right; None for a wrong password or an
        unknown user, taking as long either way."""

    def aliases(local: str, domain: str) -> list[str] | None:
        """The dot-qmail lines of an alias the store keeps (vpopmail's valias), or None."""

    def logged_in(user: User, ip: str) -> Deferred | None:
        """Note a successful login (vpopmail's lastauth) where the store keeps
        one; called on the reactor thread, so it must not block."""

    def defer(function: Callable, *args) -> Deferred:
        """``function(*args)``, a blocking use of this store, off the reactor
        thread, in the threads this store may hold up."""


class DomainFolders:
    """The virtual domains of a home: a folder each under HOME/domains, and
    their rcpthosts lines.  The domain list stays in the files whatever store
    holds the users, as vpopmail keeps it in qmail's control files."""

    def __init__(self, home: Path) -> None:
        self.home = Path(os.path.abspath(home))
        self.root = self.home / "domains"

    def path(self, domain: str) -> Path:
        return self.root / domain

    def domains(self) -> list[str]:
        """Every local virtual domain: each folder of HOME/domains."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(entry.name for entry in entries
                      if entry.is_dir() and _valid_domain(entry.name))

    def require_home(self) -> None:
        if not self.home.is_dir():
            raise UsersError(f"the home directory {self.home} does not exist")

    def existing(self, domain: str) -> str:
        """``domain``, normalised, when it exists; else UsersError."""
        domain = _check_domain(domain)
        self.require_home()
        if not self.path(domain).is_dir():
            raise UsersError(f"the domain {domain} does not exist")
        return domain

    def _rcpthosts_edit(self, change: Callable[[list[str]], list[str] | None]) -> None:
        """Apply ``change`` to control/rcpthosts' lines; None means leave the file alone."""
        control = self.home / "control"
        control.mkdir(exist_ok=True)
        path = control / "rcpthosts"
        lines = _read_lines(path)
        new_lines = change(lines)
        if new_lines is not None:
            mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
            _replace_file(path, _lines_text(new_lines), mode)

    def add(self, domain: str, made: Callable[[str, Path], None]) -> None:
        """Make ``domain``'s folder, let ``made`` set up the store's part, then list
        the domain in rcpthosts, as vadddomain does."""
        domain = _check_domain(domain)
        self.require_home()
        self.root.mkdir(exist_ok=True)
        with _locked(self.root / ".lock"):
            domain_dir = self.path(domain)
            try:
                domain_dir.mkdir(mode=0o750)
            except FileExistsError:
                raise UsersError(f"the domain {domain} already exists") from None
            try:
                made(domain, domain_dir)
            except BaseException:
                shutil.rmtree(domain_dir, ignore_errors=True)
                raise
            fsync_directory(self.root)

            def add(lines: list[str]) -> list[str] | None:
                listed = {line.strip().lower() for line in lines}
                return None if domain in listed else lines + [domain]
            self._rcpthosts_edit(add)

    def delete(self, domain: str, dropping: Callable[[str], None]) -> None:
        """Forget ``domain``: ``dropping`` removes the store's part first, then its
        rcpthosts line and its folder with every mailbox go."""
        domain = self.existing(domain)
        with _locked(self.root / ".lock"):
            dropping(domain)

            def remove(lines: list[str]) -> list[str] | None:
                kept = [line for line in lines if line.strip().lower() != domain]
                return None if len(kept) == len(lines) else kept
            self._rcpthosts_edit(remove)
            shutil.rmtree(self.path(domain))
            fsync_directory(self.root)

    def make_mailbox(self, user_dir: Path, address: str) -> None:
        """DIR/Maildir/{cur,new,tmp} for a new user, as vadduser makes them."""
        try:
            user_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise UsersError(f"the directory {user_dir} already exists; "
                             f"move it away before adding {address}") from None
        for sub in ("", "/cur", "/new", "/tmp"):
            os.mkdir(f"{user_dir}/Maildir{sub}", 0o700)
        fsync_directory(user_dir.parent)

    def remove_mailbox(self, user: User) -> None:
        """The folder of a deleted user, only when it lies inside its domain's
        folder: a dir that points elsewhere (an imported vpopmail path) is left
        for the admin."""
        domain_dir = self.path(user.domain)
        user_dir = Path(os.path.abspath(user.dir))
        if user_dir.parent == domain_dir and user_dir.is_dir():
            shutil.rmtree(user_dir)
            fsync_directory(domain_dir)


def new_user(name: str, domain: str, user_dir: Path, password: str, quota: int | None,
             cleartext: bool) -> User:
    """The entry vadduser makes: uid 1 (POP), no flags, the name as gecos."""
    _check_user(name)
    _check_password(password)
    if quota is not None and quota < 1:
        raise UsersError("the quota must be a positive number of bytes")
    return User(name=name, domain=domain, hash=hash_password(password), uid=_VADDUSER_UID,
                gid=_VADDUSER_GID, gecos=name, dir=user_dir,
                quota="NOQUOTA" if quota is None else f"{quota}S", cleartext=password if cleartext else "")


@implementer(IUserStore)
class UserDB:
    """The vpasswd tables under HOME/domains, read on demand and edited safely.

    Look-ups and ``authenticate`` block on disk (and hashing): the server calls
    them from a worker thread.  Edits hold an flock on DOMAIN/.vpasswd.lock, so
    two ``qtwist user`` runs at once never lose a line.
    """

    unavailable = False  # files do not go away for a while and come back

    def __init__(self, home: Path) -> None:
        self.folders = DomainFolders(home)
        self.home = self.folders.home
        self._tables: StatCache[dict[str, User]] = StatCache(self._read_table)

    # -- reading ---------------------------------------------------------------

    def _domain_dir(self, domain: str) -> Path:
        return self.folders.path(domain)

    def _table(self, domain: str) -> dict[str, User] | None:
        """The domain's users by lower-case name, re-read when the file changed."""
        return self._tables.get(self._domain_dir(domain) / "vpasswd")

    def _read_table(self, path: Path) -> dict[str, User]:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
        domain_dir = path.parent
        table: dict[str, User] = {}
        for line in _split_lines(text):
            user = _parse_line(line, domain_dir.name, domain_dir)
            if user is not None:
                table.setdefault(user.name, user)  # the first line wins, as in vpopmail
        return table

    def lookup(self, address: str) -> User | None:
        """The user for ``user@domain`` (any case), or None."""
        user, at, domain = address.strip().lower().rpartition("@")
        if not at or not _valid_domain(domain) or not _valid_user(user):
            return None
        table = self._table(domain)
        return None if table is None else table.get(user)

    def authenticate(self, address: str, password: str) -> User | None:
        """The user when ``password`` is right; None for a wrong password or an unknown user.

        An unknown user costs the same hashing time, so timing does not
        reveal which addresses exist.  Flags (``may_pop``...) are the caller's
        to check.
        """
        return checked_password(self.lookup(address), password)

    def aliases(self, local: str, domain: str) -> list[str] | None:
        return None  # vpasswd homes keep aliases as dot-qmail files

    def logged_in(self, user: User, ip: str) -> None:
        return None  # a vpasswd home keeps no record of logins

    def defer(self, function: Callable, *args) -> Deferred:
        return deferToThread(function, *args)

    def domains(self) -> list[str]:
        return self.folders.domains()

    def users(self, domain: str) -> list[User]:
        domain = self.folders.existing(domain)
        table = self._table(domain) or {}
        return sorted(table.values(), key=lambda user: user.name)

    # -- editing ---------------------------------------------------------------

    def add_domain(self, domain: str) -> None:
        """Make ``domain`` local (an empty vpasswd) and list it in rcpthosts, as vadddomain does."""
        self.folders.add(domain, lambda name, path: _replace_file(path / "vpasswd", "", 0o600))

    def delete_domain(self, domain: str) -> None:
        """Forget ``domain``: its rcpthosts line, users and mailboxes."""
        self.folders.delete(domain, lambda name: None)
        self._tables.forget(self._domain_dir(_check_domain(domain)) / "vpasswd")

    def _edit_vpasswd(self, domain: str, change: Callable[[list[str]], list[str]]) -> None:
        """Rewrite the domain's vpasswd under its lock with ``change`` applied to its lines."""
        domain_dir = self._domain_dir(domain)
        path = domain_dir / "vpasswd"
        with _locked(domain_dir / ".vpasswd.lock"):
            new_lines = change(_read_lines(path))
            _replace_file(path, _lines_text(new_lines), 0o600)

    def add_user(self, address: str, password: str, quota: int | None = None,
                 cleartext: bool = False) -> None:
        """Add a mailbox the way vadduser does: a vpasswd line and DIR/Maildir/{cur,new,tmp}.

        ``cleartext`` also stores the password in the clear field, which
        CRAM-MD5 and APOP need.
        """
        name, domain = _split_address(address)
        _check_user(name)
        domain = self.folders.existing(domain)
        user = new_user(name, domain, self._domain_dir(domain) / name, password, quota, cleartext)
        self.add(user)

    def add(self, user: User) -> None:
        """Store ``user`` as a new vpasswd line with a new Maildir."""
        self._put(user, replace=False)

    def store(self, user: User) -> str:
        """Add ``user``, or make its line say what ``user`` says: "added",
        "updated" or "unchanged" (``qtwist userdb import``)."""
        return self._put(user, replace=True)

    def _put(self, user: User, replace: bool) -> str:
        """A new user gets a new mailbox (a folder already there is refused, as
        vadduser does); ``replace`` (copying users over) keeps the one it finds."""
        line = _format_line(user.name, user.hash, user.uid, user.gid, user.gecos, str(user.dir),
                            user.quota, user.cleartext)
        created = False
        done = "added"

        def insert(lines: list[str]) -> list[str]:
            nonlocal created, done
            for index, old in enumerate(lines):
                if _line_name(old) == user.name:
                    if not replace:
                        raise UsersError(f"the user {user.address} already exists")
                    done = "unchanged" if old == line else "updated"
                    return lines[:index] + [line] + lines[index + 1:]
            if not (replace and user.dir.exists()):
                self.folders.make_mailbox(user.dir, user.address)
                created = True
            # vadduser keeps the file sorted: the new line goes before the first greater name.
            at = next((index for index, old in enumerate(lines) if user.name < _line_name(old)),
                      len(lines))
            return lines[:at] + [line] + lines[at:]

        try:
            self._edit_vpasswd(user.domain, insert)
        except BaseException:
            # Leave no mailbox without a vpasswd line, but never one that was there before.
            if created and self.lookup(user.address) is None:
                shutil.rmtree(user.dir, ignore_errors=True)
            raise
        return done

    def _find_line(self, lines: list[str], name: str, domain: str) -> int:
        for index, line in enumerate(lines):
            if _line_name(line) == name:
                return index
        raise UsersError(f"the user {name}@{domain} does not exist")

    def delete_user(self, address: str) -> None:
        """Remove the vpasswd line and the mailbox folder (``DomainFolders.remove_mailbox``)."""
        name, domain = _split_address(address)
        domain = self.folders.existing(domain)
        domain_dir = self._domain_dir(domain)
        removed: list[User] = []

        def remove(lines: list[str]) -> list[str]:
            index = self._find_line(lines, name, domain)
            user = _parse_line(lines[index], domain, domain_dir)
            if user is not None:
                removed.append(user)
            return [line for line in lines if _line_name(line) != name]

        self._edit_vpasswd(domain, remove)
        for user in removed:
            self.folders.remove_mailbox(user)

    def set_password(self, address: str, password: str, cleartext: bool | None = None) -> None:
        """Give the user a new password.

        ``cleartext`` None keeps storing the clear text only if it was stored
        before; True stores it; False blanks it.
        """
        name, domain = _split_address(address)
        domain = self.folders.existing(domain)
        _check_password(password)
        hashed = hash_password(password)

        def change(lines: list[str]) -> list[str]:
            index = self._find_line(lines, name, domain)
            fields = lines[index].split(":")
            fields += [""] * (8 - len(fields))
            keep_clear = bool(":".join(fields[7:])) if cleartext is None else cleartext
            fields[1] = hashed
            fields[7:] = [password if keep_clear else ""]
            return lines[:index] + [":".join(fields)] + lines[index + 1:]

        self._edit_vpasswd(domain, change)


def checked_password(user: User | None, password: str) -> User | None:
    """``user`` when ``password`` is its password; an unknown user (None)
    costs the same hashing time, so timing does not tell who exists."""
    if user is None:
        verify_password(password, _decoy_hash())
        return None
    return user if verify_password(password, user.hash) else None


def open_store(home: Path) -> IUserStore:
    """The user store control/userdb names: the vpasswd files unless it names
    a database.  Raises UserDBError (one line) for a file that cannot be used."""
    from qtwist.sqldb import Database, parse_userdb

    try:
        text = (Path(home) / "control" / "userdb").read_text("utf-8", "replace")
    except FileNotFoundError:
        text = ""
    address = parse_userdb(text)
    if address is None:
        return UserDB(home)
    from qtwist.sqlusers import SQLUserStore
    return SQLUserStore(home, Database(address))
