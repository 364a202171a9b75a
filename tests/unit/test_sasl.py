"""SMTP AUTH exchanges, step by step: PLAIN, LOGIN, CRAM-MD5 (qtwist.sasl)."""

from __future__ import annotations

import base64
import hmac

import pytest

from qtwist.login import PlainCredentials
from qtwist.sasl import (
    MECHANISMS,
    PLAINTEXT_MECHANISMS,
    REPLY_CANCELLED,
    REPLY_MALFORMED,
    Challenge,
    CramMD5,
    Ended,
    Login,
    Plain,
    exchange,
)

ME = "mx.example.test"
NOW = 1_700_000_123.75


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def plain_fields(credentials) -> tuple[bytes, bytes, bytes]:
    assert isinstance(credentials, PlainCredentials)
    return credentials.authzid, credentials.username, credentials.password


# -- Challenge and the answers every exchange shares ---------------------------------------------

def test_a_challenge_line_is_334_and_base64():
    assert Challenge(b"Username:").line == b"334 VXNlcm5hbWU6\r\n"
    assert Challenge(b"").line == b"334 \r\n"


@pytest.mark.parametrize("make", [Plain, Login, lambda: CramMD5(ME, NOW)])
def test_a_star_cancels_any_exchange(make):
    started = make()
    started.start(None)
    assert started.answer("*") == Ended(REPLY_CANCELLED)
    assert make().answer(" *\r\n") == Ended(REPLY_CANCELLED)


@pytest.mark.parametrize("make", [Plain, Login, lambda: CramMD5(ME, NOW)])
@pytest.mark.parametrize("junk", ["not base64!", "AAA", "QUJD=RA==", "é"])
def test_bad_base64_is_malformed(make, junk):
    assert make().answer(junk) == Ended(REPLY_MALFORMED)


# -- PLAIN ---------------------------------------------------------------------------------------

def test_plain_with_an_initial_response_gives_credentials_at_once():
    step = Plain().start(b64(b"\0alice@example.test\0secret"))
    assert plain_fields(step) == (b"", b"alice@example.test", b"secret")


def test_plain_without_an_initial_response_sends_an_empty_challenge():
    mechanism = Plain()
    assert mechanism.start(None) == Challenge(b"")
    step = mechanism.answer(b64(b"\0alice@example.test\0secret"))
    assert plain_fields(step) == (b"", b"alice@example.test", b"secret")


def test_plain_keeps_the_authzid():
    step = Plain().start(b64(b"bob@example.test\0alice@example.test\0secret"))
    assert plain_fields(step) == (b"bob@example.test", b"alice@example.test", b"secret")
    assert not step.acts_as_itself()


def test_plain_keeps_an_empty_password_and_any_non_nul_byte():
    step = Plain().start(b64(b"\0alice@example.test\0"))
    assert plain_fields(step) == (b"", b"alice@example.test", b"")
    step = Plain().start(b64(b"\0\xc3\xa9l\xc3\xa8ve\0p\xffss"))
    assert plain_fields(step) == (b"", b"\xc3\xa9l\xc3\xa8ve", b"p\xffss")


@pytest.mark.parametrize("decoded", [
    b"alice@example.test\0secret",  # two parts
    b"\0alice@example.test\0secret\0more",  # four parts
    b"\0\0secret",  # no user
    b"",
])
def test_plain_needs_three_nul_separated_parts_and_a_user(decoded: bytes):
    assert Plain().start(b64(decoded) if decoded else "=") == Ended(REPLY_MALFORMED)


def test_an_equals_sign_is_an_empty_answer():
    # '=' is the empty answer: for PLAIN that lacks the three parts...
    mechanism = Plain()
    mechanism.start(None)
    assert mechanism.answer("=") == Ended(REPLY_MALFORMED)
    # ...and for LOGIN it is an empty password.
    login = Login()
    login.start(b64(b"alice@example.test"))
    assert login.answer("=").password == b""


# -- LOGIN ---------------------------------------------------------------------------------------

def test_login_asks_for_the_username_then_the_password():
    mechanism = Login()
    assert mechanism.start(None) == Challenge(b"Username:")
    assert mechanism.answer(b64(b"alice@example.test")) == Challenge(b"Password:")
    step = mechanism.answer(b64(b"secret"))
    assert plain_fields(step) == (b"", b"alice@example.test", b"secret")
    assert step.acts_as_itself()


