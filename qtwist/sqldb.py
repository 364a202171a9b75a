"""vpopmail's SQL database (control/userdb): where it is, and talking to it
without ever letting an outage look like "no such user" or "may relay".

The drivers are plain DB-API ones (PyMySQL, psycopg 3) and block; the server
runs every query in the database's own small thread pool (``defer``), so a
slow or dead database can hold up logins and RCPT checks, but never the
reactor, the queue's writer or a delivery to another store.

An outage is a state, not an error per query: the first failure logs one
line and marks the database down; while it is down, calls fail at once
(``UserStoreUnavailable``) except one attempt a second to reconnect; the
first success logs one line saying it is back.  A connection that broke
while idle (the server was restarted) is replaced once, silently.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from qtwist.numbers import decimal
from qtwist.users import UserStoreUnavailable

log = Logger(namespace="qtwist.sqldb")

DEFAULT_PORTS = {"mysql": 3306, "postgresql": 5432}
# Seconds a connect or a query may take before the database counts as down.
TIMEOUT = 5.0
# While down, one call a second tries to reconnect; the others fail at once.
RETRY = 1.0
THREADS = 4

T = TypeVar("T")


class UserDBError(ValueError):
    """control/userdb cannot be used; the message says why, in one line."""


@dataclass(frozen=True)
class DatabaseAddress:
    kind: str  # "mysql" or "postgresql"
    host: str
    port: int
    user: str
    password: str = field(default="", repr=False)
    database: str = "vpopmail"

    def __str__(self) -> str:
        """The address without its password, fit for logs and showctl."""
        return f"{self.kind}://{self.user}@{self.host}:{self.port}/{self.database}"


def parse_userdb(text: str) -> DatabaseAddress | None:
    """control/userdb's content: None for the vpasswd files (empty, or
    ``vpasswd``), else a URL or vpopmail.mysql's ``host|port|user|password|db``
    line (its first line; a second line, for updates, is vpopmail's own)."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines or lines[0].lower() == "vpasswd":
        return None
    line = lines[0]
    if "://" in line:
        return _parse_url(line)
    fields = line.split("|")
    if len(fields) != 5:
        raise UserDBError("control/userdb: expected vpasswd, a mysql:// or postgresql:// URL, "
                          "or vpopmail.mysql's host|port|user|password|database line")
    host, port, user, password, database = fields
    number = decimal(port or "0")
    if number is None or number > 65535:
        raise UserDBError(f"control/userdb: the port {port!r} is not a number")
    return DatabaseAddress("mysql", host or "localhost", number or DEFAULT_PORTS["mysql"], user, password,
                           database or "vpopmail")


def _parse_url(url: str) -> DatabaseAddress:
    parts = urllib.parse.urlsplit(url)
    kind = {"mysql": "mysql", "mariadb": "mysql", "postgresql": "postgresql",
            "postgres": "postgresql"}.get(parts.scheme.lower())
    if kind is None:
        raise UserDBError(f"control/userdb: unknown database kind {parts.scheme!r} "
                          "(mysql://, mariadb:// or postgresql://)")
    try:
        port = parts.port or DEFAULT_PORTS[kind]
    except ValueError:
        raise UserDBError("control/userdb: the URL's port is not a number") from None
    database = urllib.parse.unquote(parts.path.lstrip("/")) or "vpopmail"
    return DatabaseAddress(kind, parts.hostname or "localhost", port,
                           urllib.parse.unquote(parts.username or ""),
                           urllib.parse.unquote(parts.password or ""), database)


# -- the two kinds of server -----------------------------------------------------------------

class Dialect:
    """What differs between MySQL/MariaDB and PostgreSQL, and nothing else."""

    kind: str
    quote_char: str
    # The exception classes that mean "the connection or server is gone".
    connection_errors: tuple[type[Exception], ...]
    # ... "no such table";
    missing_table_errors: tuple[type[Exception], ...]
    # ... and "not that value" (too long for its column, a duplicate key).
    refusals: tuple[type[Exception], ...]

    def connect(self, address: DatabaseAddress) -> Any:
        raise NotImplementedError

    def cut(self, connection: Any) -> None:
        """Make a query hung on ``connection`` fail now (its driver has no read
        timeout of its own); None where the driver has one."""

    def quote(self, identifier: str) -> str:
        q = self.quote_char
        return q + identifier.replace(q, q + q) + q

    def is_missing_table(self, error: Exception) -> bool:
        raise NotImplementedError

    def create_table(self, cursor, table: str, columns: str) -> None:
        """CREATE TABLE IF NOT EXISTS, also when another node or thread makes it
        at the same moment (PostgreSQL then refuses with a duplicate key)."""
        try:
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {self.quote(table)} ({columns})")
        except self.refusals:
            pass

    def upsert(self, cursor, table: str, keys: dict[str, Any], values: dict[str, Any]) -> None:
        """Insert the row or, when its keys exist, update ``values``."""
        raise NotImplementedError

    def tables_query(self) -> str:
        raise NotImplementedError


class MySQL(Dialect):
    kind = "mysql"
    quote_char = "`"

    def __init__(self) -> None:
        import pymysql
        self._driver = pymysql
        self.connection_errors = (pymysql.OperationalError, pymysql.InterfaceError)
        self.missing_table_errors = (pymysql.ProgrammingError,)
        self.refusals = (pymysql.DataError, pymysql.IntegrityError)

    def connect(self, address: DatabaseAddress) -> Any:
        seconds = int(TIMEOUT)
        return self._driver.connect(host=address.host, port=address.port, user=address.user,
                                    password=address.password, database=address.database,
                                    connect_timeout=seconds, read_timeout=seconds, write_timeout=seconds,
                                    autocommit=True, charset="utf8mb4")

    def is_missing_table(self, error: Exception) -> bool:
        return isinstance(error, self.missing_table_errors) and error.args[:1] == (1146,)

    def upsert(self, cursor, table: str, keys: dict[str, Any], values: dict[str, Any]) -> None:
        columns = {**keys, **values}
        names = ", ".join(self.quote(name) for name in columns)
        marks = ", ".join(["%s"] * len(columns))
        updates = ", ".join(f"{self.quote(name)} = VALUES({self.quote(name)})" for name in values)
        cursor.execute(f"INSERT INTO {self.quote(table)} ({names}) VALUES ({marks}) ON DUPLICATE KEY UPDATE {updates}",
                       tuple(columns.values()))

    def tables_query(self) -> str:
        return "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()"


class PostgreSQL(Dialect):
    kind = "postgresql"
    quote_char = '"'

    def __init__(self) -> None:
        import psycopg
        self._driver = psycopg
        self.connection_errors = (psycopg.OperationalError, psycopg.InterfaceError)
        self.missing_table_errors = (psycopg.errors.UndefinedTable,)
        self.refusals = (psycopg.DataError, psycopg.IntegrityError)

    def connect(self, address: DatabaseAddress) -> Any:
        seconds = int(TIMEOUT)
        return self._driver.connect(host=address.host, port=address.port, user=address.user,
                                    password=address.password, dbname=address.database,
                                    connect_timeout=max(2, seconds), autocommit=True,
                                    options=f"-c statement_timeout={seconds * 1000}",
                                    keepalives=1, keepalives_idle=seconds, keepalives_interval=1,
                                    keepalives_count=seconds, tcp_user_timeout=seconds * 1000)

    def is_missing_table(self, error: Exception) -> bool:
        return isinstance(error, self.missing_table_errors)

    def cut(self, connection: Any) -> None:
        # Shutting the socket down wakes libpq's wait; the query fails as on a lost connection.
        try:
            with socket.socket(fileno=os.dup(connection.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass  # closed meanwhile: nothing left to wake

    def upsert(self, cursor, table: str, keys: dict[str, Any], values: dict[str, Any]) -> None:
        # vpopmail's PostgreSQL tables may lack the primary key ON CONFLICT needs:
        # update, and insert when nothing was there.  Two sessions may both
        # insert at once; where a key forbids that, the loser updates instead.
        sets = ", ".join(f"{self.quote(name)} = %s" for name in values)
        where = " AND ".join(f"{self.quote(name)} = %s" for name in keys)
        columns = {**keys, **values}
        names = ", ".join(self.quote(name) for name in columns)
        marks = ", ".join(["%s"] * len(columns))
        statement = (f"WITH changed AS (UPDATE {self.quote(table)} SET {sets} WHERE {where} RETURNING 1) "
                     f"INSERT INTO {self.quote(table)} ({names}) SELECT {marks} "
                     f"WHERE NOT EXISTS (SELECT 1 FROM changed)")
        params = (*values.values(), *keys.values(), *columns.values())
        try:
            cursor.execute(statement, params)
        except self.refusals:
            cursor.execute(statement, params)

    def tables_query(self) -> str:
        return "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"


def dialect_for(address: DatabaseAddress) -> Dialect:
    """The dialect, or a clear error when its driver is not installed."""
    try:
        return MySQL() if address.kind == "mysql" else PostgreSQL()
    except ImportError:
        extra = "mysql" if address.kind == "mysql" else "postgresql"
        raise UserDBError(f"control/userdb names a {address.kind} database, but its driver is not "
                          f"installed: pip install 'qtwist[{extra}]'") from None


# -- connections -----------------------------------------------------------------------------

class Database:
    """One database: a connection per thread, the outage state, and (in the
    server) the thread pool its queries run in."""

    def __init__(self, address: DatabaseAddress, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.dialect = dialect_for(address)
        self._clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self._next_try = 0.0
        self._pool: ThreadPool | None = None
        self._reactor: IReactorTime | None = None
        # thread -> [deadline, connection]: the queries the watchdog looks after.
        self._in_flight: dict[int, list] = {}
        self._watchdog: threading.Thread | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    # -- blocking use (worker threads, the delivery child, the qtwist command) ------------------

    def run(self, work: Callable[..., T], *args: Any) -> T:
        """``work(cursor, *args)`` on this thread's connection.  Raises
        UserStoreUnavailable while the database cannot be reached."""
        if self.down and not self._may_try():
            raise UserStoreUnavailable(f"{self.address} is unreachable")
        for attempt in (1, 2):
            fresh = getattr(self._local, "connection", None) is None
            started = time.monotonic()
            try:
                connection = self._connection()
                self._watch(connection)
                try:
                    with connection.cursor() as cursor:
                        result = work(cursor, *args)
                finally:
                    self._in_flight.pop(threading.get_ident(), None)
            except self.dialect.connection_errors as error:
                self._drop()
                if attempt == 1 and not fresh and time.monotonic() - started < TIMEOUT:
                    # It broke while idle (a restart), not by timing out: one fresh connection, at once.
                    continue
                self._failed(error)
                raise UserStoreUnavailable(f"{self.address}: {one_line(error)}") from None
            self._succeeded()
            return result
        raise AssertionError("unreachable")

    def _watch(self, connection: Any) -> None:
        """Have a query on ``connection`` cut once it runs past TIMEOUT, so a hung
        server holds no thread (a delivery, the server's shutdown) for longer."""
        if type(self.dialect).cut is Dialect.cut:
            return
        self._in_flight[threading.get_ident()] = [time.monotonic() + TIMEOUT, connection]
        if self._watchdog is None:
            with self._lock:
                if self._watchdog is None:
                    self._watchdog = threading.Thread(target=self._watch_queries, name="qtwist-userdb-watchdog",
                                                      daemon=True)
                    self._watchdog.start()

    def _watch_queries(self) -> None:
        while True:
            time.sleep(TIMEOUT / 10)
            now = time.monotonic()
            for entry in list(self._in_flight.values()):
                if now > entry[0]:
                    entry[0] = float("inf")  # cut once
                    self.dialect.cut(entry[1])

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self.dialect.connect(self.address)
        return connection

    def _drop(self) -> None:
        connection, self._local.connection = getattr(self._local, "connection", None), None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass  # it is broken already; closing is a courtesy

    def _may_try(self) -> bool:
        with self._lock:
            now = self._clock()
            if now < self._next_try:
                return False
            self._next_try = now + RETRY
            return True

    def _failed(self, error: Exception) -> None:
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since = self._clock()
            self._next_try = self.down_since + RETRY
        log.warn("userdb: {db} cannot be reached ({error}); logins, RCPT checks and local deliveries "
                 "answer 'try again later' until it is back", db=str(self.address), error=one_line(error))

    def _succeeded(self) -> None:
        if self.down_since is None:
            return
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is not None:
            log.info("userdb: {db} is reachable again, after {seconds:.0f} s", db=str(self.address),
                     seconds=self._clock() - since)

    # -- from the reactor thread ----------------------------------------------------------------

    def start(self, reactor) -> None:
        """Give the database its own threads (stopped with the reactor)."""
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=THREADS, name="qtwist-userdb")
        self._pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)

    def defer(self, function: Callable[..., T], *args: Any) -> Deferred:
        """``function(*args)`` (blocking, using ``run``) in the database's threads.
        It fails with UserStoreUnavailable when the database is down or takes
        longer than TIMEOUT, so a client waits seconds, not minutes."""
        assert self._pool is not None and self._reactor is not None, "Database.start() first"
        if self.down and self._clock() < self._next_try:
            return fail(UserStoreUnavailable(f"{self.address} is unreachable"))
        result = deferToThreadPool(self._reactor, self._pool, function, *args)
        result.addTimeout(TIMEOUT + 1, self._reactor, onTimeoutCancel=self._timed_out)
        return result

    def _timed_out(self, result: object, timeout: float) -> object:
        self._failed(TimeoutError(f"no answer within {timeout:.0f} s"))
        raise UserStoreUnavailable(f"{self.address} did not answer within {timeout:.0f} s")


def one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def column_text(value: object) -> str:
    """A column's text: NULL is empty, and the padding of char(N) columns
    (PostgreSQL keeps it) is dropped."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "surrogateescape")
    return str(value).rstrip(" ")


def column_number(value: object) -> int:
    """An int column (or a number kept as text, as 5.4's relay timestamp is); NULL is 0."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    parsed = decimal(column_text(value))
    return 0 if parsed is None else parsed


def row_dicts(cursor) -> list[dict[str, Any]]:
    """The fetched rows by lower-case column name (vpopmail's tables differ in their columns)."""
    names = [description[0].lower() for description in cursor.description or ()]
    return [dict(zip(names, row)) for row in cursor.fetchall()]
