"""qmail-inject for scripts: ``qtwist sendmail`` reads a message on standard
input, completes its header and hands it to the server.

It speaks sendmail's command line, so PHP's mail() (``sendmail_path``), cron
and other programs that call /usr/sbin/sendmail work unchanged.  The running
server owns the queue (it holds queue/lock), so the injector never writes it:
it leaves one file per message in HOME/queue/todo/ (queue.drop_todo) and the
server queues it within a second, or at its next start.  The server adds
``Received: (qtwist invoked by uid N)`` from the file's owner, as qmail-queue
does from its caller's uid: the injecting user cannot forge it.

Everything here works on bytes, so 8-bit bodies arrive byte for byte; only
header fields that are read (recipients for -t) are decoded.
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass, field
from email.utils import formataddr, formatdate, getaddresses, make_msgid
from pathlib import Path
from typing import BinaryIO, Mapping

from qtwist.control import Settings, load
from qtwist.policy import with_default_host
from qtwist.queue.todo import drop_todo


class InjectError(Exception):
    """What stops an injection; the text says what to fix."""


@dataclass
class Request:
    """What sendmail's command line asked for."""

    recipients: list[str] = field(default_factory=list)
    sender: str | None = None  # -f; None means the invoking user's address
    full_name: str | None = None  # -F
    header_recipients: bool = False  # -t
    dot_ends_input: bool = True  # cleared by -i / -oi


# sendmail options that take a value, which qtwist has no use for: -B body
# type, -N DSN notify, -R DSN return, -V envelope id, -L syslog tag, -h hop count,
# -O option=value, -X traffic log, -C configuration file.
_IGNORED_WITH_VALUE = frozenset("BNRVLhOXC")
# Harmless flags: -v verbose, -m me too, -n no aliasing, -U initial submission,
# -G gateway submission.
_IGNORED_FLAGS = frozenset("vmnUG")
_UNSUPPORTED = {
    "q": "qtwist sendmail does not run the queue; use `qtwist queue flush`",
    "I": "qtwist sendmail does not build alias databases (qtwist uses .qmail files)",
    "d": "qtwist sendmail has no debug mode",
}


def parse_arguments(arguments: list[str]) -> Request:
    """sendmail's options, in any order among the recipients; ``--`` ends them."""
    request = Request()
    words = iter(arguments)
    for word in words:
        if word == "--":
            request.recipients.extend(words)
            break
        if not word.startswith("-") or word == "-":
            request.recipients.append(word)
            continue
        position = 1
        while position < len(word):
            letter, rest = word[position], word[position + 1:]
            position += 1
            if letter in "frFbo" or letter in _IGNORED_WITH_VALUE:
                value = rest if rest else next(words, None)
                if value is None:
                    raise InjectError(f"option -{letter} needs a value")
                _apply(request, letter, value)
                break  # the value was the rest of the word
            if letter == "t":
                request.header_recipients = True
            elif letter == "i":
                request.dot_ends_input = False
            elif letter in _UNSUPPORTED:
                raise InjectError(f"-{letter} is not supported: {_UNSUPPORTED[letter]}")
            elif letter not in _IGNORED_FLAGS:
                raise InjectError(f"unknown option -{letter}")
    return request


def _apply(request: Request, letter: str, value: str) -> None:
    if letter in "fr":
        request.sender = value
    elif letter == "F":
        request.full_name = value
    elif letter == "b" and value != "m":
        raise InjectError(f"-b{value} is not supported: qtwist sendmail only delivers a message (-bm)")
    elif letter == "o" and value.startswith("i"):
        request.dot_ends_input = False
    # Any other -o option (-oem, -odi, -oQ...) and the ignored options change nothing here.


def read_message(stream: BinaryIO, dot_ends_input: bool) -> bytes:
    """The message from ``stream`` with LF line ends.  As in sendmail, a line
    holding a single '.' ends it unless -i was given."""
    if dot_ends_input:
        lines = []
        for line in stream:
            if line.rstrip(b"\r\n") == b".":
                break
            lines.append(line)
        data = b"".join(lines)
    else:
        data = stream.read()
    return data.replace(b"\r\n", b"\n")


# A header field's first line: a name of printable characters but ':', then ':'.
_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")
# Fields qmail-inject removes: Bcc is for the envelope only, and Return-Path is
# set at delivery from the envelope sender.
_REMOVED = frozenset({b"bcc", b"resent-bcc", b"return-path"})


