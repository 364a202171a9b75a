"""vpasswd reading and editing, password hashes, flags and quotas (qtwist.users)."""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path

import bcrypt
import pytest
from passlib.hash import md5_crypt, sha256_crypt, sha512_crypt

from qtwist.users import (NO_POP, NO_RELAY, NO_SMTP, User, UserDB, UsersError, hash_password,
                          verify_password)

DOMAIN = "example.test"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "control").mkdir()
    return tmp_path


@pytest.fixture
def db(home: Path) -> UserDB:
    userdb = UserDB(home)
    userdb.add_domain(DOMAIN)
    return userdb


def vpasswd(home: Path, domain: str = DOMAIN) -> Path:
    return home / "domains" / domain / "vpasswd"


def replace_vpasswd(home: Path, text: str) -> None:
    """Rewrite vpasswd the way vpopmail's tools do: a new file renamed over the old one."""
    tmp = vpasswd(home).with_name("vpasswd.tmp")
    tmp.write_text(text)
    os.rename(tmp, vpasswd(home))


def make_user(gid: int = 0, quota: str = "NOQUOTA") -> User:
    return User(name="u", domain=DOMAIN, hash="", uid=1, gid=gid, gecos="u",
                dir=Path("/nowhere/u"), quota=quota, cleartext="")


# -- password hashes -------------------------------------------------------------

def test_new_hashes_are_sha512_crypt_with_implicit_5000_rounds():
    hashed = hash_password("secret")
    assert re.fullmatch(r"\$6\$[./0-9A-Za-z]{16}\$[./0-9A-Za-z]{86}", hashed), hashed
    assert sha512_crypt.verify("secret", hashed)
    assert sha512_crypt.from_string(hashed).rounds == 5000
    assert hash_password("secret") != hashed  # a fresh salt each time


@pytest.mark.parametrize("stored", [
    md5_crypt.hash("s3cret"),
    sha256_crypt.hash("s3cret"),
    sha256_crypt.using(rounds=5000).hash("s3cret"),
    sha512_crypt.hash("s3cret"),
    hash_password("s3cret"),
    bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode(),
    bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4, prefix=b"2a")).decode(),
    "$2y$" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()[4:],
], ids=["md5", "sha256-rounds", "sha256-implicit", "sha512-rounds", "sha512-implicit",
        "bcrypt-2b", "bcrypt-2a", "bcrypt-2y"])
def test_each_hash_format_verifies_only_the_right_password(stored):
    assert verify_password("s3cret", stored)
    assert not verify_password("s3cret ", stored)
    assert not verify_password("S3cret", stored)
    assert not verify_password("", stored)


def test_bcrypt_compares_the_first_72_bytes_like_crypt_blowfish():
    long_password = "x" * 72
    stored = bcrypt.hashpw(long_password.encode(), bcrypt.gensalt(rounds=4)).decode()
    assert verify_password(long_password + "ignored", stored)


@pytest.mark.parametrize("stored", [
    "", "abJnggxhB/yWI", "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "secret", "$6$",
    "$6$saltonly", "$1$x$short", "$2b$12$short", "$7$CU..../....abc",
    "$6$rounds=10$saltsalt$" + "A" * 86,
])
def test_unknown_or_broken_hashes_never_verify(stored):
    assert verify_password("secret", stored) is False


def test_odd_passwords_do_not_raise():
    stored = hash_password("secret")
    assert verify_password("sec\0ret", stored) is False
    assert verify_password("sécret", hash_password("sécret"))
    bcrypt_hash = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    assert verify_password("sec\0ret", bcrypt_hash) is False


# -- reading vpasswd ---------------------------------------------------------------

