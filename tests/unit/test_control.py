"""Control files → Settings, and the watcher that keeps them current."""

import os
import signal
import socket
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from qtwist.control import ControlWatcher, Route, Settings, load


def write_control(home: Path, name: str, text: str) -> Path:
    """Write control/NAME and move its mtime forward, as an edit a second later would."""
    path = home / "control" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    old = path.stat().st_mtime_ns if existed else 0
    path.write_text(text)
    if existed:
        bumped = old + 1_000_000_000
        os.utime(path, ns=(bumped, bumped))
    return path


def loaded(home: Path, previous: Settings | None = None) -> Settings:
    settings, errors = load(home, previous)
    assert errors == []
    return settings


# -- defaults and qmail's chain ---------------------------------------------------

def test_empty_home_gives_qmail_defaults(tmp_path):
    settings = loaded(tmp_path)
    me = socket.getfqdn().lower()
    assert settings.me == me
    assert settings.locals == {me}
    assert settings.smtpgreeting == me
    assert settings.databytes == 0
    assert settings.queuelifetime == 604800
    assert settings.bouncefrom == "MAILER-DAEMON"
    assert settings.doublebounceto == "postmaster"
    assert (settings.concurrencylocal, settings.concurrencyremote) == (10, 20)
    assert (settings.timeoutconnect, settings.timeoutremote, settings.timeoutsmtpd) == (60, 1200, 1200)
    assert settings.relaygrantlifetime == 10800
    assert settings.rcpthosts == frozenset() and settings.smtproutes == ()
    assert settings.authrequirestls is False and settings.dotqmailprograms is False
    assert settings.servercert is None and settings.listeners == ()
    assert settings.origins["me"] == "default"


def test_defaulted_names_follow_me(tmp_path):
    write_control(tmp_path, "me", "MX.Example.Test\n")
    write_control(tmp_path, "bouncehost", "bounces.example.test\n")
    settings = loaded(tmp_path)
    assert settings.me == "mx.example.test"
    for name in ("smtpgreeting", "doublebouncehost", "envnoathost", "helohost"):
        assert getattr(settings, name) == "mx.example.test"
    assert settings.locals == {"mx.example.test"}
    assert settings.bouncehost == "bounces.example.test"
    assert settings.origins["me"] == "control/me"
    assert settings.origins["helohost"] == "default"


def test_comments_blank_lines_and_first_line(tmp_path):
    write_control(tmp_path, "me", "# the public name\n\n  mx.example.test  \nignored.example.test\n")
    write_control(tmp_path, "rcpthosts", "# ours\nExample.Test\n\n# more\n.example.net\n")
    write_control(tmp_path, "morercpthosts", "other.test\n")
    write_control(tmp_path, "databytes", "# limit\n1000000\n")
    settings = loaded(tmp_path)
    assert settings.me == "mx.example.test"
    assert settings.rcpthosts == {"example.test", ".example.net", "other.test"}
    assert settings.databytes == 1000000


def test_files_with_only_comments_count_as_absent(tmp_path):
    write_control(tmp_path, "me", "mx.example.test\n")
    write_control(tmp_path, "smtpgreeting", "# nothing yet\n\n")
    settings = loaded(tmp_path)
    assert settings.smtpgreeting == "mx.example.test"
    assert settings.origins["smtpgreeting"] == "default"


def test_lists_flags_and_listeners(tmp_path):
    write_control(tmp_path, "badmailfrom", "Spammer@Example.Test\n@bad.test\n")
    write_control(tmp_path, "badrcptto", "Nobody@Example.Test\n")
    write_control(tmp_path, "plugins", "rbl\nspf\n# dkim\nchkuser\n")
    write_control(tmp_path, "authrequirestls", "1\n")
    write_control(tmp_path, "dotqmailprograms", "0\n")
    write_control(tmp_path, "listeners", "smtp tcp:2525:interface=127.0.0.1\n"
                                         "smtp tcp:2526:interface=127.0.0.1\nPOP3 none\n")
    write_control(tmp_path, "servercert.pem", "not really a certificate\n")
    settings = loaded(tmp_path)
    assert settings.badmailfrom == {"spammer@example.test", "@bad.test"}
    assert settings.badrcptto == {"nobody@example.test"}
    assert settings.plugins == ("rbl", "spf", "chkuser")
    assert settings.authrequirestls is True and settings.dotqmailprograms is False
    assert settings.listeners == (("smtp", "tcp:2525:interface=127.0.0.1"),
                                  ("smtp", "tcp:2526:interface=127.0.0.1"), ("pop3", "none"))
    assert settings.servercert == tmp_path / "control" / "servercert.pem"


def test_unknown_listener_is_reported(tmp_path):
    write_control(tmp_path, "listeners", "smtp tcp:2525\nimap tcp:143\n")
    settings, errors = load(tmp_path)
    assert errors == ["control/listeners:2: unknown listener 'imap' (expected one of "
                      "smtp, submission, smtps, pop3, pop3s)"]
    assert settings.listeners == ()


# -- broken files keep the last good value ---------------------------------------------