def split_header(message: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its continuation lines) and the body.  The
    header ends at the first empty line (dropped) or at the first line that is
    not a header field (kept as the body's first line).  A leading mbox
    ``From `` line is dropped, as sendmail does."""
    if message.startswith(b"From "):
        message = message.partition(b"\n")[2]
    fields: list[bytes] = []
    position = 0
    while position < len(message):
        end = message.find(b"\n", position)
        end = len(message) if end < 0 else end + 1
        line = message[position:end]
        if line == b"\n":
            return fields, message[end:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD_START.match(line):
            fields.append(line)
        else:
            break
        position = end
    return fields, message[position:]


def field_name(header_field: bytes) -> bytes:
    return header_field.split(b":", 1)[0].strip().lower()


def header_addresses(fields: list[bytes]) -> list[str]:
    """The addresses -t sends to: To, Cc and Bcc, or only the Resent- ones
    when the message is being resent (it has Resent- fields)."""
    names = [field_name(f) for f in fields]
    resent = any(name.startswith(b"resent-") for name in names)
    wanted = ({b"resent-to", b"resent-cc", b"resent-bcc"} if resent else {b"to", b"cc", b"bcc"})
    values = [f.split(b":", 1)[1].replace(b"\n", b"").decode("utf-8", "surrogateescape")
              for f, name in zip(fields, names) if name in wanted]
    return [address for _, address in getaddresses(values) if address]


def default_sender(settings: Settings, environment: Mapping[str, str]) -> str:
    """qmail-inject's envelope sender: $QMAILUSER, $MAILUSER, $USER or $LOGNAME
    (else the login name of the uid) @ $QMAILHOST or $MAILHOST (else envnoathost)."""
    user = _first_set(environment, "QMAILUSER", "MAILUSER", "USER", "LOGNAME")
    if user is None:
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = "anonymous"
    host = _first_set(environment, "QMAILHOST", "MAILHOST") or settings.envnoathost
    return f"{user}@{host}"


def _first_set(environment: Mapping[str, str], *names: str) -> str | None:
    return next((environment[name] for name in names if environment.get(name)), None)


def _checked(address: str, what: str) -> str:
    """An address as given, minus surrounding blanks and angle brackets; one with
    control characters could never be sent, so it is refused now."""
    bare = address.strip().removeprefix("<").removesuffix(">").strip()
    if any(ord(char) < 32 or ord(char) == 127 for char in bare):
        raise InjectError(f"the {what} {bare!r} has control characters")
    return bare


@dataclass
class Injection:
    """The envelope and the completed message, ready for the todo/ file."""

    sender: str
    recipients: list[str]
    message: bytes


def prepare(request: Request, raw: bytes, settings: Settings, environment: Mapping[str, str],
            now: float) -> Injection:
    """Complete the header as qmail-inject does: drop Bcc and Return-Path, add
    From, Date and Message-ID when missing; work out the envelope."""
    fields, body = split_header(raw)
    names = {field_name(f) for f in fields}
    if request.sender is None:
        sender = default_sender(settings, environment)
    else:
        sender = with_default_host(_checked(request.sender, "sender"), settings)
    candidates = list(request.recipients)
    if request.header_recipients:
        candidates += header_addresses(fields)
    recipients = list(dict.fromkeys(with_default_host(_checked(address, "recipient"), settings)
                                    for address in candidates if address.strip()))
    if not recipients:
        raise InjectError("no recipients: name them as arguments, or use -t and To:, Cc: or Bcc:")

    kept = [f if f.endswith(b"\n") else f + b"\n" for f in fields if field_name(f) not in _REMOVED]
    added = []
    if b"from" not in names:
        author = sender or default_sender(settings, environment)
        full_name = request.full_name or _first_set(environment, "QMAILNAME", "MAILNAME", "NAME")
        if full_name:
            readable = full_name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            author = formataddr((readable, author), charset="utf-8")
        added.append(f"From: {author}\n")
    if b"date" not in names:
        added.append(f"Date: {formatdate(now, localtime=True)}\n")
    if b"message-id" not in names:
        added.append(f"Message-ID: {make_msgid(domain=settings.me)}\n")
    header = b"".join(kept) + "".join(added).encode("utf-8", "surrogateescape")
    return Injection(sender, recipients, header + b"\n" + body)


def received_header(uid: int, now: float) -> bytes:
    """qmail-queue's line for a message injected on this host, prepended by the
    server when it takes the message from todo/."""
    return f"Received: (qtwist invoked by uid {uid}); {formatdate(now)}\n".encode()


def sendmail(home: Path, arguments: list[str], stream: BinaryIO, environment: Mapping[str, str],
             now: float) -> Path:
    """The whole of ``qtwist sendmail``: returns the todo/ file once it is durable."""
    request = parse_arguments(arguments)
    settings, _ = load(home)  # the server reports broken control files
    injection = prepare(request, read_message(stream, request.dot_ends_input), settings, environment, now)
    try:
        return drop_todo(home, injection.sender, injection.recipients, injection.message)
    except OSError as error:
        raise InjectError(f"cannot leave the message in {home / 'queue' / 'todo'}: "
                          f"{error.strerror or error}") from None