def test_lines_written_by_vpopmail_are_read_field_by_field(db, home):
    md5 = md5_crypt.hash("pw1")
    replace_vpasswd(home, "\n".join([
        f"alice:{md5}:1:0:Alice A:/var/vpopmail/domains/example.test/alice:1048576S,1000C:pw1",
        f"bob:{hash_password('pw2')}:2:{NO_POP | NO_RELAY}:bob:bob:NOQUOTA",
        f"carol:{hash_password('a:b')}:1:0:carol::5000000:a:b",
        "# not a user line",
        "broken:line",
        f"dave:{hash_password('pw')}:1:notanumber:dave:dave:NOQUOTA:",
    ]) + "\n")
    domain_dir = home / "domains" / DOMAIN

    alice = db.lookup("alice@example.test")
    assert alice == User(name="alice", domain=DOMAIN, hash=md5, uid=1, gid=0, gecos="Alice A",
                         dir=Path("/var/vpopmail/domains/example.test/alice"),
                         quota="1048576S,1000C", cleartext="pw1")
    assert alice.address == "alice@example.test"
    assert alice.maildir == Path("/var/vpopmail/domains/example.test/alice/Maildir")
    assert alice.quota_bytes == 1048576

    bob = db.lookup("bob@example.test")
    assert (bob.uid, bob.gid, bob.cleartext) == (2, NO_POP | NO_RELAY, "")
    assert bob.dir == domain_dir / "bob"  # a relative dir belongs to the domain folder
    assert not bob.may_pop and not bob.may_relay and bob.may_smtp

    carol = db.lookup("carol@example.test")
    assert carol.cleartext == "a:b"
    assert carol.dir == domain_dir / "carol"
    assert db.authenticate("carol@example.test", "a:b") == carol

    assert db.lookup("broken@example.test") is None
    assert db.lookup("dave@example.test") is None  # unreadable flags: refused, not guessed
    assert [user.name for user in db.users(DOMAIN)] == ["alice", "bob", "carol"]


def test_lookup_ignores_case_of_user_and_domain(db):
    db.add_user("alice@example.test", "secret")
    assert db.lookup("ALICE@Example.TEST").address == "alice@example.test"
    assert db.authenticate("Alice@EXAMPLE.test", "secret") is not None


@pytest.mark.parametrize("address", [
    "alice", "alice@", "@example.test", "alice@other.test", "../alice@example.test",
    "alice@../example.test", "alice@example.test/..", "vpasswd@example.test",
])
def test_lookup_of_unknown_or_malformed_addresses_is_none(db, address):
    db.add_user("alice@example.test", "secret")
    assert db.lookup(address) is None
    assert db.authenticate(address, "secret") is None


def test_authenticate_needs_the_right_password(db):
    db.add_user("alice@example.test", "secret")
    assert db.authenticate("alice@example.test", "secret").name == "alice"
    assert db.authenticate("alice@example.test", "Secret") is None
    assert db.authenticate("nobody@example.test", "secret") is None


def test_cache_serves_unchanged_file_and_sees_an_external_rename(db, home):
    db.add_user("alice@example.test", "old")
    first = db.lookup("alice@example.test")
    assert db.lookup("alice@example.test") is first  # unchanged file: parsed once

    # Another process rewrites the file: same length, new inode.
    line = vpasswd(home).read_text()
    new_hash = hash_password("new")
    replace_vpasswd(home, line.replace(first.hash, new_hash))
    assert vpasswd(home).stat().st_size == len(line)
    assert db.lookup("alice@example.test").hash == new_hash
    assert db.authenticate("alice@example.test", "new") is not None
    assert db.authenticate("alice@example.test", "old") is None


def test_cache_sees_an_append_in_place(db, home):
    db.add_user("alice@example.test", "secret")
    assert db.lookup("zed@example.test") is None
    with open(vpasswd(home), "a") as handle:
        handle.write(f"zed:{hash_password('pw')}:1:0:zed:zed:NOQUOTA:\n")
    assert db.authenticate("zed@example.test", "pw") is not None


def test_a_removed_vpasswd_means_no_users(db, home):
    db.add_user("alice@example.test", "secret")
    assert db.lookup("alice@example.test") is not None
    vpasswd(home).unlink()
    assert db.lookup("alice@example.test") is None


# -- flags and quota -------------------------------------------------------------------

def test_flags_from_the_gid_field():
    assert make_user().may_pop and make_user().may_smtp and make_user().may_relay
    assert not make_user(gid=NO_POP).may_pop
    assert not make_user(gid=NO_SMTP).may_smtp
    assert not make_user(gid=NO_RELAY).may_relay
    assert make_user(gid=NO_POP).may_smtp and make_user(gid=NO_SMTP).may_pop
    assert (NO_POP, NO_RELAY, NO_SMTP) == (0x02, 0x20, 0x800)


@pytest.mark.parametrize("quota, expected", [
    ("NOQUOTA", None), ("", None), ("1048576S", 1048576), ("1048576S,1000C", 1048576),
    ("1000C,2048S", 2048), ("1000C", None), ("5000000", 5000000), ("5M", 5 * 1024 * 1024),
    ("10k", 10240), ("0S", None), ("0", None), ("lots", None), ("12S,", None),
])
def test_quota_forms(quota, expected):
    assert make_user(quota=quota).quota_bytes == expected