def test_bad_number_is_reported_with_file_and_line(tmp_path):
    write_control(tmp_path, "databytes", "# max\nabc\n")
    settings, errors = load(tmp_path)
    assert errors == ["control/databytes:2: not a number: 'abc'"]
    assert settings.databytes == 0


def test_bad_number_keeps_the_last_good_value(tmp_path):
    write_control(tmp_path, "databytes", "5000\n")
    good = loaded(tmp_path)
    write_control(tmp_path, "databytes", "abc\n")
    settings, errors = load(tmp_path, good)
    assert errors == ["control/databytes:1: not a number: 'abc'"]
    assert settings.databytes == 5000
    again, _ = load(tmp_path, settings)
    assert again.databytes == 5000
    assert again.origins["databytes"] == "control/databytes"


def test_bad_smtproutes_line_keeps_the_whole_last_good_file(tmp_path):
    write_control(tmp_path, "smtproutes", "example.test:relay.example.test\n")
    good = loaded(tmp_path)
    write_control(tmp_path, "smtproutes", "example.test:other.example.test\nbad.test:relay.example.test:port\n")
    settings, errors = load(tmp_path, good)
    assert errors == ["control/smtproutes:2: bad port for 'bad.test' (expected 1-65535)"]
    assert settings.smtproutes == (Route("example.test", "relay.example.test", None),)


def test_smtproutes_errors_do_not_repeat_credentials(tmp_path):
    write_control(tmp_path, "smtproutes", ":smarthost.example.test:587 someuser s3cret\n")
    _, errors = load(tmp_path)
    assert len(errors) == 1 and errors[0].startswith("control/smtproutes:1: ")
    assert "s3cret" not in errors[0] and "someuser" not in errors[0]


def test_unchanged_files_are_not_read_again(tmp_path):
    path = write_control(tmp_path, "concurrencyremote", "30\n")
    first = loaded(tmp_path)
    stat = path.stat()
    path.write_text("40\n")  # same size, same inode; put the old mtime back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert loaded(tmp_path, first).concurrencyremote == 30
    settings, _ = load(tmp_path, first, reread=True)
    assert settings.concurrencyremote == 40


# -- look-ups ------------------------------------------------------------------------------

def test_is_rcpthost_exact_and_dot_suffix():
    settings = Settings(me="mx.example.test", rcpthosts=frozenset({"example.test", ".example.net"}))
    assert settings.is_rcpthost("example.test")
    assert settings.is_rcpthost("EXAMPLE.Test.")
    assert not settings.is_rcpthost("a.example.test")
    assert settings.is_rcpthost("a.example.net")
    assert settings.is_rcpthost("b.a.example.net")
    assert not settings.is_rcpthost("example.net")
    assert not settings.is_rcpthost("badexample.net")
    assert not settings.is_rcpthost("")
    assert not settings.is_rcpthost(".example.net")


def test_route_for_exact_then_longest_suffix_then_default(tmp_path):
    write_control(tmp_path, "smtproutes", "\n".join([
        ":smarthost.example.test:2525",
        ".example.net:[127.0.0.1]",
        ".deep.example.net:127.0.0.2:26",
        "example.net:",
        "v6.test:[::1]:2526",
    ]) + "\n")
    settings = loaded(tmp_path)
    assert settings.route_for("example.net") == Route("example.net", "", None)
    assert settings.route_for("a.example.net") == Route(".example.net", "[127.0.0.1]", None)
    assert settings.route_for("x.deep.example.net") == Route(".deep.example.net", "127.0.0.2", 26)
    assert settings.route_for("V6.test.") == Route("v6.test", "[::1]", 2526)
    assert settings.route_for("anything.test") == Route("", "smarthost.example.test", 2525)


def test_route_for_without_default_is_none(tmp_path):
    write_control(tmp_path, "smtproutes", "example.test:relay.example.test\n")
    settings = loaded(tmp_path)
    assert settings.route_for("other.test") is None
    assert settings.route_for("a.example.test") is None


def test_local_domain_from_directories_and_virtualdomains(tmp_path):
    (tmp_path / "domains" / "example.test").mkdir(parents=True)
    (tmp_path / "domains" / "Second.Test").mkdir()
    (tmp_path / "domains" / "stray-file").write_text("")
    write_control(tmp_path, "virtualdomains", "alias.test:example.test\n.wild.test:second.test\n"
                                              "elsewhere.test:notlocal.test\n")
    settings = loaded(tmp_path)
    assert settings.local_domains == {"example.test", "second.test"}
    assert settings.virtualdomains == (("alias.test", "example.test"), (".wild.test", "second.test"),
                                       ("elsewhere.test", "notlocal.test"))
    assert settings.local_domain("Example.Test") == "example.test"
    assert settings.local_domain("alias.test.") == "example.test"
    assert settings.local_domain("a.wild.test") == "second.test"
    assert settings.local_domain("wild.test") is None
    assert settings.local_domain("elsewhere.test") is None
    assert settings.local_domain("stray-file") is None


