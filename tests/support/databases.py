"""Real databases for the user-store tests: a database with a unique name
on the machine's MariaDB or PostgreSQL (127.0.0.1, dropped afterwards),
vpopmail's table layouts as its 5.4 and 5.6 releases create them, and a
proxy in front that a test can cut off like an outage."""

from __future__ import annotations

import secrets
import select
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

KINDS = ("mysql", "postgresql")
ADMIN = {"mysql": ("root", 3306), "postgresql": ("postgres", 5432)}


@dataclass
class ScratchDatabase:
    kind: str
    name: str
    port: int

    @property
    def url(self) -> str:
        """What control/userdb holds for it (``port`` may be a proxy's)."""
        user, _ = ADMIN[self.kind]
        return f"{self.kind}://{user}@127.0.0.1:{self.port}/{self.name}"

    def connect(self) -> Any:
        user, port = ADMIN[self.kind]
        if self.kind == "mysql":
            import pymysql
            return pymysql.connect(host="127.0.0.1", port=port, user=user, database=self.name, autocommit=True)
        import psycopg
        return psycopg.connect(host="127.0.0.1", port=port, user=user, dbname=self.name, autocommit=True)

    def execute(self, *statements: str, params: tuple = ()) -> None:
        with self.connect() as connection, connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement, params or None)

    def rows(self, query: str, params: tuple = ()) -> list[tuple]:
        with self.connect() as connection, connection.cursor() as cursor:
            cursor.execute(query, params or None)
            return [tuple(row) for row in cursor.fetchall()]


def _admin(kind: str) -> Any:
    user, port = ADMIN[kind]
    if kind == "mysql":
        import pymysql
        return pymysql.connect(host="127.0.0.1", port=port, user=user, autocommit=True)
    import psycopg
    return psycopg.connect(host="127.0.0.1", port=port, user=user, dbname="postgres", autocommit=True)


@contextmanager
def fresh_database(kind: str) -> Iterator[ScratchDatabase]:
    """A new, empty database, dropped when the block ends."""
    name = f"qtwist_test_{secrets.token_hex(6)}"
    with _admin(kind) as admin, admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield ScratchDatabase(kind, name, ADMIN[kind][1])
    finally:
        with _admin(kind) as admin, admin.cursor() as cursor:
            if kind == "postgresql":
                cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            else:
                cursor.execute(f"DROP DATABASE IF EXISTS {name}")


# -- vpopmail's layouts -------------------------------------------------------------------------
# The column types of vpopmail's vmysql.h / vpgsql.h: 5.4 used char(N)
# (which PostgreSQL pads with spaces), 5.6 varchar; many-domains tables
# carry pw_domain, per-domain ones (--disable-many-domains) do not.

def user_table(kind: str, version: str, table: str = "vpopmail", many: bool = True,
               clear: bool = True) -> str:
    integer = "int4" if kind == "postgresql" else "int"
    if version == "5.4":
        columns = ["pw_name char(32) NOT NULL", "pw_domain char(96) NOT NULL", "pw_passwd char(40)",
                   f"pw_uid {integer}", f"pw_gid {integer}", "pw_gecos char(48)", "pw_dir char(160)",
                   "pw_shell char(20)", "pw_clear_passwd char(16)"]
    else:
        columns = ["pw_name varchar(64) NOT NULL", "pw_domain varchar(96) NOT NULL", "pw_passwd varchar(128)",
                   f"pw_uid {integer}", f"pw_gid {integer}", "pw_gecos varchar(64)", "pw_dir varchar(160)",
                   "pw_shell varchar(20)",
                   "pw_clear_passwd varchar(128)" if kind == "postgresql" else "pw_clear_passwd varchar(16)"]
    if not many:
        columns = [column for column in columns if not column.startswith("pw_domain")]
    if not clear:
        columns = [column for column in columns if not column.startswith("pw_clear_passwd")]
    key = "PRIMARY KEY (pw_name, pw_domain)" if many else "PRIMARY KEY (pw_name)"
    return f"CREATE TABLE {table} ({', '.join(columns)}, {key})"


