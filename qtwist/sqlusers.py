"""vpopmail's users in its SQL database, read and written as vpopmail's own
MySQL and PostgreSQL modules do, so a node can be moved over without
touching the database.

The layout is found at run time, never configured:
- one ``vpopmail`` table with a ``pw_domain`` column (vpopmail's default,
  "many domains"), or else one table per domain (``--disable-many-domains``):
  ``example_com`` for example.com, '.' and '-' made '_';
- ``pw_clear_passwd`` may be missing; 5.4's char(N) columns (padded by
  PostgreSQL) read like 5.6's varchar ones;
- ``limits`` (per-domain switches, added to each user's flags as vpopmail
  does), ``aliasdomains``, ``valias`` and ``lastauth`` (its user column is
  ``userid`` on PostgreSQL) are used when they exist.  The ``relay`` table
  of POP-before-SMTP grants is grants.SQLGrants'.

Answers, "no such user" included, are kept at most CACHE_SECONDS, so a mail
flood does not become a database flood and a change made on another node
shows within a second.  Every query passes its values as parameters; only
table and column names, which are ours or the database's, are spliced in.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Hashable, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import implementer

from qtwist.sqldb import Database, Dialect, column_number, column_text, one_line, row_dicts
from qtwist.users import (DELETE_SPAM, NO_DIALUP, NO_IMAP, NO_MAILDROP, NO_PASSWD_CHNG, NO_POP, NO_RELAY,
                          NO_SMTP, NO_SPAMASSASSIN, NO_WEBMAIL, DomainFolders, IUserStore, User, UsersError,
                          _check_password, _check_user, _split_address, _valid_domain, _valid_user,
                          checked_password, hash_password, new_user)

CACHE_SECONDS = 1.0
CACHE_ENTRIES = 50_000
MANY_DOMAINS_TABLE = "vpopmail"

# vpopmail's limits columns and the user flag each one sets (vlimits_get_flag_mask).
LIMIT_FLAGS = {
    "disable_pop": NO_POP, "disable_imap": NO_IMAP, "disable_dialup": NO_DIALUP,
    "disable_passwordchanging": NO_PASSWD_CHNG, "disable_webmail": NO_WEBMAIL, "disable_relay": NO_RELAY,
    "disable_smtp": NO_SMTP, "disable_spamassassin": NO_SPAMASSASSIN, "delete_spam": DELETE_SPAM,
    "disable_maildrop": NO_MAILDROP,
}

# vpopmail 5.6's user table, as its modules create it (the many-domains form has pw_domain).
_USER_COLUMNS = ("pw_name VARCHAR(64) NOT NULL, {domain}pw_passwd VARCHAR(128), pw_uid INT, pw_gid INT, "
                 "pw_gecos VARCHAR(64), pw_dir VARCHAR(160), pw_shell VARCHAR(20), pw_clear_passwd VARCHAR(128), "
                 "PRIMARY KEY (pw_name{domain_key})")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def domain_table(domain: str) -> str:
    """The per-domain table's name, as vauth_munch_domain makes it."""
    return domain.replace(".", "_").replace("-", "_")