def test_describe_marks_defaults(tmp_path):
    write_control(tmp_path, "me", "mx.example.test\n")
    write_control(tmp_path, "morercpthosts", "b.test\na.test\n")
    rows = {name: (shown, is_default) for name, shown, is_default in loaded(tmp_path).describe()}
    assert rows["me"] == ("mx.example.test", False)
    assert rows["rcpthosts"] == ("a.test\nb.test", False)
    assert rows["helohost"] == ("mx.example.test", True)
    assert rows["databytes"][1] is True
    assert rows["servercert.pem"] == ("(none)", True)


# -- the watcher -------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path):
    write_control(tmp_path, "me", "mx.example.test\n")
    write_control(tmp_path, "databytes", "1000\n")
    return tmp_path


def test_watcher_loads_before_start(home):
    watcher = ControlWatcher(home, clock=Clock())
    assert watcher.settings.databytes == 1000
    assert watcher.rules.match("127.0.0.1").allow


def test_watcher_picks_up_a_changed_file(home):
    clock = Clock()
    watcher = ControlWatcher(home, clock=clock, interval=1.0)
    seen = []
    watcher.subscribe(seen.append)
    watcher.startService()
    try:
        clock.advance(1)
        assert seen == []
        write_control(home, "databytes", "2000\n")
        with capturedLogs() as events:
            clock.advance(1)
        assert watcher.settings.databytes == 2000
        assert [settings.databytes for settings in seen] == [2000]
        assert "control: reloaded control/databytes" in [formatEvent(event) for event in events]
    finally:
        watcher.stopService()


def test_watcher_keeps_last_good_value_and_logs_the_error(home):
    clock = Clock()
    watcher = ControlWatcher(home, clock=clock)
    watcher.startService()
    try:
        write_control(home, "databytes", "lots\n")
        with capturedLogs() as events:
            clock.advance(1)
        assert watcher.settings.databytes == 1000
        logged = [formatEvent(event) for event in events]
        assert "control: control/databytes:1: not a number: 'lots'" in logged
        write_control(home, "timeoutsmtpd", "300\n")
        with capturedLogs() as events:
            clock.advance(1)
        assert watcher.settings.timeoutsmtpd == 300
        assert watcher.settings.databytes == 1000
        assert not any("databytes" in formatEvent(event) for event in events)
    finally:
        watcher.stopService()


def test_watcher_reloads_tcp_smtp(home):
    clock = Clock()
    watcher = ControlWatcher(home, clock=clock)
    watcher.startService()
    try:
        (home / "tcp.smtp").write_text("127.0.0.1:allow,RELAYCLIENT=\"\"\n:deny\n")
        with capturedLogs() as events:
            clock.advance(1)
        assert "control: reloaded tcp.smtp" in [formatEvent(event) for event in events]
        assert "RELAYCLIENT" in watcher.rules.match("127.0.0.1").env
        assert watcher.rules.match("127.0.0.2").allow is False
        (home / "tcp.smtp").unlink()
        clock.advance(1)
        assert watcher.rules.match("127.0.0.2").allow is True
    finally:
        watcher.stopService()


def test_watcher_sees_a_new_domain_directory(home):
    clock = Clock()
    watcher = ControlWatcher(home, clock=clock)
    watcher.startService()
    try:
        (home / "domains" / "new.test").mkdir(parents=True)
        clock.advance(1)
        assert watcher.settings.local_domain("new.test") == "new.test"
    finally:
        watcher.stopService()


def test_stopped_watcher_stops_polling(home):
    clock = Clock()
    watcher = ControlWatcher(home, clock=clock)
    watcher.startService()
    watcher.stopService()
    write_control(home, "databytes", "2000\n")
    clock.advance(5)
    assert watcher.settings.databytes == 1000
    assert clock.getDelayedCalls() == []


def test_reload_rereads_even_with_an_unchanged_stat(home):
    watcher = ControlWatcher(home, clock=Clock())
    path = home / "control" / "databytes"
    stat = path.stat()
    path.write_text("9999\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert watcher.reload() is True
    assert watcher.settings.databytes == 9999
    assert watcher.reload() is False


def test_sighup_reloads_and_chains_to_the_previous_handler(home):
    from twisted.internet import reactor

    calls = []
    original = signal.signal(signal.SIGHUP, lambda signum, frame: calls.append(signum))
    try:
        watcher = ControlWatcher(home)
        watcher.startService()
        try:
            path = home / "control" / "databytes"
            stat = path.stat()
            path.write_text("7777\n")
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            signal.raise_signal(signal.SIGHUP)
            reactor.runUntilCurrent()
            assert watcher.settings.databytes == 7777
            assert calls == [signal.SIGHUP]
        finally:
            watcher.stopService()
        signal.raise_signal(signal.SIGHUP)
        assert calls == [signal.SIGHUP, signal.SIGHUP]
    finally:
        signal.signal(signal.SIGHUP, original)


def test_every_setting_says_in_one_line_what_it_is_for():
    from qtwist.control import CONTROLS, about

    for name, _, _ in Settings(me="mx.example.test").describe():
        text = about(name)
        assert text and "\n" not in text and len(text) <= 110, name
    assert len({control.name for control in CONTROLS}) == len(CONTROLS)
