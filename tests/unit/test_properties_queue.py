"""Properties of the queue's readers: segment recovery (queue.index.recover),
the pickup directory's files (queue.todo) and sendmail's command line
(inject.parse_arguments).

A damaged segment (a torn tail, a flipped bit, junk appended or inserted)
may lose records, never produce a wrong message: every message recovery finds
was written, with its id, envelope and body, and its recipients in a state
that was recorded for them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from qtwist.inject import InjectError, Request, parse_arguments
from qtwist.queue.index import open_index, recover
from qtwist.queue.records import DELIVERED, FAILED, KEY_FILE, KEY_SIZE, LEGACY, PENDING, Recipient, Records
from qtwist.queue.todo import TODO_MAGIC, drop_todo, parse_todo
from tests.support.queuefiles import ReadBack, forget_index, read_back

SEGMENT = "000000000001"
KEY = bytes(range(KEY_SIZE))
RECORDS = Records(KEY)

# -- building a segment -------------------------------------------------------------------------------


@dataclass
class Written:
    """One message as written, and every state recorded for each recipient."""

    id: int
    sender: str
    recipients: list[str]
    body: bytes
    states: list[list[tuple[str, str, float]]]
    ended: bool = False


# Records a body may quote: any sender can mail a segment's bytes, but not
# the MACs of this queue's key.
FOREIGN = Records(bytes(KEY_SIZE))
quoted_record = st.sampled_from([
    FOREIGN.end(1, "removed"), FOREIGN.message(7, 0.0, "forged@x.test", [Recipient("r@x.test")], b"forged\n")[0],
    FOREIGN.result(1, 0, Recipient("r@x.test", DELIVERED)), LEGACY.end(1, "removed"),
    LEGACY.message(7, 0.0, "forged@x.test", [Recipient("r@x.test")], b"forged\n")[0],
])
body = st.binary(max_size=60) | st.tuples(st.binary(max_size=20), quoted_record).map(b"".join)
address = st.text(max_size=12)
text = st.text(max_size=12)


@st.composite
def segments(draw) -> tuple[bytes, dict[int, Written]]:
    """A segment's bytes and the messages written into it."""
    data = bytearray()
    written: dict[int, Written] = {}
    next_id = draw(st.integers(1, 2**40))
    for _ in range(draw(st.integers(0, 8))):
        choices = ["message"] + (["result", "deferral", "end"] if written else [])
        kind = draw(st.sampled_from(choices))
        if kind == "message":
            message = Written(next_id, draw(address), draw(st.lists(address, min_size=1, max_size=3)), draw(body), [])
            message.states = [[(PENDING, "", 0.0)] for _ in message.recipients]
            next_id += draw(st.integers(1, 1000))
            record, _ = RECORDS.message(message.id, 1_800_000_000.0, message.sender,
                                       [Recipient(a) for a in message.recipients], message.body)
            written[message.id] = message
        else:
            message = draw(st.sampled_from(sorted(written.values(), key=lambda m: m.id)))
            index = draw(st.integers(0, len(message.recipients) - 1))
            state = message.states[index][-1]
            if kind == "result":
                recipient = Recipient(message.recipients[index], draw(st.sampled_from([DELIVERED, FAILED])), draw(text))
                record = RECORDS.result(message.id, index, recipient)
                message.states[index].append((recipient.state, recipient.text, state[2]))
            elif kind == "deferral":
                next_try, why = draw(st.floats(0, 2e9)), draw(text)
                record = RECORDS.deferral(message.id, index, next_try, why)
                message.states[index].append((state[0], why, next_try))
            else:
                record = RECORDS.end(message.id, draw(st.sampled_from(["delivered", "bounced", "removed"])))
                message.ended = True
        data += record
    return bytes(data), written


def _write(directory: Path, data: bytes) -> Path:
    queue_dir = directory / "queue"
    shutil.rmtree(queue_dir, ignore_errors=True)
    (queue_dir / "seg").mkdir(parents=True)
    (queue_dir / "key").write_bytes(KEY_FILE.pack(KEY, 0))
    (queue_dir / "seg" / SEGMENT).write_bytes(data)
    return queue_dir


def _recovered(queue_dir: Path) -> ReadBack:
    """The server's start on the queue itself, from its segments alone: it repairs them."""
    forget_index(queue_dir)
    index = open_index(queue_dir)
    try:
        recovery = recover(queue_dir, index)
        messages = {message.id: message for message in index.messages(recovery.segments)}
        for message in messages.values():
            message.body = message.read_body()
    finally:
        index.close()
        for segment in recovery.segments.values():
            segment.close()
    return ReadBack(messages, recovery.problems)


def _found(queue_dir: Path, repair: bool = False) -> tuple[dict, list[str]]:
    """What recovery makes of the queue: id → (sender, recipients, body, states)."""
    result = _recovered(queue_dir) if repair else read_back(queue_dir)
    found = {message.id: (message.sender, [r.address for r in message.recipients], message.body,
                          [(r.state, r.text, r.next_try) for r in message.recipients])
             for message in result.messages.values()}
    return found, result.problems


def _assert_only_written(found: dict, written: dict[int, Written]) -> None:
    for message_id, (sender, recipients, data, states) in found.items():
        assert message_id in written, f"recovery made up message {message_id}"
        message = written[message_id]
        assert (sender, recipients, data) == (message.sender, message.recipients, message.body)
        for index, state in enumerate(states):
            # A lost record leaves its field as it was: each field alone was recorded.
            recorded = message.states[index]
            assert all(value in [entry[field] for entry in recorded] for field, value in enumerate(state)), \
                (state, recorded)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("queue-properties")