class _Recent(Generic[K, V]):
    """Answers kept for CACHE_SECONDS; shared by the database's threads."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            return False, None
        return True, entry[1]

    def put(self, key: K, value: V) -> V:
        with self._lock:
            if len(self._entries) >= CACHE_ENTRIES:
                self._entries.clear()
            self._entries[key] = (self._clock() + CACHE_SECONDS, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@dataclass(frozen=True)
class _DomainFacts:
    domain: str  # the real domain (an alias domain's target)
    flags: int  # the limits table's switches as user flags


@implementer(IUserStore)
class SQLUserStore:
    """IUserStore over vpopmail's tables, plus the edits ``qtwist user`` and
    ``qtwist domain`` make (vadduser, vdeluser, vpasswd, vadddomain...)."""

    def __init__(self, home: Path, database: Database, clock: Callable[[], float] = time.monotonic) -> None:
        self.folders = DomainFolders(home)
        self.home = self.folders.home
        self.database = database
        self._users: _Recent[tuple[str, str], User | None] = _Recent(clock)
        self._domains: _Recent[str, _DomainFacts] = _Recent(clock)
        self._aliases: _Recent[tuple[str, str], list[str] | None] = _Recent(clock)
        self._tables: _Recent[str, frozenset[str]] = _Recent(clock)
        self._lastauth_user: str | None = None

    @property
    def dialect(self) -> Dialect:
        return self.database.dialect

    def _quote(self, name: str) -> str:
        return self.dialect.quote(name)

    @property
    def unavailable(self) -> bool:
        return self.database.down

    def defer(self, function: Callable, *args) -> Deferred:
        return self.database.defer(function, *args)

    def check(self) -> tuple[bool, str]:
        """At start: (whether users can be found, one line on what was found).
        UserStoreUnavailable says why the database cannot be used at all (a
        wrong password, no such database), in the database's own line."""
        tables = self.database.run(self._table_names)
        extras = [name for name in ("relay", "lastauth", "valias", "limits", "aliasdomains") if name in tables]
        also = f"; also {', '.join(extras)}" if extras else ""
        if MANY_DOMAINS_TABLE in tables:
            return True, f"users in the {MANY_DOMAINS_TABLE} table{also}"
        per_domain = [domain for domain in self.folders.domains() if domain_table(domain) in tables]
        if per_domain:
            return True, f"users in one table per domain ({len(per_domain)} found){also}"
        return False, (f"no {MANY_DOMAINS_TABLE} table and no table of any domain: no user can log in or get "
                       f"mail until qtwist user add (or vpopmail) makes them{also}")

    # -- reading ---------------------------------------------------------------------------------

    def lookup(self, address: str) -> User | None:
        """The user for ``user@domain`` (any case), or None; UserStoreUnavailable
        when the database cannot say."""
        name, at, domain = address.strip().lower().rpartition("@")
        if not at or not _valid_domain(domain) or not _valid_user(name):
            return None
        known, user = self._users.get((name, domain))
        if known:
            return user
        return self._users.put((name, domain), self.database.run(self._load_user, name, domain))

    def authenticate(self, address: str, password: str) -> User | None:
        return checked_password(self.lookup(address), password)

    def aliases(self, local: str, domain: str) -> list[str] | None:
        """valias lines for ``local@domain`` (vdelivermail reads them before the user)."""
        key = (local.lower(), domain.lower())
        known, lines = self._aliases.get(key)
        if known:
            return lines
        return self._aliases.put(key, self.database.run(self._load_aliases, *key))

    def logged_in(self, user: User, ip: str) -> Deferred:
        """vpopmail's lastauth row for ``user``, when the table exists (written
        in the database's threads while the session goes on)."""
        return self.database.defer(self.database.run, self._record_login, user, ip, int(time.time()))

    def users(self, domain: str) -> list[User]:
        domain = self.folders.existing(domain)
        return self.database.run(self._load_domain_users, domain)

    def domains(self) -> list[str]:
        return self.folders.domains()

    def _table_names(self, cursor) -> frozenset[str]:
        known, tables = self._tables.get("")
        if known and tables is not None:
            return tables
        cursor.execute(self.dialect.tables_query())
        return self._tables.put("", frozenset(str(row[0]).lower() for row in cursor.fetchall()))

    def _facts(self, cursor, domain: str, tables: frozenset[str]) -> _DomainFacts:
        known, facts = self._domains.get(domain)
        if known and facts is not None:
            return facts
        real = domain
        if "aliasdomains" in tables:
            cursor.execute(f"SELECT {self._quote('domain')} FROM {self._quote('aliasdomains')} "
                           f"WHERE {self._quote('alias')} = %s", (domain,))
            row = cursor.fetchone()
            if row is not None and column_text(row[0]):
                real = column_text(row[0]).lower()
        flags = 0
        if "limits" in tables:
            cursor.execute(f"SELECT * FROM {self._quote('limits')} WHERE {self._quote('domain')} = %s", (real,))
            for limits in row_dicts(cursor)[:1]:
                for column, flag in LIMIT_FLAGS.items():
                    if column_number(limits.get(column)):
                        flags |= flag
        return self._domains.put(domain, _DomainFacts(real, flags))

    def _load_user(self, cursor, name: str, domain: str) -> User | None:
        tables = self._table_names(cursor)
        facts = self._facts(cursor, domain, tables)
        found = self._select_users(cursor, tables, facts.domain, name)
        return self._user(found[0], facts) if found else None

    def _select_users(self, cursor, tables: frozenset[str], domain: str, name: str | None) -> list[dict[str, Any]]:
        """The rows of ``domain`` (one user's, or all when ``name`` is None)."""
        if MANY_DOMAINS_TABLE in tables:
            query = f"SELECT * FROM {self._quote(MANY_DOMAINS_TABLE)} WHERE pw_domain = %s"
            params: tuple = (domain,)
            if name is not None:
                query, params = query + " AND pw_name = %s", (domain, name)
        else:
            query, params = f"SELECT * FROM {self._quote(domain_table(domain))}", ()
            if name is not None:
                query, params = query + " WHERE pw_name = %s", (name,)
        try:
            cursor.execute(query, params)
        except Exception as error:
            if self.dialect.is_missing_table(error):
                return []  # a domain whose table is not made yet has no users
            raise
        return row_dicts(cursor)

    def _user(self, row: dict[str, Any], facts: _DomainFacts) -> User:
        name = column_text(row.get("pw_name")).lower()
        # vpopmail stores an absolute pw_dir; a relative one is the domain folder's, as in vpasswd.
        user_dir = self.folders.path(facts.domain) / (column_text(row.get("pw_dir")) or name)
        return User(name=name, domain=facts.domain, hash=column_text(row.get("pw_passwd")),
                    uid=column_number(row.get("pw_uid")), gid=column_number(row.get("pw_gid")) | facts.flags,
                    gecos=column_text(row.get("pw_gecos")), dir=user_dir, quota=column_text(row.get("pw_shell")),
                    cleartext=column_text(row.get("pw_clear_passwd")))

    def _load_domain_users(self, cursor, domain: str) -> list[User]:
        # As stored: the domain's limits are not added to the flags here.
        facts = _DomainFacts(domain, 0)
        users = [self._user(row, facts) for row in self._select_users(cursor, self._table_names(cursor), domain, None)]
        return sorted(users, key=lambda user: user.name)

    def _load_aliases(self, cursor, local: str, domain: str) -> list[str] | None:
        if "valias" not in self._table_names(cursor):
            return None
        cursor.execute(f"SELECT valias_line FROM {self._quote('valias')} WHERE alias = %s AND "
                       f"{self._quote('domain')} = %s", (local, domain))
        lines = [column_text(row[0]) for row in cursor.fetchall()]
        return lines or None

    def _record_login(self, cursor, user: User, ip: str, now: int) -> None:
        if "lastauth" not in self._table_names(cursor):
            return
        if self._lastauth_user is None:
            cursor.execute(f"SELECT * FROM {self._quote('lastauth')} WHERE 1 = 0")
            cursor.fetchall()
            names = [description[0].lower() for description in cursor.description]
            self._lastauth_user = "userid" if "userid" in names else "user"
        self.dialect.upsert(cursor, "lastauth", {self._lastauth_user: user.name, "domain": user.domain},
                            {"remote_ip": ip, "timestamp": now})

    # -- editing (the qtwist command) --------------------------------------------------------------

    def _fresh(self) -> None:
        """Forget cached answers after an edit."""
        for cache in (self._users, self._domains, self._aliases, self._tables):
            cache.clear()

    def _many_domains(self, cursor) -> bool:
        """Whether users go in the one vpopmail table; a database with no user
        table yet gets one, vpopmail's default layout."""
        tables = self._table_names(cursor)
        if MANY_DOMAINS_TABLE in tables:
            return True
        if any(domain_table(domain) in tables for domain in self.folders.domains()):
            return False
        self._create_user_table(cursor, MANY_DOMAINS_TABLE, many=True)
        return True

    def _create_user_table(self, cursor, table: str, many: bool) -> None:
        columns = _USER_COLUMNS.format(domain="pw_domain VARCHAR(96) NOT NULL, " if many else "",
                                       domain_key=", pw_domain" if many else "")
        self.dialect.create_table(cursor, table, columns)
        self._tables.clear()

    def add_domain(self, domain: str) -> None:
        """vadddomain: the folder and rcpthosts line, and in the one-table-per-domain
        layout the domain's table."""
        def made(name: str, path: Path) -> None:
            def create(cursor) -> None:
                if not self._many_domains(cursor):
                    self._create_user_table(cursor, domain_table(name), many=False)
            self.database.run(create)
        self.folders.add(domain, made)
        self._fresh()

    def delete_domain(self, domain: str) -> None:
        """vdeldomain: the domain's users, aliases, limits and login records go,
        then its folder and rcpthosts line."""
        def dropping(name: str) -> None:
            def drop(cursor) -> None:
                tables = self._table_names(cursor)
                if MANY_DOMAINS_TABLE in tables:
                    cursor.execute(f"DELETE FROM {self._quote(MANY_DOMAINS_TABLE)} WHERE pw_domain = %s", (name,))
                else:
                    cursor.execute(f"DROP TABLE IF EXISTS {self._quote(domain_table(name))}")
                for table in ("valias", "limits", "lastauth"):
                    if table in tables:
                        cursor.execute(f"DELETE FROM {self._quote(table)} WHERE {self._quote('domain')} = %s",
                                       (name,))
            self.database.run(drop)
        self.folders.delete(domain, dropping)
        self._fresh()

    def add_user(self, address: str, password: str, quota: int | None = None, cleartext: bool = False) -> None:
        """vadduser: a row and DIR/Maildir/{cur,new,tmp} under the domain's folder."""
        name, domain = _split_address(address)
        _check_user(name)
        domain = self.folders.existing(domain)
        self.add(new_user(name, domain, self.folders.path(domain) / name, password, quota, cleartext))

    def add(self, user: User) -> None:
        """Store ``user`` as a new row with a new Maildir."""
        self._put(user, replace=False)

    def store(self, user: User) -> str:
        """Add ``user``, or make its row say what ``user`` says: "added",
        "updated" or "unchanged" (``qtwist userdb export``)."""
        return self._put(user, replace=True)

    def _put(self, user: User, replace: bool) -> str:
        """As UserDB's: a new user's folder must not exist yet, unless copied over."""
        created = False
        if not (replace and user.dir.exists()):
            self.folders.make_mailbox(user.dir, user.address)
            created = True
        try:
            try:
                done = self.database.run(self._write_user, user, replace)
            except self.dialect.refusals as error:
                raise UsersError(f"the database refused {user.address}: {one_line(error)}") from None
        except BaseException:
            if created:
                shutil.rmtree(user.dir, ignore_errors=True)
            raise
        finally:
            self._fresh()
        return done

    def _write_user(self, cursor, user: User, replace: bool) -> str:
        many = self._many_domains(cursor)
        table = MANY_DOMAINS_TABLE if many else domain_table(user.domain)
        if not many:
            self._create_user_table(cursor, table, many=False)
        row = {"pw_passwd": user.hash, "pw_uid": user.uid, "pw_gid": user.gid, "pw_gecos": user.gecos,
               "pw_dir": str(user.dir), "pw_shell": user.quota}
        if self._has_column(cursor, table, "pw_clear_passwd"):
            row["pw_clear_passwd"] = user.cleartext
        elif user.cleartext:
            raise UsersError(f"the table {table} has no pw_clear_passwd column for the clear text")
        found = self._select_users(cursor, self._table_names(cursor), user.domain, user.name)
        if found:
            if not replace:
                raise UsersError(f"the user {user.address} already exists")
            if all(column_text(found[0].get(column)) == column_text(value) for column, value in row.items()):
                return "unchanged"
            _, where, params = self._where_user(cursor, user.name, user.domain)
            sets = ", ".join(f"{self._quote(column)} = %s" for column in row)
            cursor.execute(f"UPDATE {self._quote(table)} SET {sets} WHERE {where}", (*row.values(), *params))
            return "updated"
        row = {"pw_name": user.name, **({"pw_domain": user.domain} if many else {}), **row}
        names = ", ".join(self._quote(column) for column in row)
        marks = ", ".join(["%s"] * len(row))
        cursor.execute(f"INSERT INTO {self._quote(table)} ({names}) VALUES ({marks})", tuple(row.values()))
        return "added"

    def _has_column(self, cursor, table: str, column: str) -> bool:
        cursor.execute(f"SELECT * FROM {self._quote(table)} WHERE 1 = 0")
        cursor.fetchall()
        return column in (description[0].lower() for description in cursor.description)

    def _where_user(self, cursor, name: str, domain: str) -> tuple[str, str, tuple]:
        """(table, WHERE clause, its values) for one user's row."""
        if MANY_DOMAINS_TABLE in self._table_names(cursor):
            return MANY_DOMAINS_TABLE, "pw_name = %s AND pw_domain = %s", (name, domain)
        return domain_table(domain), "pw_name = %s", (name,)

    def delete_user(self, address: str) -> None:
        """vdeluser: the row, then the mailbox folder (``DomainFolders.remove_mailbox``)."""
        name, domain = _split_address(address)
        domain = self.folders.existing(domain)

        def delete(cursor) -> User:
            found = self._select_users(cursor, self._table_names(cursor), domain, name)
            if not found:
                raise UsersError(f"the user {name}@{domain} does not exist")
            table, where, params = self._where_user(cursor, name, domain)
            cursor.execute(f"DELETE FROM {self._quote(table)} WHERE {where}", params)
            return self._user(found[0], _DomainFacts(domain, 0))

        try:
            user = self.database.run(delete)
        finally:
            self._fresh()
        self.folders.remove_mailbox(user)

    def set_password(self, address: str, password: str, cleartext: bool | None = None) -> None:
        """vpasswd: a new hash; the clear text is kept, stored or blanked as with vpasswd files."""
        name, domain = _split_address(address)
        domain = self.folders.existing(domain)
        _check_password(password)
        hashed = hash_password(password)

        def change(cursor) -> None:
            found = self._select_users(cursor, self._table_names(cursor), domain, name)
            if not found:
                raise UsersError(f"the user {name}@{domain} does not exist")
            table, where, params = self._where_user(cursor, name, domain)
            sets, values = ["pw_passwd = %s"], [hashed]
            if "pw_clear_passwd" in found[0]:
                keep = bool(column_text(found[0]["pw_clear_passwd"])) if cleartext is None else cleartext
                sets.append("pw_clear_passwd = %s")
                values.append(password if keep else "")
            elif cleartext:
                raise UsersError(f"the table {table} has no pw_clear_passwd column for the clear text")
            cursor.execute(f"UPDATE {self._quote(table)} SET {', '.join(sets)} WHERE {where}", (*values, *params))

        try:
            self.database.run(change)
        finally:
            self._fresh()