def relay_table(kind: str, version: str) -> str:
    if version == "5.4":
        return "CREATE TABLE relay (ip_addr char(18) NOT NULL, timestamp char(12), PRIMARY KEY (ip_addr))"
    if kind == "postgresql":
        return ("CREATE TABLE relay (ip_addr varchar(18) NOT NULL, timestamp bigint DEFAULT 0 NOT NULL, "
                "PRIMARY KEY (ip_addr))")
    return "CREATE TABLE relay (ip_addr varchar(39) NOT NULL, timestamp int, PRIMARY KEY (ip_addr))"


def lastauth_table(kind: str) -> str:
    user = "userid" if kind == "postgresql" else "user"
    return (f"CREATE TABLE lastauth ({user} varchar(32) NOT NULL, domain varchar(96) NOT NULL, "
            f"remote_ip varchar(39) NOT NULL, timestamp bigint DEFAULT 0 NOT NULL, PRIMARY KEY ({user}, domain))")


def valias_table(kind: str) -> str:
    if kind == "postgresql":
        return "CREATE TABLE valias (alias varchar(32) NOT NULL, domain varchar(96) NOT NULL, " \
               "valias_line varchar(160) NOT NULL)"
    return ("CREATE TABLE valias (id int(11) PRIMARY KEY AUTO_INCREMENT, alias varchar(32) NOT NULL, "
            "domain varchar(96) NOT NULL, valias_line text NOT NULL, INDEX (alias, domain))")


def limits_table(kind: str) -> str:
    flag = "smallint" if kind == "postgresql" else "tinyint(1)"
    switches = ("disable_pop", "disable_imap", "disable_dialup", "disable_passwordchanging", "disable_webmail",
                "disable_relay", "disable_smtp")
    columns = ", ".join(f"{name} {flag} NOT NULL DEFAULT 0" for name in switches)
    return f"CREATE TABLE limits (domain varchar(96) PRIMARY KEY, maxpopaccounts int NOT NULL DEFAULT -1, {columns})"


def aliasdomains_table() -> str:
    return "CREATE TABLE aliasdomains (alias varchar(100) NOT NULL, domain varchar(100) NOT NULL, PRIMARY KEY (alias))"


# -- an outage on demand ----------------------------------------------------------------------------

class Proxy:
    """A TCP relay on a free loopback port to the database: ``cut()`` closes
    every connection and refuses new ones (the server is down), ``stall()``
    accepts but passes nothing on (a hung server), ``restore()`` heals both."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._listener.listen(64)
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._state = "open"
        self._closing = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        with self._lock:
            self._state = "cut"
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for end in pair:
                end.close()

    def stall(self) -> None:
        with self._lock:
            self._state = "stalled"

    def restore(self) -> None:
        with self._lock:
            self._state = "open"

    def close(self) -> None:
        self._closing = True
        self.cut()
        self._thread.join(5)
        self._listener.close()

    def _run(self) -> None:
        while not self._closing:
            with self._lock:
                state = self._state
                # Stalled: what the ends hold stays unread (and select must not spin on it).
                ends = [end for pair in self._pairs for end in pair] if state == "open" else []
            try:
                readable, _, _ = select.select([self._listener, *ends], [], [], 0.05)
            except (OSError, ValueError):
                continue  # an end was closed by cut() meanwhile
            for end in readable:
                if end is self._listener:
                    self._accept()
                elif state == "open":
                    self._pass_on(end)

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        with self._lock:
            state = self._state  # as it is now, not as it was when select() began
        if state == "cut":
            client.close()
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            if self._state != "cut":  # cut() may have come while the connection was made
                self._pairs.append((client, server))
                return
        client.close()
        server.close()

    def _pass_on(self, end: socket.socket) -> None:
        with self._lock:
            pair = next((pair for pair in self._pairs if end in pair), None)
        if pair is None:
            return
        other = pair[1] if end is pair[0] else pair[0]
        try:
            data = end.recv(65536)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        for socket_end in pair:
            socket_end.close()
