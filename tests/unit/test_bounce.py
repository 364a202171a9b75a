"""qmail-send's bounce messages in QSBMF (qtwist.bounce)."""

from __future__ import annotations

import email
import email.policy
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from qtwist import bounce
from qtwist.control import Settings, load

NOW = 1_700_000_000.0
ORIGINAL = (b"Received: from outside.test (127.0.0.1) by mx.example.test\n"
            b"Subject: the original\n"
            b"\n"
            b"marker-1234\n")


def settings_for(tmp_path: Path, **controls: str) -> Settings:
    """Settings loaded from a home with control/me and the given control files."""
    control = tmp_path / "control"
    control.mkdir(exist_ok=True)
    for name, value in {"me": "mx.example.test", **controls}.items():
        (control / name).write_text(f"{value}\n")
    return load(tmp_path)[0]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path)


def parse(raw: bytes) -> tuple[email.message.EmailMessage, list[str]]:
    """The bounce as a message, and its body split into QSBMF paragraphs."""
    assert b"\r" not in raw
    message = email.message_from_bytes(raw, policy=email.policy.default)
    body = raw.split(b"\n\n", 1)[1].decode()
    return message, body.split("\n\n")


def test_bounce_has_qmail_send_headers(settings):
    raw = bounce.failure_notice(settings, "alice@example.test",
                                [("bob@remote.test", "Remote host said: 550 no such user")],
                                ORIGINAL, NOW)
    message, _ = parse(raw)
    assert message["From"] == "MAILER-DAEMON@mx.example.test"
    assert message["To"] == "alice@example.test"
    assert message["Subject"] == "failure notice"
    assert parsedate_to_datetime(message["Date"]).timestamp() == NOW


def test_bouncefrom_and_bouncehost_name_the_sender(tmp_path):
    settings = settings_for(tmp_path, bouncefrom="bounces", bouncehost="relay.example.test")
    raw = bounce.failure_notice(settings, "alice@example.test", [("bob@remote.test", "no")],
                                ORIGINAL, NOW)
    message, paragraphs = parse(raw)
    assert message["From"] == "bounces@relay.example.test"
    assert paragraphs[0].startswith("Hi. This is the qmail-send program at relay.example.test.\n")


def test_bounce_paragraphs_follow_qsbmf(settings):
    raw = bounce.failure_notice(settings, "alice@example.test",
                                [("bob@remote.test", "Remote host said: 550 no such user"),
                                 ("carol@example.test", "Sorry, no mailbox here by that name. (#5.1.1)\n")],
                                ORIGINAL, NOW)
    _, paragraphs = parse(raw)
    assert paragraphs[0] == (
        "Hi. This is the qmail-send program at mx.example.test.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.")
    assert paragraphs[1] == "<bob@remote.test>:\nRemote host said: 550 no such user"
    assert paragraphs[2] == "<carol@example.test>:\nSorry, no mailbox here by that name. (#5.1.1)"
    assert paragraphs[3] == "--- Below this line is a copy of the message."
    assert raw.endswith(b"--- Below this line is a copy of the message.\n\n"
                        b"Return-Path: <alice@example.test>\n" + ORIGINAL)


def test_multi_line_reason_stays_one_paragraph(settings):
    reason = "Connected to 127.0.0.3 but sender was rejected.\nRemote host said: 553 go away\n\nsee the log\n"
    _, paragraphs = parse(bounce.failure_notice(settings, "alice@example.test",
                                                [("bob@remote.test", reason)], ORIGINAL, NOW))
    assert paragraphs[1] == ("<bob@remote.test>:\nConnected to 127.0.0.3 but sender was rejected.\n"
                             "Remote host said: 553 go away\n/see the log")
    assert paragraphs[2].startswith("---")


def test_too_long_says_qmail_gave_up(settings):
    _, paragraphs = parse(bounce.failure_notice(settings, "alice@example.test",
                                                [("bob@remote.test", "Connection refused. (#4.4.1)")],
                                                ORIGINAL, NOW, too_long=True))
    assert paragraphs[1] == ("<bob@remote.test>:\nConnection refused. (#4.4.1)\n"
                             "I'm not going to try again; this message has been in the queue too long.")
    assert bounce.GIVING_UP == "I'm not going to try again; this message has been in the queue too long."


def test_double_bounce_goes_to_postmaster_with_qmails_words(tmp_path):
    settings = settings_for(tmp_path, doublebounceto="admin", doublebouncehost="ops.example.test")
    failed_bounce = b"From: MAILER-DAEMON@mx.example.test\nSubject: failure notice\n\nHi.\n"
    raw = bounce.failure_notice(settings, "", [("alice@gone.test", "Remote host said: 550 gone")],
                                failed_bounce, NOW)
    message, paragraphs = parse(raw)
    assert message["To"] == "admin@ops.example.test"
    assert paragraphs[0] == ("Hi. This is the qmail-send program at mx.example.test.\n"
                             "I tried to deliver a bounce message to this address, but the bounce bounced!")
    assert paragraphs[1] == "<alice@gone.test>:\nRemote host said: 550 gone"
    assert raw.endswith(b"--- Below this line is the original bounce.\n\nReturn-Path: <>\n" + failed_bounce)


def test_big_original_is_cut_to_its_top_with_a_note(settings):
    body = b"".join(b"line %06d of a long message\n" % n for n in range(10_000))
    original = ORIGINAL + body
    raw = bounce.failure_notice(settings, "alice@example.test", [("bob@remote.test", "no")],
                                original, NOW)
    copy = raw.split(b"Return-Path: <alice@example.test>\n", 1)[1]
    assert copy.startswith(ORIGINAL + b"line 000000 of a long message\n")
    kept, note = copy.rsplit(b"\n\n", 1)
    assert len(kept) <= bounce.BOUNCE_MAX_BYTES and original.startswith(kept + b"\n")
    assert note.startswith(b"--- ") and str(len(original)).encode() in note
    assert len(raw) < bounce.BOUNCE_MAX_BYTES + 2000


def test_small_original_is_copied_byte_for_byte(settings):
    original = ORIGINAL + b"x" * (bounce.BOUNCE_MAX_BYTES - len(ORIGINAL))
    raw = bounce.failure_notice(settings, "alice@example.test", [("bob@remote.test", "no")],
                                original, NOW)
    assert raw.endswith(b"Return-Path: <alice@example.test>\n" + original)


def test_bounce_envelope_of_a_normal_message(settings):
    assert bounce.bounce_envelope(settings, "alice@example.test") == ("", "alice@example.test")


def test_bounce_envelope_of_a_bounce_is_a_double_bounce(tmp_path):
    settings = settings_for(tmp_path, doublebounceto="admin", doublebouncehost="ops.example.test")
    assert bounce.bounce_envelope(settings, "") == ("#@[]", "admin@ops.example.test")


def test_bounce_envelope_of_a_double_bounce_is_none(settings):
    assert bounce.bounce_envelope(settings, "#@[]") is None
