"""Properties of qmail-local's dot-qmail handling (local.py): whatever a
.qmail file holds, a delivery comes to an Outcome (success, deferral or
failure), never an exception; and no local part names a file outside its folder.

The tests run as whatever user runs them, root included, so the file lines
drawn here are kept inside the test's home: an absolute path is moved under
it and '..' is never drawn.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from qtwist.control import load
from qtwist.delivery import Outcome
from qtwist.local import _dot_qmail_names, deliver
from qtwist.users import UserDB
from tests.support.home import DOMAIN, ME, make_home


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("local-properties") / "home"
    make_home(root)
    return root


def _kept_inside(root: Path, line: str) -> str:
    """A file delivery line that cannot leave ``root``."""
    line = line.replace("..", "__")
    if line.startswith("/"):
        line = f"{root}/outside{line}"
    return line


dot_qmail_line = st.one_of(
    st.sampled_from(["./Maildir/", "./alice/Maildir/", "./mbox", "./missing/Maildir/", "/Maildir/", "/mbox", ".",
                     "./", "&bob@example.test", "bob@example.test", "&", "#comment", "+list", "+", "",
                     "| vdelivermail '' bounce-no-mailbox", "| vdelivermail '' delete", "| vdelivermail",
                     "| vdelivermail '' bob@example.test", "| vdelivermail '' unknown-action",
                     f"| vdelivermail '' {DOMAIN}", "|/bin/true", "| 'unclosed", "./alice/Maildir", "\t", " x"]),
    st.text(max_size=30),
    st.builds(lambda kind, rest: kind + rest, st.sampled_from(list("./|&#+")), st.text(max_size=20)),
)
dot_qmail_text = st.lists(dot_qmail_line, max_size=6).map("\n".join) | st.text(max_size=80)


@settings(max_examples=80, deadline=None)
@given(dot_qmail_text, st.sampled_from([0o644, 0o600, 0o755, 0o646, 0o000]), st.booleans(),
       st.sampled_from(["x", "x-ext", "X"]), st.text(max_size=20), st.binary(max_size=200))
def test_any_dot_qmail_file_gives_an_outcome(home: Path, text: str, mode: int, alias: bool, local: str, sender: str,
                                              message: bytes) -> None:
    folder = home / "alias" if alias else home / "domains" / DOMAIN
    path = folder / ".qmail-x"
    kept = "\n".join(_kept_inside(home, line) if line[:1] in "./" else line.replace("..", "__")
                     for line in text.split("\n"))
    path.write_bytes(kept.encode("utf-8", "surrogateescape"))
    os.chmod(path, mode)
    settings_, errors = load(home)
    assert errors == [] and not settings_.dotqmailprograms
    recipient = f"{local}@{ME if alias else DOMAIN}"
    outcome = deliver(home, settings_, UserDB(home), recipient, sender, message)
    assert isinstance(outcome, Outcome) and outcome.kind in ("success", "deferral", "failure")
    event(outcome.kind)
    assert isinstance(outcome.text, str) and outcome.text
    assert all(isinstance(address, str) for address in outcome.forwards)
    if outcome.kind != "success":
        assert outcome.forwards == ()
    path.unlink()


@settings(max_examples=150)
@given(st.text(max_size=30) | st.text("-.Xx/\0", max_size=12))
def test_no_dot_qmail_name_leaves_the_folder(local: str) -> None:
    names = _dot_qmail_names(local)
    assert names[-1] == (".qmail-default", local)
    for name, default in names:
        assert name.startswith(".qmail-") and "/" not in name and "\0" not in name
        assert default is None or local.endswith(default)


def ascii_lower(text: str) -> str:
    """qmail's case_lowerb: A-Z only (İ and the Kelvin sign K stay)."""
    return "".join(chr(ord(char) + 32) if "A" <= char <= "Z" else char for char in text)


@settings(max_examples=150)
@given(st.text(max_size=30) | st.text("-.Xx\u0130\u212a", max_size=12))
def test_each_default_name_gives_the_rest_of_the_local_part(local: str) -> None:
    """qmail-local: .qmail-a-b-default gets DEFAULT=c for a-b-c; '.' becomes ':'."""
    for name, default in _dot_qmail_names(local):
        if default is None:
            assert name == ".qmail-" + ascii_lower(local).replace(".", ":")
            continue
        head = local[:len(local) - len(default)]
        assert name == ".qmail-" + ascii_lower(head).replace(".", ":") + "default"
        assert head == "" or head.endswith("-")
