"""control/userdb's forms (no database needed)."""

from __future__ import annotations

import pytest

from qtwist.sqldb import DatabaseAddress, UserDBError, column_number, column_text, parse_userdb


def test_vpasswd_is_the_default():
    assert parse_userdb("") is None
    assert parse_userdb("# users stay in files\nvpasswd\n") is None


def test_urls_of_both_kinds_with_escaped_passwords():
    assert parse_userdb("mysql://vpopmail:p%40ss%3Aw@db.example.test:3307/mail\n") == DatabaseAddress(
        "mysql", "db.example.test", 3307, "vpopmail", "p@ss:w", "mail")
    assert parse_userdb("postgresql://postgres@127.0.0.1/vpopmail") == DatabaseAddress(
        "postgresql", "127.0.0.1", 5432, "postgres", "", "vpopmail")
    assert parse_userdb("mariadb://root@localhost").port == 3306


def test_vpopmail_mysql_file_copied_in_unchanged():
    text = "# vpopmail.mysql\nlocalhost|0|vpopmailuser|secret|vpopmail\nmaster|0|root|secret|vpopmail\n"
    assert parse_userdb(text) == DatabaseAddress("mysql", "localhost", 3306, "vpopmailuser", "secret", "vpopmail")


def test_the_password_never_shows_when_printed():
    address = parse_userdb("mysql://vpopmail:hunter2@127.0.0.1/vpopmail")
    assert str(address) == "mysql://vpopmail@127.0.0.1:3306/vpopmail"
    assert "hunter2" not in repr(address)


@pytest.mark.parametrize("text, words", [
    ("oracle://x@y/z", "unknown database kind"),
    ("mysql://x@y:port/z", "port"),
    ("localhost|x|u|p|d", "not a number"),
    ("just words", "expected vpasswd"),
])
def test_lines_that_cannot_be_used_say_why(text: str, words: str):
    with pytest.raises(UserDBError, match=words):
        parse_userdb(text)


def test_column_values_as_the_layouts_give_them():
    assert column_text("joe     ") == "joe"  # PostgreSQL pads char(N)
    assert column_text(None) == "" and column_text(b"x") == "x"
    assert column_number("1796324755  ") == 1796324755 and column_number(None) == 0 and column_number(7) == 7