@settings(max_examples=60, deadline=None)
@given(segments())
def test_an_undamaged_segment_reads_back_exactly(scratch: Path, built) -> None:
    data, written = built
    found, problems = _found(_write(scratch, data))
    assert problems == []
    assert found == {m.id: (m.sender, m.recipients, m.body, [states[-1] for states in m.states])
                     for m in written.values() if not m.ended}


@st.composite
def damaged(draw) -> tuple[bytes, dict[int, Written], str]:
    data, written = draw(segments())
    how = draw(st.sampled_from(["truncated", "flipped", "appended", "inserted"]))
    if how == "truncated":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "flipped" and data:
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + bytes([data[position] ^ (1 << draw(st.integers(0, 7)))]) + data[position + 1:]
    else:
        junk = draw(st.binary(min_size=1, max_size=40) | quoted_record | st.just(RECORDS.magic))
        at = len(data) if how == "appended" else draw(st.integers(0, len(data)))
        data = data[:at] + junk + data[at:]
    return data, written, how


@settings(max_examples=150, deadline=None)
@given(damaged())
def test_a_damaged_segment_loses_records_but_never_makes_a_wrong_message(scratch: Path, case) -> None:
    data, written, how = case
    event(how)
    queue_dir = _write(scratch, data)
    found, _ = _found(queue_dir)
    _assert_only_written(found, written)
    # The server's start repairs the segment: the same messages, and a file
    # that ends with a whole record (a second repair has nothing to cut).
    repaired, _ = _found(queue_dir, repair=True)
    assert repaired == found
    again, problems = _found(queue_dir, repair=True)
    assert again == found
    assert not any("unfinished write" in problem for problem in problems), problems


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["000000000001", "x", "00000000000a", "000000000002", "1.tmp", "00000000000\u00b2", "\u0661"]))
def test_recovery_reads_any_file_without_raising(scratch: Path, data: bytes, name: str) -> None:
    queue_dir = _write(scratch, b"")
    (queue_dir / "seg" / SEGMENT).unlink()
    (queue_dir / "seg" / name).write_bytes(data)
    _found(queue_dir)
    _found(queue_dir, repair=True)


# -- queue/todo ----------------------------------------------------------------------------------------

todo_bytes = st.one_of(
    st.binary(max_size=100),
    st.binary(max_size=80).map(lambda data: TODO_MAGIC + data),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["sender", "rcpt", "x"]),
                                                                             inner, max_size=3), max_leaves=8)
    .map(lambda envelope: TODO_MAGIC + json.dumps(envelope).encode() + b"\nbody"),
    st.integers(1, 100_000).map(lambda depth: TODO_MAGIC + b"[" * depth + b"]" * depth + b"\nbody"),
)


@settings(max_examples=150)
@given(todo_bytes)
def test_parse_todo_raises_only_value_error(data: bytes) -> None:
    try:
        sender, recipients, message = parse_todo(data)
    except ValueError as error:
        assert str(error)
        return
    assert isinstance(sender, str) and recipients and all(isinstance(r, str) and r for r in recipients)
    assert data.endswith(message)


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=20), st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4),
       st.binary(max_size=100))
def test_a_todo_file_reads_back_what_sendmail_wrote(scratch: Path, sender: str, recipients: list[str],
                                                      message: bytes) -> None:
    path = drop_todo(scratch / "todo-home", sender, recipients, message)
    assert parse_todo(path.read_bytes()) == (sender, recipients, message)
    path.unlink()


# -- sendmail's arguments -------------------------------------------------------------------------------

argument = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["-t", "-i", "-oi", "-f", "-fsender@x", "-r", "-F", "-FName", "-bm", "-bs", "-bp", "-q", "-I",
                     "-d", "-v", "-m", "-n", "-U", "-G", "-oem", "-odi", "-B8BITMIME", "-N", "-R", "-Vid", "-L",
                     "-h", "-O", "-X", "-C", "--", "-", "-ti", "-it", "-x", "-tf", "-ft"]),
    st.text(max_size=6).map(lambda rest: "-" + rest),
)


@settings(max_examples=200)
@given(st.lists(argument, max_size=8))
def test_parse_arguments_raises_only_inject_error(arguments: list[str]) -> None:
    try:
        request = parse_arguments(arguments)
    except InjectError as error:
        assert str(error)
        return
    assert isinstance(request, Request)
    # Recipients are some of the arguments, in their order.
    remaining = iter(arguments)
    assert all(any(word == recipient for word in remaining) for recipient in request.recipients)


recipient_word = st.text(min_size=1, max_size=12).filter(lambda word: not word.startswith("-"))


@settings(max_examples=100)
@given(st.none() | st.text(max_size=12), st.none() | st.text(min_size=1, max_size=12), st.booleans(), st.booleans(),
       st.lists(recipient_word, max_size=4), st.lists(st.text(max_size=8), max_size=3))
def test_parse_arguments_round_trip(sender, full_name, header_recipients: bool, dot_ends_input: bool,
                                    recipients: list[str], after_dashes: list[str]) -> None:
    arguments = (["-f", sender] if sender is not None else []) + (["-F" + full_name] if full_name else [])
    arguments += (["-t"] if header_recipients else []) + ([] if dot_ends_input else ["-oi"])
    arguments += [*recipients, "--", *after_dashes]
    assert parse_arguments(arguments) == Request(recipients=[*recipients, *after_dashes], sender=sender,
                                                 full_name=full_name, header_recipients=header_recipients,
                                                 dot_ends_input=dot_ends_input)
