"""Properties of the vpasswd reader (users.py): any line gives a User or
None, any address and password give a User or None, and a quota field never
stops a delivery with an exception."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtwist.users import User, UserDB, _format_line, _parse_line
from tests.support.home import DOMAIN, PASSWORD, make_home

DOMAIN_DIR = Path("/home/vpopmail/domains") / DOMAIN
# A name vadduser accepts (users._USER_RE, not starting with '.').
user_name = st.text(string.ascii_lowercase + string.digits + "!#$&'*+-.=?^_`{|}~", min_size=1, max_size=32).filter(
    lambda name: not name.startswith(".") and name != "vpasswd")
field_text = st.text(st.characters(blacklist_characters=":\n"), max_size=20)
vpasswd_line = st.one_of(
    st.text(max_size=120),
    st.lists(st.text(st.characters(blacklist_characters=":"), max_size=12) | st.sampled_from(["1", "0", "-5", "", "x"]),
             max_size=10).map(":".join),
)


@settings(max_examples=150)
@given(vpasswd_line)
def test_any_vpasswd_line_gives_a_user_or_none(line: str) -> None:
    user = _parse_line(line, DOMAIN, DOMAIN_DIR)
    assert user is None or isinstance(user, User)
    if user is not None:
        assert user.name == line.split(":", 1)[0].lower() and user.domain == DOMAIN
        assert user.address == f"{user.name}@{DOMAIN}"
        assert isinstance(user.uid, int) and isinstance(user.gid, int)


@settings(max_examples=100)
@given(user_name, field_text, st.integers(0, 2**31), st.integers(0, 2**31), field_text, field_text, field_text,
       st.text(max_size=20))
def test_vpasswd_line_round_trip(name, hashed, uid, gid, gecos, user_dir, quota, cleartext) -> None:
    """What add_user and set_password write reads back the same (the clear-text field may hold ':')."""
    line = _format_line(name, hashed, uid, gid, gecos, user_dir, quota, cleartext)
    user = _parse_line(line, DOMAIN, DOMAIN_DIR)
    assert user == User(name=name, domain=DOMAIN, hash=hashed, uid=uid, gid=gid, gecos=gecos,
                        dir=DOMAIN_DIR / (user_dir or name), quota=quota, cleartext=cleartext)


def _user(quota: str) -> User:
    return User(name="alice", domain=DOMAIN, hash="", uid=1, gid=0, gecos="", dir=DOMAIN_DIR / "alice", quota=quota,
                cleartext="")


quota_field = st.one_of(
    st.text(max_size=30),
    st.integers(19, 5000).map(lambda digits: "1" * digits),  # past int()'s 4300 digits, too
    st.text("0123456789SCkKmM, NOQUOTA", max_size=20),
    st.builds(lambda size, count: f"{size}S,{count}C", st.integers(0, 10**12), st.integers(0, 10**6)),
)


@settings(max_examples=150)
@given(quota_field)
def test_a_quota_field_is_a_limit_or_none(quota: str) -> None:
    limit = _user(quota).quota_bytes
    assert limit is None or (isinstance(limit, int) and limit > 0)


@settings(max_examples=60)
@given(st.integers(0, 10**15), st.sampled_from(["", "k", "K", "m", "M"]), st.integers(0, 10**6))
def test_a_quota_field_reads_as_vpopmail_writes_it(size: int, unit: str, count: int) -> None:
    factor = {"": 1, "k": 1024, "m": 1024 * 1024}[unit.lower()]
    assert _user(f"{size}{unit}").quota_bytes == (size * factor or None)
    assert _user(f"{size}S,{count}C").quota_bytes == (size or None)
    assert _user(f"{count}C").quota_bytes is None


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> UserDB:
    root = tmp_path_factory.mktemp("users-properties") / "home"
    make_home(root)
    return UserDB(root)


address = st.one_of(
    st.text(max_size=40),
    st.builds(lambda name, domain: f"{name}@{domain}", st.text(max_size=10) | st.sampled_from(["alice", "ALICE", "bob"]),
              st.sampled_from([DOMAIN, DOMAIN.upper(), "..", "", "x/../y", "example.test\0", "a" * 100])),
    st.sampled_from([f"alice@{DOMAIN}", f" Alice@{DOMAIN} ", f"bob@{DOMAIN}", f"alice@{DOMAIN}@{DOMAIN}"]),
)


@settings(max_examples=150)
@given(address)
def test_lookup_gives_a_user_or_none(users: UserDB, text: str) -> None:
    user = users.lookup(text)
    assert user is None or (isinstance(user, User) and user.address == text.strip().lower())


# Hashing costs a few milliseconds an example (and as much for an unknown user).
@settings(max_examples=40, deadline=None)
@given(address, st.text(max_size=30) | st.sampled_from([PASSWORD, PASSWORD + "\0", "\udcff", "x" * 200]))
def test_authenticate_gives_a_user_or_none(users: UserDB, text: str, password: str) -> None:
    user = users.authenticate(text, password)
    assert user is None or (password == PASSWORD and user.address == text.strip().lower())