# -- editing ---------------------------------------------------------------------------

def test_add_domain_makes_folder_vpasswd_and_rcpthosts_line(home):
    (home / "control" / "rcpthosts").write_text("# local domains\nother.test\n")
    UserDB(home).add_domain("Example.TEST")
    assert (home / "control" / "rcpthosts").read_text() == (
        "# local domains\nother.test\nexample.test\n")
    assert vpasswd(home).read_text() == ""
    assert stat.S_IMODE(vpasswd(home).stat().st_mode) == 0o600
    assert UserDB(home).domains() == ["example.test"]
    assert UserDB(home).users("example.test") == []


def test_add_domain_keeps_an_existing_rcpthosts_entry_and_creates_a_missing_file(tmp_path):
    UserDB(tmp_path).add_domain("a.test")
    assert (tmp_path / "control" / "rcpthosts").read_text() == "a.test\n"
    (tmp_path / "control" / "rcpthosts").write_text("B.test\n")
    UserDB(tmp_path).add_domain("b.test")
    assert (tmp_path / "control" / "rcpthosts").read_text() == "B.test\n"


def test_add_user_writes_what_vadduser_writes(db, home):
    db.add_user("Alice@example.test", "secret")
    line = vpasswd(home).read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    name, hashed, uid, gid, gecos, user_dir, quota, clear = line.rstrip("\n").split(":")
    assert (name, uid, gid, gecos, quota, clear) == ("alice", "1", "0", "alice", "NOQUOTA", "")
    assert user_dir == str(home / "domains" / DOMAIN / "alice") and Path(user_dir).is_absolute()
    assert verify_password("secret", hashed) and "rounds=" not in hashed
    for sub in ("cur", "new", "tmp"):
        assert (Path(user_dir) / "Maildir" / sub).is_dir()
    assert stat.S_IMODE(vpasswd(home).stat().st_mode) == 0o600
    assert db.lookup("alice@example.test").maildir == Path(user_dir) / "Maildir"


def test_add_user_with_quota_and_cleartext(db):
    db.add_user("bob@example.test", "pa:ss", quota=1048576, cleartext=True)
    bob = db.lookup("bob@example.test")
    assert (bob.quota, bob.quota_bytes, bob.cleartext) == ("1048576S", 1048576, "pa:ss")


def test_edits_keep_other_lines_verbatim_and_the_file_sorted(db, home):
    foreign = "mallory:$1$abc$xyz:1:0:Mallory:/elsewhere/mallory:NOQUOTA"
    replace_vpasswd(home, f"# kept\n{foreign}\n")
    db.add_user("zoe@example.test", "pw")
    db.add_user("bob@example.test", "pw")
    names = [line.split(":")[0] for line in vpasswd(home).read_text().splitlines()]
    assert names == ["# kept", "bob", "mallory", "zoe"]
    db.set_password("zoe@example.test", "pw2")
    db.delete_user("bob@example.test")
    lines = vpasswd(home).read_text().splitlines()
    assert lines[:2] == ["# kept", foreign] and lines[2].startswith("zoe:")
    assert stat.S_IMODE(vpasswd(home).stat().st_mode) == 0o600


def test_edits_keep_odd_bytes_of_other_lines(db, home):
    foreign = b"mallory:$1$abc$xyz:1:0:Jos\xe9 \x0c\r(latin-1):mallory:NOQUOTA:\n"
    vpasswd(home).write_bytes(foreign)
    assert db.lookup("mallory@example.test").hash == "$1$abc$xyz"
    db.add_user("alice@example.test", "pw")
    assert vpasswd(home).read_bytes().endswith(foreign)


def test_set_password_and_the_cleartext_field(db):
    db.add_user("alice@example.test", "one", cleartext=True)
    db.set_password("alice@example.test", "two")
    alice = db.lookup("alice@example.test")
    assert alice.cleartext == "two" and verify_password("two", alice.hash)
    db.set_password("alice@example.test", "three", cleartext=False)
    assert db.lookup("alice@example.test").cleartext == ""
    db.set_password("alice@example.test", "four")
    assert db.lookup("alice@example.test").cleartext == ""
    db.set_password("alice@example.test", "five", cleartext=True)
    assert db.lookup("alice@example.test").cleartext == "five"
    assert db.authenticate("alice@example.test", "five") is not None
    assert db.authenticate("alice@example.test", "four") is None


