"""What one delivery attempt to one recipient came to, in qmail-send's terms,
and the two channels the scheduler hands deliveries to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.defer import Deferred
from zope.interface import Interface

Kind = Literal["success", "deferral", "failure"]


@dataclass(frozen=True)
class Outcome:
    """The result qmail-local/qmail-remote report: success, deferral (4xx, retry
    later) or failure (5xx, bounce now).  ``text`` is what the log line and the
    bounce show; ``forwards`` are addresses a dot-qmail file sent the message on to."""

    kind: Kind
    text: str
    forwards: tuple[str, ...] = ()
    unreachable: bool = False  # a deferral because no host of the destination took a connection

    @classmethod
    def success(cls, text: str, forwards: tuple[str, ...] = ()) -> "Outcome":
        return cls("success", text, forwards)

    @classmethod
    def deferral(cls, text: str, unreachable: bool = False) -> "Outcome":
        return cls("deferral", text, unreachable=unreachable)

    @classmethod
    def failure(cls, text: str) -> "Outcome":
        return cls("failure", text)


class ILocalDelivery(Interface):
    """qmail-lspawn's side of the scheduler: local recipients, one at a time."""

    def start() -> None:
        """Get ready to deliver (the scheduler starts)."""

    def stop() -> Deferred:
        """Finish what is held, then stop (the scheduler has stopped starting deliveries)."""

    def deliver(message: Any, recipient: str) -> Deferred:
        """Deliver the queued ``message`` to the local ``recipient``: fires with an
        Outcome, never fails."""


class IRemoteDelivery(Interface):
    """qmail-rspawn's side of the scheduler: the recipients of one remote domain at a time."""

    def deliver(settings: Any, domain: str, sender: str, recipients: list[str], message: bytes) -> Deferred:
        """One transaction carrying ``message`` to ``recipients`` (all in ``domain``):
        fires with one Outcome per recipient, in order, never fails."""
