"""What one delivery attempt to one recipient came to, in qmail-send's terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["success", "deferral", "failure"]


@dataclass(frozen=True)
class Outcome:
    """The result qmail-local/qmail-remote report: success, deferral (4xx, retry
    later) or failure (5xx, bounce now).  ``text`` is what the log line and the
    bounce show; ``forwards`` are addresses a dot-qmail file sent the message on to."""

    kind: Kind
    text: str
    forwards: tuple[str, ...] = ()

    @classmethod
    def success(cls, text: str, forwards: tuple[str, ...] = ()) -> "Outcome":
        return cls("success", text, forwards)

    @classmethod
    def deferral(cls, text: str) -> "Outcome":
        return cls("deferral", text)

    @classmethod
    def failure(cls, text: str) -> "Outcome":
        return cls("failure", text)
