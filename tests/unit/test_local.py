"""qmail-local's job: Maildir, dot-qmail, vdelivermail, quota (qtwist.local)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qtwist import local
from qtwist.control import Settings, load
from qtwist.delivery import Outcome
from qtwist.users import BOUNCE_MAIL, UserDB

DOMAIN = "example.test"
ME = "mx.example.test"
SENDER = "sender@outside.test"
MESSAGE = (b"Received: from outside.test (127.0.0.1) by mx.example.test\n"
           b"Subject: hello\n"
           b"\n"
           b"From the start\n"
           b".\n"
           b"..dots\n"
           b"caf\xc3\xa9\n")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_text(f"{ME}\n")
    users = UserDB(home)
    users.add_domain(DOMAIN)
    users.add_user(f"alice@{DOMAIN}", "secret")
    return home


@pytest.fixture
def users(home: Path) -> UserDB:
    return UserDB(home)


@pytest.fixture
def settings(home: Path) -> Settings:
    return load(home)[0]


def programs_allowed(home: Path) -> Settings:
    (home / "control" / "dotqmailprograms").write_text("1\n")
    settings = load(home)[0]
    assert settings.dotqmailprograms
    return settings


def deliver(home: Path, settings: Settings, recipient: str, message: bytes = MESSAGE,
            sender: str = SENDER) -> Outcome:
    return local.deliver(home, settings, UserDB(home), recipient, sender, message)


def domain_dir(home: Path) -> Path:
    return home / "domains" / DOMAIN


def make_maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def dot_qmail(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def new_files(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").iterdir())


def only_message(maildir: Path) -> bytes:
    files = new_files(maildir)
    assert len(files) == 1, files
    assert list((maildir / "tmp").iterdir()) == []
    return files[0].read_bytes()


def stored(recipient: str, message: bytes = MESSAGE, sender: str = SENDER) -> bytes:
    return f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode() + message


def alice_maildir(home: Path) -> Path:
    return domain_dir(home) / "alice" / "Maildir"


# -- Maildir delivery to vpasswd users ------------------------------------------------------------


def test_delivery_lands_in_new_with_return_path_and_delivered_to(home, settings):
    outcome = deliver(home, settings, f"alice@{DOMAIN}")
    assert outcome == Outcome.success("did 1+0+0\n")
    assert only_message(alice_maildir(home)) == stored(f"alice@{DOMAIN}")


def test_maildir_name_is_unique_and_carries_the_size(home, settings):
    deliver(home, settings, f"alice@{DOMAIN}")
    (path,) = new_files(alice_maildir(home))
    assert path.name.endswith(f",S={len(stored(f'alice@{DOMAIN}'))}")
    assert f"P{os.getpid()}Q" in path.name


def test_null_sender_gets_empty_return_path(home, settings):
    deliver(home, settings, f"alice@{DOMAIN}", sender="")
    assert only_message(alice_maildir(home)).startswith(b"Return-Path: <>\n")


def test_address_case_does_not_matter(home, settings):
    outcome = deliver(home, settings, "Alice@EXAMPLE.Test")
    assert outcome.kind == "success"
    assert only_message(alice_maildir(home)).startswith(
        b"Return-Path: <sender@outside.test>\nDelivered-To: Alice@EXAMPLE.Test\n")


def test_threaded_burst_gives_200_distinct_files(home, settings):
    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(
            lambda n: deliver(home, settings, f"alice@{DOMAIN}", MESSAGE + f"{n}\n".encode()),
            range(200)))
    assert {outcome.kind for outcome in outcomes} == {"success"}
    files = new_files(alice_maildir(home))
    assert len(files) == 200
    bodies = {path.read_bytes().rsplit(b"\n", 2)[-2] for path in files}
    assert bodies == {str(n).encode() for n in range(200)}
    assert list((alice_maildir(home) / "tmp").iterdir()) == []


def test_missing_maildir_folders_of_a_user_are_made(home, settings):
    maildir = alice_maildir(home)
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).rmdir()
    assert deliver(home, settings, f"alice@{DOMAIN}").kind == "success"
    assert only_message(maildir) == stored(f"alice@{DOMAIN}")
    assert (maildir / "cur").is_dir()


def test_unknown_user_fails_with_qmails_words(home, settings):
    outcome = deliver(home, settings, f"nobody@{DOMAIN}")
    assert outcome == Outcome.failure("Sorry, no mailbox here by that name. (#5.1.1)")


def test_virtualdomains_alias_reaches_the_same_users(home):
    (home / "control" / "virtualdomains").write_text(f"alias.test:{DOMAIN}\n")
    assert deliver(home, load(home)[0], "alice@alias.test").kind == "success"
    assert only_message(alice_maildir(home)) == stored("alice@alias.test")


def test_domain_that_is_not_local_fails(home, settings):
    assert deliver(home, settings, "bob@elsewhere.test").kind == "failure"


def test_disk_trouble_is_a_deferral_and_leaves_tmp_empty(home, settings):
    maildir = alice_maildir(home)
    (maildir / "new").rmdir()
    (maildir / "new").write_text("not a folder")
    outcome = deliver(home, settings, f"alice@{DOMAIN}")
    assert outcome.kind == "deferral"
    assert "Not a directory" in outcome.text and outcome.text.endswith("(#4.3.0)")
    assert list((maildir / "tmp").iterdir()) == []


def test_locked_account_bounces(home, settings):
    vpasswd = domain_dir(home) / "vpasswd"
    fields = vpasswd.read_text().rstrip("\n").split(":")
    fields[3] = str(BOUNCE_MAIL)
    vpasswd.write_text(":".join(fields) + "\n")
    outcome = deliver(home, settings, f"alice@{DOMAIN}")
    assert outcome.kind == "failure"
    assert new_files(alice_maildir(home)) == []


def test_looping_message_fails(home, settings):
    looping = f"Delivered-To: alice@{DOMAIN}\n".encode() + MESSAGE
    outcome = deliver(home, settings, f"alice@{DOMAIN}", looping)
    assert outcome == Outcome.failure(
        "This message is looping: it already has my Delivered-To line. (#5.4.6)")
    assert new_files(alice_maildir(home)) == []


def test_delivered_to_in_the_body_is_not_a_loop(home, settings):
    message = MESSAGE + f"Delivered-To: alice@{DOMAIN}\n".encode()
    assert deliver(home, settings, f"alice@{DOMAIN}", message).kind == "success"


# -- extensions ----------------------------------------------------------------------------------


def test_extension_of_an_existing_user_reaches_the_user(home, settings):
    assert deliver(home, settings, f"alice-lists@{DOMAIN}").kind == "success"
    assert only_message(alice_maildir(home)) == stored(f"alice-lists@{DOMAIN}")


def test_dot_qmail_default_of_the_user_wins_over_the_user(home, settings):
    dot_qmail(domain_dir(home), ".qmail-alice-default", "&archive@elsewhere.test\n")
    outcome = deliver(home, settings, f"alice-lists@{DOMAIN}")
    assert outcome == Outcome.success("did 0+1+0\n", forwards=("archive@elsewhere.test",))
    assert new_files(alice_maildir(home)) == []


def test_exact_dot_qmail_wins_over_its_default(home, settings):
    dot_qmail(domain_dir(home), ".qmail-alice-lists", "&exact@elsewhere.test\n")
    dot_qmail(domain_dir(home), ".qmail-alice-default", "&default@elsewhere.test\n")
    assert deliver(home, settings, f"alice-lists@{DOMAIN}").forwards == ("exact@elsewhere.test",)
    assert deliver(home, settings, f"alice-other@{DOMAIN}").forwards == ("default@elsewhere.test",)


def test_dots_in_the_local_part_become_colons(home, settings):
    dot_qmail(domain_dir(home), ".qmail-first:last", "&first@elsewhere.test\n")
    assert deliver(home, settings, f"First.Last@{DOMAIN}").forwards == ("first@elsewhere.test",)


def test_dot_qmail_default_catches_unknown_users_only(home, settings):
    dot_qmail(domain_dir(home), ".qmail-default", "&catchall@elsewhere.test\n")
    assert deliver(home, settings, f"nobody@{DOMAIN}").forwards == ("catchall@elsewhere.test",)
    assert deliver(home, settings, f"alice@{DOMAIN}") == Outcome.success("did 1+0+0\n")


def test_folder_named_like_a_dot_qmail_is_ignored(home, settings):
    (domain_dir(home) / ".qmail-alice").mkdir()
    assert deliver(home, settings, f"alice@{DOMAIN}") == Outcome.success("did 1+0+0\n")


def test_slash_in_the_local_part_never_leaves_the_folder(home, settings):
    dot_qmail(domain_dir(home), ".qmail-x", "&x@elsewhere.test\n")
    dot_qmail(home / "domains", ".qmail-x", "&escaped@elsewhere.test\n")
    outcome = deliver(home, settings, f"../.qmail-x@{DOMAIN}")
    assert outcome == Outcome.failure("Sorry, no mailbox here by that name. (#5.1.1)")


# -- dot-qmail lines -----------------------------------------------------------------------------


def test_forward_only_file_succeeds_with_forwards_and_skips_comments(home, settings):
    dot_qmail(domain_dir(home), ".qmail-sales",
              "# the sales team\n&bob@elsewhere.test\ncarol@elsewhere.test  \n\n")
    outcome = deliver(home, settings, f"sales@{DOMAIN}")
    assert outcome == Outcome.success(
        "did 0+2+0\n", forwards=("bob@elsewhere.test", "carol@elsewhere.test"))


def test_comment_only_file_accepts_and_drops(home, settings):
    dot_qmail(domain_dir(home), ".qmail-void", "# drop everything\n")
    assert deliver(home, settings, f"void@{DOMAIN}") == Outcome.success("did 0+0+0\n")


def test_relative_maildir_line_is_relative_to_the_dot_qmail_folder(home, settings):
    maildir = make_maildir(domain_dir(home) / "shared" / "Maildir")
    dot_qmail(domain_dir(home), ".qmail-info", "./shared/Maildir/\n")
    assert deliver(home, settings, f"info@{DOMAIN}") == Outcome.success("did 1+0+0\n")
    assert only_message(maildir) == stored(f"info@{DOMAIN}")


def test_maildir_and_forward_lines_both_happen(home, settings, tmp_path):
    maildir = make_maildir(tmp_path / "copies" / "Maildir")
    dot_qmail(domain_dir(home), ".qmail-info", f"{maildir}/\n&bob@elsewhere.test\n")
    outcome = deliver(home, settings, f"info@{DOMAIN}")
    assert outcome == Outcome.success("did 1+1+0\n", forwards=("bob@elsewhere.test",))
    assert only_message(maildir) == stored(f"info@{DOMAIN}")


def test_missing_maildir_of_a_dot_qmail_line_defers(home, settings, tmp_path):
    dot_qmail(domain_dir(home), ".qmail-info", f"{tmp_path}/absent/Maildir/\n&bob@elsewhere.test\n")
    outcome = deliver(home, settings, f"info@{DOMAIN}")
    assert outcome.kind == "deferral" and outcome.text.endswith("(#4.2.1)")
    assert outcome.forwards == ()


def test_mbox_line_appends_with_from_line_and_quoting(home, settings, tmp_path):
    mbox = tmp_path / "archive.mbox"
    dot_qmail(domain_dir(home), ".qmail-archive", f"{mbox}\n")
    assert deliver(home, settings, f"archive@{DOMAIN}") == Outcome.success("did 1+0+0\n")
    assert deliver(home, settings, f"archive@{DOMAIN}", sender="").kind == "success"
    quoted = MESSAGE.replace(b"\nFrom the start", b"\n>From the start")
    entries = mbox.read_bytes().split(b"\n\nFrom ")
    assert len(entries) == 2
    first_from, first = entries[0].split(b"\n", 1)
    second_from, second = entries[1].split(b"\n", 1)
    assert first_from.startswith(b"From sender@outside.test ")
    assert second_from.startswith(b"MAILER-DAEMON ")
    assert first + b"\n" == stored(f"archive@{DOMAIN}", quoted)
    assert second == stored(f"archive@{DOMAIN}", quoted, sender="") + b"\n"
    assert mbox.stat().st_mode & 0o777 == 0o600


def test_mbox_deliveries_from_many_threads_stay_whole(home, settings, tmp_path):
    mbox = tmp_path / "archive.mbox"
    dot_qmail(domain_dir(home), ".qmail-archive", f"{mbox}\n")
    big = MESSAGE + b"x" * 200_000 + b"\n"
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda n: deliver(home, settings, f"archive@{DOMAIN}", big),
                                 range(40)))
    assert {outcome.kind for outcome in outcomes} == {"success"}
    entries = mbox.read_bytes().split(b"\n\nFrom sender@outside.test ")
    assert len(entries) == 40
    quoted = big.replace(b"\nFrom the start", b"\n>From the start")
    assert all(entry.split(b"\n", 1)[1].rstrip(b"\n") == stored(f"archive@{DOMAIN}", quoted).rstrip(b"\n")
               for entry in entries)


def test_first_line_blank_defers(home, settings):
    dot_qmail(domain_dir(home), ".qmail-info", "\n&bob@elsewhere.test\n")
    assert deliver(home, settings, f"info@{DOMAIN}") == Outcome.deferral(
        "Uh-oh: first line of .qmail file is blank. (#4.2.1)")


def test_world_writable_dot_qmail_is_not_trusted(home, settings):
    dot_qmail(domain_dir(home), ".qmail-info", "&bob@elsewhere.test\n").chmod(0o666)
    assert deliver(home, settings, f"info@{DOMAIN}") == Outcome.deferral(
        "Uh-oh: .qmail file is writable. (#4.7.0)")


# -- programs ------------------------------------------------------------------------------------


def test_program_line_is_refused_by_default(home, settings, tmp_path):
    out = tmp_path / "out"
    dot_qmail(domain_dir(home), ".qmail-robot", f"|cat > {out}\n")
    assert deliver(home, settings, f"robot@{DOMAIN}") == Outcome.failure(
        "program delivery is disabled in this installation (#5.7.1)")
    assert not out.exists()


def test_program_line_runs_when_enabled(home, tmp_path):
    settings = programs_allowed(home)
    out, env = tmp_path / "out", tmp_path / "env"
    dot_qmail(domain_dir(home), ".qmail-robot-default",
              f'|cat > {out}\n|echo "$SENDER|$RECIPIENT|$LOCAL|$HOST|$DEFAULT|$DTLINE" > {env}\n')
    outcome = deliver(home, settings, f"robot-Job@{DOMAIN}")
    assert outcome == Outcome.success("did 0+0+2\n")
    assert out.read_bytes() == MESSAGE
    assert env.read_text() == (f"{SENDER}|robot-Job@{DOMAIN}|robot-Job|{DOMAIN}|Job|"
                               f"Delivered-To: robot-Job@{DOMAIN}\n\n")


@pytest.mark.parametrize("code, kind", [(100, "failure"), (111, "deferral"), (1, "deferral")])
def test_program_exit_codes(home, code, kind):
    settings = programs_allowed(home)
    dot_qmail(domain_dir(home), ".qmail-robot", f"|echo 'robot says no'; exit {code}\n")
    assert deliver(home, settings, f"robot@{DOMAIN}") == Outcome(kind, "robot says no")


def test_exit_99_skips_the_rest_of_the_file(home):
    settings = programs_allowed(home)
    dot_qmail(domain_dir(home), ".qmail-robot", "|exit 99\n&bob@elsewhere.test\n")
    assert deliver(home, settings, f"robot@{DOMAIN}") == Outcome.success("did 0+0+1\n")


def test_failing_line_ends_the_delivery(home):
    settings = programs_allowed(home)
    dot_qmail(domain_dir(home), ".qmail-robot", "&bob@elsewhere.test\n|exit 100\n")
    outcome = deliver(home, settings, f"robot@{DOMAIN}")
    assert outcome.kind == "failure" and outcome.forwards == ()


def test_program_that_hangs_is_killed_and_deferred(home, monkeypatch):
    monkeypatch.setattr(local, "PROGRAM_TIMEOUT", 0.5)
    settings = programs_allowed(home)
    dot_qmail(domain_dir(home), ".qmail-robot", "|sleep 60\n")
    assert deliver(home, settings, f"robot@{DOMAIN}") == Outcome.deferral(
        "Timeout on program delivery. (#4.3.0)")


# -- vdelivermail --------------------------------------------------------------------------------


def vdelivermail_default(home: Path, action: str) -> None:
    dot_qmail(domain_dir(home), ".qmail-default",
              f"| /home/vpopmail/bin/vdelivermail '' {action}\n")


def test_vdelivermail_bounce_no_mailbox(home, settings):
    vdelivermail_default(home, "bounce-no-mailbox")
    assert deliver(home, settings, f"nobody@{DOMAIN}") == Outcome.failure(
        "Sorry, no mailbox here by that name. (#5.1.1)")
    assert deliver(home, settings, f"alice@{DOMAIN}").kind == "success"
    assert only_message(alice_maildir(home)) == stored(f"alice@{DOMAIN}")


def test_vdelivermail_delete_discards(home, settings):
    vdelivermail_default(home, "delete")
    outcome = deliver(home, settings, f"nobody@{DOMAIN}")
    assert outcome.kind == "success" and "discarded by vdelivermail delete" in outcome.text
    assert outcome.forwards == ()


def test_vdelivermail_address_forwards(home, settings):
    vdelivermail_default(home, "catchall@elsewhere.test")
    assert deliver(home, settings, f"nobody@{DOMAIN}").forwards == ("catchall@elsewhere.test",)


def test_vdelivermail_path_delivers_to_that_users_maildir(home, settings):
    vdelivermail_default(home, str(domain_dir(home) / "alice"))
    assert deliver(home, settings, f"nobody@{DOMAIN}").kind == "success"
    assert only_message(alice_maildir(home)) == stored(f"nobody@{DOMAIN}")


def test_vdelivermail_in_a_user_dot_qmail_gives_the_user_first(home, settings):
    dot_qmail(domain_dir(home), ".qmail-alice",
              "|/usr/local/vpopmail/bin/vdelivermail '' bounce-no-mailbox\n")
    assert deliver(home, settings, f"alice@{DOMAIN}").kind == "success"
    assert only_message(alice_maildir(home)) == stored(f"alice@{DOMAIN}")


# -- quota ---------------------------------------------------------------------------------------


@pytest.fixture
def quota_home(home: Path) -> Path:
    UserDB(home).add_user(f"carol@{DOMAIN}", "secret", quota=1000)
    return home


def carol_maildir(home: Path) -> Path:
    return domain_dir(home) / "carol" / "Maildir"


def test_quota_keeps_maildirsize(quota_home, settings):
    assert deliver(quota_home, settings, f"carol@{DOMAIN}").kind == "success"
    size = len(stored(f"carol@{DOMAIN}"))
    lines = (carol_maildir(quota_home) / "maildirsize").read_text().splitlines()
    assert lines == ["1000S", "0 0", f"{size} 1"]


def test_over_quota_defers(quota_home, settings):
    assert deliver(quota_home, settings, f"carol@{DOMAIN}", MESSAGE + b"x" * 400).kind == "success"
    outcome = deliver(quota_home, settings, f"carol@{DOMAIN}", MESSAGE + b"x" * 400)
    assert outcome == Outcome.deferral("Over quota. (#4.2.2)")
    assert len(new_files(carol_maildir(quota_home))) == 1


def test_maildirsize_with_another_quota_is_rebuilt_from_the_folder(quota_home, settings):
    maildir = carol_maildir(quota_home)
    (maildir / "cur" / "1.M1P1Q1.host,S=900:2,S").write_bytes(b"x" * 10)
    (maildir / "cur" / "2.M1P1Q1.host:2,").write_bytes(b"y" * 50)
    (maildir / "maildirsize").write_text("5000S\n0 0\n")
    assert deliver(quota_home, settings, f"carol@{DOMAIN}").kind == "deferral"
    assert (maildir / "maildirsize").read_text() == "1000S\n950 2\n"


def test_user_without_quota_gets_no_maildirsize(home, settings):
    deliver(home, settings, f"alice@{DOMAIN}")
    assert not (alice_maildir(home) / "maildirsize").exists()


# -- locals and ~alias ---------------------------------------------------------------------------


def test_locals_domain_uses_alias_dot_qmail(home, settings):
    maildir = make_maildir(home / "alias" / "Maildir")
    dot_qmail(home / "alias", ".qmail-postmaster", "./Maildir/\n")
    assert deliver(home, settings, f"Postmaster@{ME}").kind == "success"
    assert only_message(maildir) == stored(f"Postmaster@{ME}")


def test_locals_domain_falls_back_to_alias_default(home, settings):
    dot_qmail(home / "alias", ".qmail-default", "&root@elsewhere.test\n")
    assert deliver(home, settings, f"anyone@{ME}").forwards == ("root@elsewhere.test",)


def test_locals_domain_without_alias_fails(home, settings):
    assert deliver(home, settings, f"anyone@{ME}") == Outcome.failure(
        "Sorry, no mailbox here by that name. (#5.1.1)")
