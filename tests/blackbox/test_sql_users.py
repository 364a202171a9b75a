"""Users, aliases and grants in vpopmail's SQL tables, on the machine's real
MariaDB and PostgreSQL, in the layouts vpopmail 5.4 and 5.6 create."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
from passlib.hash import des_crypt, md5_crypt, sha512_crypt
from twisted.logger import globalLogPublisher

from qtwist.grants import SQLGrants
from qtwist.sqldb import RETRY, TIMEOUT, Database, parse_userdb
from qtwist.sqlusers import SQLUserStore
from qtwist.users import NO_POP, NO_RELAY, NO_SMTP, UserDB, UsersError, UserStoreUnavailable
from tests.support.databases import (KINDS, Proxy, ScratchDatabase, aliasdomains_table, fresh_database,
                                     lastauth_table, limits_table, relay_table, user_table, valias_table)
from tests.support.home import DOMAIN, PASSWORD, Home, make_home
from tests.support.waiting import wait_until


@pytest.fixture(params=KINDS)
def database(request) -> Iterator[ScratchDatabase]:
    with fresh_database(request.param) as scratch:
        yield scratch


def store_for(home: Path, database: ScratchDatabase) -> SQLUserStore:
    address = parse_userdb(database.url)
    assert address is not None
    return SQLUserStore(home, Database(address))


def insert_user(database: ScratchDatabase, name: str, hashed: str, *, table: str = "vpopmail",
                domain: str | None = DOMAIN, gid: int = 0, user_dir: str = "", quota: str = "NOQUOTA",
                clear: str | None = None) -> None:
    """A row as vadduser writes it."""
    row = {"pw_name": name, "pw_passwd": hashed, "pw_uid": 1, "pw_gid": gid, "pw_gecos": name,
           "pw_dir": user_dir, "pw_shell": quota}
    if domain is not None:
        row["pw_domain"] = domain
    if clear is not None:
        row["pw_clear_passwd"] = clear
    marks = ", ".join(["%s"] * len(row))
    database.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({marks})", params=tuple(row.values()))


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The text of every log event while the test runs."""
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observe(event) -> None:
        lines.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize("version", ["5.4", "5.6"])
def test_vpopmail_users_log_in_with_every_crypt_hash(tmp_path: Path, database: ScratchDatabase, version: str):
    database.execute(user_table(database.kind, version))
    insert_user(database, "des", des_crypt.hash("pw-des1"), gid=NO_POP)
    insert_user(database, "md5", md5_crypt.hash("pw-md5"), quota="1000000S,1000C", clear="pw-md5")
    if version == "5.6":  # 5.4's pw_passwd char(40) cannot hold sha512-crypt
        insert_user(database, "sha", sha512_crypt.using(rounds=5000).hash("pw-sha"), user_dir="/srv/vmail/sha")
    store = store_for(tmp_path, database)

    assert store.authenticate(f"DES@{DOMAIN.upper()}", "pw-des1").name == "des"
    assert store.authenticate(f"des@{DOMAIN}", "pw-des2") is None
    md5 = store.authenticate(f"md5@{DOMAIN}", "pw-md5")
    assert (md5.cleartext, md5.quota_bytes, md5.may_pop) == ("pw-md5", 1000000, True)
    assert md5.maildir == tmp_path / "domains" / DOMAIN / "md5" / "Maildir"
    assert store.lookup(f"des@{DOMAIN}").may_pop is False
    if version == "5.6":
        assert store.authenticate(f"sha@{DOMAIN}", "pw-sha").maildir == Path("/srv/vmail/sha/Maildir")
    assert store.authenticate(f"nobody@{DOMAIN}", "pw-md5") is None