def test_delete_user_removes_line_and_mailbox_only(db, home):
    db.add_user("alice@example.test", "pw")
    db.add_user("bob@example.test", "pw")
    db.delete_user("ALICE@example.test")
    assert db.lookup("alice@example.test") is None
    assert not (home / "domains" / DOMAIN / "alice").exists()
    assert (home / "domains" / DOMAIN / "bob" / "Maildir" / "new").is_dir()


def test_delete_user_leaves_a_mailbox_outside_the_domain_folder(db, home, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    replace_vpasswd(home, f"eve:{hash_password('pw')}:1:0:eve:{elsewhere}:NOQUOTA:\n")
    db.delete_user("eve@example.test")
    assert elsewhere.is_dir() and vpasswd(home).read_text() == ""


def test_delete_domain_removes_folder_and_rcpthosts_line(db, home):
    (home / "control" / "rcpthosts").write_text("# mine\nexample.test\nother.test\n")
    db.add_user("alice@example.test", "pw")
    db.delete_domain("EXAMPLE.test")
    assert not (home / "domains" / DOMAIN).exists()
    assert (home / "control" / "rcpthosts").read_text() == "# mine\nother.test\n"
    assert db.domains() == []
    assert db.lookup("alice@example.test") is None


def test_concurrent_adds_lose_no_line(db):
    errors: list[BaseException] = []

    def add(number: int) -> None:
        try:
            db.add_user(f"user{number}@example.test", "pw")
        except BaseException as error:  # collected and reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=add, args=(number,)) for number in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(user.name for user in db.users(DOMAIN)) == sorted(
        f"user{number}" for number in range(20))


# -- errors ------------------------------------------------------------------------------

def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(UsersError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_domain(db):
    assert "nope.test does not exist" in error_of(db.add_user, "a@nope.test", "pw")
    assert "nope.test does not exist" in error_of(db.users, "nope.test")
    assert "nope.test does not exist" in error_of(db.delete_domain, "nope.test")


def test_existing_user_and_domain(db, home):
    db.add_user("alice@example.test", "pw")
    assert "alice@example.test already exists" in error_of(db.add_user, "ALICE@example.test",
                                                           "pw")
    assert "example.test already exists" in error_of(db.add_domain, "example.test")
    (home / "domains" / DOMAIN / "carol").mkdir()
    assert "already exists" in error_of(db.add_user, "carol@example.test", "pw")
    assert db.lookup("carol@example.test") is None


def test_unknown_user(db):
    assert "bob@example.test does not exist" in error_of(db.delete_user, "bob@example.test")
    assert "bob@example.test does not exist" in error_of(db.set_password, "bob@example.test",
                                                         "pw")


@pytest.mark.parametrize("name", ["a b", "a/b", ".hidden", "a:b", "a%b", "x" * 33, "vpasswd",
                                  "caf\u00e9"])
def test_invalid_user_names(db, name):
    assert "invalid user name" in error_of(db.add_user, f"{name}@example.test", "pw")


@pytest.mark.parametrize("domain", ["../etc", "a_b.test", ".test", "a..test", "a/b", "x" * 97])
def test_invalid_domain_names(db, domain):
    assert "invalid domain name" in error_of(db.add_domain, domain)


@pytest.mark.parametrize("address", ["alice", "alice@", "@example.test"])
def test_invalid_addresses(db, address):
    assert "invalid address" in error_of(db.add_user, address, "pw")


def test_invalid_passwords_and_quota(db, home):
    assert "must not be empty" in error_of(db.add_user, "a@example.test", "")
    assert "line breaks" in error_of(db.add_user, "a@example.test", "p\nw")
    assert "longer than 128" in error_of(db.add_user, "a@example.test", "x" * 129)
    assert "positive number" in error_of(db.add_user, "a@example.test", "pw", quota=0)
    assert not (home / "domains" / DOMAIN / "a").exists()


def test_missing_home(tmp_path):
    assert "does not exist" in error_of(UserDB(tmp_path / "missing").add_domain, "a.test")
    assert UserDB(tmp_path / "missing").domains() == []
    assert UserDB(tmp_path / "missing").lookup("a@a.test") is None
