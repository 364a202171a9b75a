"""qmail-send's bounce messages (QSBMF), built as bytes; no I/O here.

The wording and layout are qmail-send's, because people and bounce parsers
grep for them: "Hi. This is the qmail-send program at ...", one paragraph per
failed recipient starting ``<address>:``, then a line starting ``---`` and the
original message.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qtwist.control import Settings

# The envelope sender qmail gives a double bounce, so that its failure is
# recognised as a triple bounce and dropped instead of looping.
DOUBLE_BOUNCE_SENDER = "#@[]"

# What qmail-send adds to a deferral when the message outlived queuelifetime.
GIVING_UP = "I'm not going to try again; this message has been in the queue too long."

# The largest copy of the original message a bounce carries (qmail patches call this
# bouncemaxbytes); a bounce for a 20 MB message should not be 20 MB again.
BOUNCE_MAX_BYTES = 65536

_INTRO_BOUNCE = (
    "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
    "This is a permanent error; I've given up. Sorry it didn't work out.\n"
)
_INTRO_DOUBLE_BOUNCE = "I tried to deliver a bounce message to this address, but the bounce bounced!\n"
_BREAK_BOUNCE = "--- Below this line is a copy of the message.\n"
_BREAK_DOUBLE_BOUNCE = "--- Below this line is the original bounce.\n"
# A line break right after another one: an empty line.
_BLANK_LINE = re.compile(r"(?<=\n)\n")


def bounce_envelope(settings: Settings, original_sender: str) -> tuple[str, str] | None:
    """(sender, recipient) for the bounce of a message from ``original_sender``.

    None means a triple bounce: the failed message was itself a double bounce,
    and qmail discards it (the caller logs ``triple bounce: discarding``).
    """
    if original_sender == DOUBLE_BOUNCE_SENDER:
        return None
    if original_sender:
        return "", original_sender
    return DOUBLE_BOUNCE_SENDER, f"{settings.doublebounceto}@{settings.doublebouncehost}"


def _one_line(text: str) -> str:
    """A header value or address line: qmail turns newlines into '_'."""
    return text.replace("\r", "").replace("\n", "_")


def _recipient_paragraph(address: str, reason: str, too_long: bool) -> str:
    """``<address>:`` then the reason.  A blank line inside the reason would end the
    paragraph early, so, as qmail-send does, each such line break becomes a '/'."""
    report = reason.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    if too_long:
        report = f"{report}\n{GIVING_UP}" if report else GIVING_UP
    paragraph = f"<{_one_line(address)}>:\n{report}\n" if report else f"<{_one_line(address)}>:\n"
    return _BLANK_LINE.sub("/", paragraph) + "\n"


def _copy_of(original: bytes, max_bytes: int) -> bytes:
    """The original message, or its first ``max_bytes`` (header and the top of the
    body, cut at a line end) and a note saying so."""
    if len(original) <= max_bytes:
        return original
    line_end = original.rfind(b"\n", 0, max_bytes) + 1
    kept = original[:line_end] if line_end else original[:max_bytes] + b"\n"
    note = (f"\n--- The rest of the message was cut off: it has {len(original)} bytes, "
            f"a bounce carries at most {max_bytes}.\n")
    return kept + note.encode("ascii")


def failure_notice(settings: Settings, original_sender: str, failures: list[tuple[str, str]],
                   original: bytes, now: float, *, too_long: bool = False,
                   max_bytes: int = BOUNCE_MAX_BYTES) -> bytes:
    """The whole bounce message (LF line ends) for ``failures`` of one queued message.

    ``failures`` are (recipient, reason) pairs; ``original`` is the message as
    queued (without Return-Path, which is added here as qmail-send does);
    ``too_long`` appends GIVING_UP to every reason (queuelifetime expired).
    A message from the null sender gets the double-bounce wording.
    """
    double = not original_sender
    envelope = bounce_envelope(settings, original_sender)
    to = envelope[1] if envelope is not None else original_sender
    head = (
        f"Date: {formatdate(now)}\n"
        f"From: {settings.bouncefrom}@{settings.bouncehost}\n"
        f"To: {_one_line(to)}\n"
        "Subject: failure notice\n"
        "\n"
        f"Hi. This is the qmail-send program at {settings.bouncehost}.\n"
        f"{_INTRO_DOUBLE_BOUNCE if double else _INTRO_BOUNCE}"
        "\n"
    )
    paragraphs = "".join(_recipient_paragraph(address, reason, too_long)
                         for address, reason in failures)
    tail = (
        f"{_BREAK_DOUBLE_BOUNCE if double else _BREAK_BOUNCE}"
        "\n"
        f"Return-Path: <{_one_line(original_sender)}>\n"
    )
    text = (head + paragraphs + tail).encode("utf-8", errors="surrogateescape")
    return text + _copy_of(original, max_bytes)