@pytest.mark.parametrize("version", ["5.4", "5.6"])
def test_one_table_per_domain_and_no_clear_text_column(tmp_path: Path, database: ScratchDatabase, version: str):
    database.execute(user_table(database.kind, version, table="ex_ample_test", many=False, clear=False))
    insert_user(database, "joe", md5_crypt.hash("secret"), table="ex_ample_test", domain=None)
    store = store_for(tmp_path, database)

    joe = store.authenticate("joe@ex-ample.test", "secret")
    assert (joe.name, joe.domain, joe.cleartext) == ("joe", "ex-ample.test", "")
    assert store.lookup("joe@example.test") is None  # no such table: no such user
    assert store.check()[0] is False  # no domain folder names that table yet
    (tmp_path / "domains" / "ex-ample.test").mkdir(parents=True)
    assert store.check() == (True, "users in one table per domain (1 found)")


def test_addresses_and_passwords_with_quotes_percent_and_underscore(tmp_path: Path, database: ScratchDatabase):
    database.execute(user_table(database.kind, "5.6"))
    password = "it's 100% \"quoted\"; --"
    insert_user(database, "o'brien", md5_crypt.hash(password))
    insert_user(database, "jo_e", md5_crypt.hash("underscore"))
    store = store_for(tmp_path, database)

    assert store.authenticate(f"o'brien@{DOMAIN}", password).name == "o'brien"
    assert store.lookup(f"joxe@{DOMAIN}") is None  # '_' is no wildcard
    assert store.lookup(f"jo%@{DOMAIN}") is None
    assert store.lookup(f"x' OR '1'='1@{DOMAIN}") is None
    assert store.lookup(f"o'brien@{DOMAIN}' OR '1'='1") is None


def test_limits_aliasdomains_valias_and_lastauth(tmp_path: Path, database: ScratchDatabase):
    kind = database.kind
    database.execute(user_table(kind, "5.6"), lastauth_table(kind), valias_table(kind), limits_table(kind),
                     aliasdomains_table())
    insert_user(database, "joe", md5_crypt.hash("secret"))
    database.execute("INSERT INTO limits (domain, disable_pop, disable_relay) VALUES (%s, 1, 1)",
                     params=(DOMAIN,))
    database.execute("INSERT INTO aliasdomains (alias, domain) VALUES (%s, %s)", params=("alias.test", DOMAIN))
    database.execute("INSERT INTO valias (alias, domain, valias_line) VALUES (%s, %s, %s)",
                     params=("sales", DOMAIN, "&joe@example.test"))
    database.execute("INSERT INTO valias (alias, domain, valias_line) VALUES (%s, %s, %s)",
                     params=("sales", DOMAIN, "&boss@elsewhere.test"))
    store = store_for(tmp_path, database)

    joe = store.lookup("joe@alias.test")
    assert (joe.address, joe.may_pop, joe.may_relay, joe.may_smtp) == (f"joe@{DOMAIN}", False, False, True)
    assert joe.gid & (NO_POP | NO_RELAY) == NO_POP | NO_RELAY and not joe.gid & NO_SMTP
    assert sorted(store.aliases("Sales", DOMAIN)) == ["&boss@elsewhere.test", "&joe@example.test"]
    assert store.aliases("joe", DOMAIN) is None
    store.database.run(store._record_login, joe, "192.0.2.7", 1700000000)
    store.database.run(store._record_login, joe, "192.0.2.8", 1700000100)
    assert database.rows("SELECT domain, remote_ip, timestamp FROM lastauth") == [(DOMAIN, "192.0.2.8", 1700000100)]


def test_a_change_shows_within_a_second_misses_included(tmp_path: Path, database: ScratchDatabase):
    database.execute(user_table(database.kind, "5.6"))
    store = store_for(tmp_path, database)
    assert store.lookup(f"late@{DOMAIN}") is None
    insert_user(database, "late", md5_crypt.hash("secret"))
    started = time.monotonic()
    wait_until(lambda: store.authenticate(f"late@{DOMAIN}", "secret"), "the new user", timeout=3)
    assert time.monotonic() - started <= 1.5


