"""simcontrol and the message edits of the scanning plugins, without daemons
(tests/blackbox/test_scanning.py talks to the real ones)."""

from __future__ import annotations

from qtwist.control import SimRule, Settings, _per_line, _sim_rule
from qtwist.plugins.scanning import ScanPolicy, attachment_names, scan_policy
from qtwist.smtpd import without_fields

_simcontrol = _per_line(_sim_rule)


def settings(text: str) -> Settings:
    rules, errors = _simcontrol("control/simcontrol", list(enumerate(text.splitlines(), 1)))
    assert not errors
    return Settings(me="mx.example.test", simcontrol=rules)


def test_simcontrol_lines_as_simscan_writes_them():
    rules, errors = _simcontrol("control/simcontrol", [
        (1, ":clam=yes,spam=yes,spam_hits=12,attach=.EXE:.scr"),
        (2, "example.test:spam=no,trophie=yes"),
        (3, "boss@example.test:clam=maybe"),
        (4, "no colon here"),
    ])
    assert rules == (SimRule("", True, True, 12.0, (".exe", ".scr")), SimRule("example.test", spam=False))
    assert errors == ["control/simcontrol:3: clam= takes yes or no, not 'maybe'",
                      "control/simcontrol:4: expected KEY:OPTIONS (an empty KEY for the default line)"]
    assert str(rules[0]) == ":clam=yes,spam=yes,spam_hits=12,attach=.exe:.scr"


def test_the_strictest_recipient_wins():
    rules = settings(":spam_hits=15\nlax.test:spam=no,clam=no\nstrict.test:spam_hits=5,attach=.exe\n"
                     "vip@strict.test:spam_hits=30,attach=.zip\n")
    assert scan_policy(rules, ["a@lax.test"]) == ScanPolicy(clam=False, spam=False, spam_hits=15.0)
    assert scan_policy(rules, ["a@lax.test", "b@strict.test"]) == ScanPolicy(True, True, 5.0, frozenset({".exe"}))
    assert scan_policy(rules, ["vip@strict.test"]) == ScanPolicy(True, True, 30.0, frozenset({".zip"}))
    assert scan_policy(rules, ["x@elsewhere.test"]) == ScanPolicy(True, True, 15.0)
    assert scan_policy(settings(""), ["x@elsewhere.test"]) == ScanPolicy()


def test_forged_fields_go_with_their_continuation_lines_and_the_body_stays():
    message = (b"X-Spam-Status: Yes,\n\ttests=FORGED\nSubject: hi\nx-spam-flag: YES\n\n"
               b"X-Spam-Status: in the body stays\n")
    assert without_fields(message, ("x-spam-status", "x-spam-flag")) == (
        b"Subject: hi\n\nX-Spam-Status: in the body stays\n")
    assert without_fields(b"\nX-Spam-Status: body only\n\nmore\n", ("x-spam-status",)) == (
        b"\nX-Spam-Status: body only\n\nmore\n")


def test_attachment_names_of_broken_mime_never_raise():
    assert attachment_names(b"Content-Type: multipart/mixed; boundary=\"x\n\n--x\n") == []
    broken = (b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
              b"Content-Disposition: attachment; filename*=utf-8''%ff%fe.scr\n\nx\n--b\n"
              b"Content-Disposition: attachment; filename=\"ok.exe\"\n\nx\n--b--\n")
    assert "ok.exe" in attachment_names(broken)
    assert attachment_names(b"\xff\xfe\x00 binary junk \x00") == []