def test_login_takes_an_initial_response_as_the_username():
    mechanism = Login()
    assert mechanism.start(b64(b"alice@example.test")) == Challenge(b"Password:")
    step = mechanism.answer(b64(b"secret"))
    assert plain_fields(step) == (b"", b"alice@example.test", b"secret")


def test_login_challenge_lines_are_the_usual_ones():
    mechanism = Login()
    assert mechanism.start(None).line == b"334 VXNlcm5hbWU6\r\n"
    assert mechanism.answer(b64(b"alice")).line == b"334 UGFzc3dvcmQ6\r\n"


def test_login_cancelled_at_the_password():
    mechanism = Login()
    mechanism.start(None)
    mechanism.answer(b64(b"alice@example.test"))
    assert mechanism.answer("*") == Ended(REPLY_CANCELLED)


# -- CRAM-MD5 ------------------------------------------------------------------------------------

def cram_answer(username: bytes, secret: bytes, challenge: bytes) -> str:
    return b64(username + b" " + hmac.new(secret, challenge, "md5").hexdigest().encode())


def test_cram_md5_challenges_with_a_fresh_name_holding_me_and_the_time():
    first, second = CramMD5(ME, NOW), CramMD5(ME, NOW)
    step = first.start(None)
    assert isinstance(step, Challenge)
    assert step.text.startswith(b"<") and step.text.endswith(f".{int(NOW)}@{ME}>".encode())
    assert step.line == b"334 " + base64.b64encode(step.text) + b"\r\n"
    # Two exchanges in the same second never share a challenge (a replay would not work).
    assert second.start(None).text != step.text


def test_cram_md5_ignores_an_initial_response_and_always_challenges():
    mechanism = CramMD5(ME, NOW)
    step = mechanism.start(cram_answer(b"alice@example.test", b"secret", b"<guess@mx>"))
    assert isinstance(step, Challenge)


def test_cram_md5_answer_gives_credentials_that_check_against_the_secret():
    mechanism = CramMD5(ME, NOW)
    challenge = mechanism.start(None).text
    credentials = mechanism.answer(cram_answer(b"alice@example.test", b"secret", challenge))
    assert credentials.username == b"alice@example.test"
    assert credentials.checkPassword(b"secret")
    assert not credentials.checkPassword(b"Secret")


def test_cram_md5_answer_to_another_challenge_does_not_check():
    mechanism = CramMD5(ME, NOW)
    mechanism.start(None)
    credentials = mechanism.answer(cram_answer(b"alice@example.test", b"secret", b"<1.2@elsewhere>"))
    assert not credentials.checkPassword(b"secret")


def test_cram_md5_answer_without_a_space_is_malformed():
    mechanism = CramMD5(ME, NOW)
    mechanism.start(None)
    assert mechanism.answer(b64(b"alice@example.test")) == Ended(REPLY_MALFORMED)
    assert mechanism.answer("=") == Ended(REPLY_MALFORMED)


# -- choosing an exchange ------------------------------------------------------------------------

@pytest.mark.parametrize("name, kind", [("PLAIN", Plain), ("LOGIN", Login), ("CRAM-MD5", CramMD5)])
def test_exchange_picks_the_mechanism_by_name(name, kind):
    chosen = exchange(name, ME, NOW)
    assert type(chosen) is kind
    assert chosen.name == name


def test_exchange_gives_a_new_exchange_each_time():
    first, second = exchange("LOGIN", ME, NOW), exchange("LOGIN", ME, NOW)
    first.start(b64(b"alice"))
    assert second.start(None) == Challenge(b"Username:")


def test_mechanisms_are_listed_in_ehlo_order_and_plaintext_ones_marked():
    assert MECHANISMS == ("LOGIN", "CRAM-MD5", "PLAIN")
    assert set(PLAINTEXT_MECHANISMS) == {"LOGIN", "PLAIN"}
    assert set(PLAINTEXT_MECHANISMS) < set(MECHANISMS)
    assert "CRAM-MD5" not in PLAINTEXT_MECHANISMS