class FakeClock:
    """The store's and the database's clock, moved by the test (no sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def behind_proxy(tmp_path: Path, database: ScratchDatabase) -> Iterator[tuple[SQLUserStore, Proxy, FakeClock]]:
    """A store with joe (password "secret"), reaching its database through a
    proxy the test can cut, on a clock the test moves."""
    database.execute(user_table(database.kind, "5.6"))
    insert_user(database, "joe", md5_crypt.hash("secret"))
    proxy = Proxy(database.port)
    database.port = proxy.port
    clock = FakeClock()
    store = SQLUserStore(tmp_path, Database(parse_userdb(database.url), clock=clock), clock=clock)
    try:
        yield store, proxy, clock
    finally:
        proxy.close()


def test_an_outage_is_a_temporary_failure_logged_once_and_healed(behind_proxy, logged: list[str]):
    store, proxy, clock = behind_proxy
    assert store.authenticate(f"joe@{DOMAIN}", "secret") is not None

    proxy.cut()  # the connection breaks and no new one is possible
    clock.now += 1.5  # past the one-second cache: the next answer must come from the database
    with pytest.raises(UserStoreUnavailable):
        store.authenticate(f"joe@{DOMAIN}", "secret")
    with pytest.raises(UserStoreUnavailable):
        store.lookup(f"other@{DOMAIN}")  # at once: no new attempt within RETRY
    assert store.unavailable
    assert sum("cannot be reached" in line for line in logged) == 1

    proxy.restore()
    clock.now += RETRY
    assert store.authenticate(f"joe@{DOMAIN}", "secret") is not None
    assert sum("reachable again" in line for line in logged) == 1
    assert not store.unavailable


def test_a_connection_broken_while_idle_is_replaced_silently(behind_proxy, logged: list[str]):
    """A database restart between two look-ups is not an outage."""
    store, proxy, clock = behind_proxy
    assert store.lookup(f"joe@{DOMAIN}") is not None
    proxy.cut()
    proxy.restore()
    clock.now += 1.5
    assert store.lookup(f"joe@{DOMAIN}") is not None
    assert not any("cannot be reached" in line for line in logged)


def test_a_hung_database_fails_a_query_in_seconds_not_never(behind_proxy, logged: list[str]):
    """The server accepts and answers nothing: the query ends by the driver's
    read timeout (MySQL) or the watchdog (PostgreSQL), without a second wait."""
    store, proxy, clock = behind_proxy
    assert store.lookup(f"joe@{DOMAIN}") is not None
    proxy.stall()
    clock.now += 1.5
    started = time.monotonic()
    with pytest.raises(UserStoreUnavailable):
        store.lookup(f"joe@{DOMAIN}")
    assert time.monotonic() - started < TIMEOUT + 3
    assert sum("cannot be reached" in line for line in logged) == 1
    proxy.restore()
    clock.now += RETRY
    assert store.lookup(f"joe@{DOMAIN}") is not None


@pytest.mark.parametrize("version", ["5.4", "5.6"])
def test_grants_in_the_relay_table_are_shared(tmp_path: Path, database: ScratchDatabase, version: str):
    database.execute(relay_table(database.kind, version))
    node_a = SQLGrants(Database(parse_userdb(database.url)))
    node_b = SQLGrants(Database(parse_userdb(database.url)))
    node_a.database.run(node_a._write, "192.0.2.1", int(time.time()))
    node_a.database.run(node_a._write, "192.0.2.2", int(time.time()) - 100)
    node_a.database.run(node_a._write, "192.0.2.1", int(time.time()))  # refreshed: still one row

    rows = node_b.database.run(node_b._read, 0)
    node_b._read_done(rows, full=True, now=time.time())
    assert node_b.is_live("192.0.2.1", 60) and node_b.is_live("192.0.2.2", 200)
    assert not node_b.is_live("192.0.2.2", 60) and not node_b.is_live("192.0.2.3", 60)
    assert sorted(ip for ip, _ in node_b.list()) == ["192.0.2.1", "192.0.2.2"]
    assert node_b.expire(60) == 1
    assert [ip for ip, _ in node_a.list()] == ["192.0.2.1"]
    assert node_a.clear() == 1


def test_the_qtwist_command_edits_users_in_the_database(tmp_path: Path, database: ScratchDatabase):
    database.execute(user_table(database.kind, "5.6"))
    home = Home(tmp_path)
    (tmp_path / "control").mkdir()
    home.control("userdb", database.url + "\n")
    home.qtwist("domain", "add", DOMAIN)
    home.qtwist("user", "add", f"joe@{DOMAIN}", "--password", "first", "--cleartext")
    assert home.qtwist("user", "list").stdout == f"joe@{DOMAIN}\n"
    assert (home.maildir(f"joe@{DOMAIN}") / "new").is_dir()
    assert "already exists" in home.qtwist("user", "add", f"joe@{DOMAIN}", "--password", "x", check=False).stderr
    if database.kind == "mysql":  # vpopmail's MySQL tables keep 16 characters of clear text
        refused = home.qtwist("user", "add", f"ann@{DOMAIN}", "--password", "x" * 17, "--cleartext", check=False)
        assert refused.returncode == 1 and "the database refused ann@example.test" in refused.stderr
        assert not (tmp_path / "domains" / DOMAIN / "ann").exists()
    home.qtwist("user", "passwd", f"joe@{DOMAIN}", "--password", "second")
    store = store_for(tmp_path, database)
    joe = store.authenticate(f"joe@{DOMAIN}", "second")
    assert joe is not None and joe.cleartext == "second"
    assert not (tmp_path / "domains" / DOMAIN / "vpasswd").exists()  # the domain list stays in the files
    home.qtwist("user", "del", f"joe@{DOMAIN}")
    assert home.qtwist("user", "list").stdout == ""
    assert not (tmp_path / "domains" / DOMAIN / "joe").exists()
    home.qtwist("domain", "del", DOMAIN)
    assert DOMAIN not in (tmp_path / "control" / "rcpthosts").read_text()


def test_domain_add_makes_the_table_of_a_one_table_per_domain_database(tmp_path: Path, database: ScratchDatabase):
    database.execute(user_table(database.kind, "5.6", table="old_test", many=False))
    (tmp_path / "domains" / "old.test").mkdir(parents=True)
    store = store_for(tmp_path, database)
    store.add_domain("new-one.test")
    store.add_user("ann@new-one.test", "secret")
    assert [row[0] for row in database.rows("SELECT pw_name FROM new_one_test")] == ["ann"]
    store.delete_domain("new-one.test")
    assert "new_one_test" not in store.database.run(store._table_names)


def test_userdb_export_and_import_copy_users_both_ways_once(tmp_path: Path, database: ScratchDatabase):
    home = make_home(tmp_path, users=("alice", "bob"), cleartext=True)
    exported = home.qtwist("userdb", "export", database.url).stdout
    assert exported.startswith("export: 2 added, 0 updated, 0 unchanged")
    assert home.qtwist("userdb", "export", database.url).stdout.startswith("export: 0 added, 0 updated, 2 unchanged")
    store = store_for(tmp_path, database)
    assert store.authenticate(f"alice@{DOMAIN}", PASSWORD).cleartext == PASSWORD

    store.set_password(f"bob@{DOMAIN}", "changed in sql")
    store.add_user(f"carol@{DOMAIN}", "new in sql")
    imported = home.qtwist("userdb", "import", database.url).stdout
    assert imported.startswith("import: 1 added, 1 updated, 1 unchanged in the vpasswd files")
    files = UserDB(tmp_path)
    assert files.authenticate(f"bob@{DOMAIN}", "changed in sql") is not None
    assert files.authenticate(f"carol@{DOMAIN}", "new in sql") is not None
    assert home.qtwist("userdb", "import", database.url).stdout.startswith("import: 0 added, 0 updated, 3")


def test_a_clear_error_for_a_bad_userdb_line(tmp_path: Path):
    home = Home(tmp_path)
    (tmp_path / "control").mkdir()
    home.control("userdb", "oracle://scott@127.0.0.1/x\n")
    done = home.qtwist("user", "list", check=False)
    assert done.returncode == 1 and "unknown database kind 'oracle'" in done.stderr
    with pytest.raises(UsersError):
        UserDB(tmp_path).add_user("x@nowhere.test", "pw")
