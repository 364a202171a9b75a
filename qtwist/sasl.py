"""SMTP AUTH's exchanges (RFC 4954): PLAIN (RFC 4616), LOGIN and CRAM-MD5 (RFC 2195).

An exchange turns the client's base64 lines into credentials for the login
flow (login.py).  The SMTP server drives it: ``start`` with the initial
response (if any), then ``answer`` with each line the client sends after a
334; every step gives the next challenge, the credentials to check, or the
reply that ends the exchange.  No I/O and no state machine of the server's
here, so every exchange is tested on its own.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass

from twisted.cred.credentials import CramMD5Credentials, ICredentials

from qtwist.login import PlainCredentials

# LOGIN and PLAIN send the password itself, CRAM-MD5 does not.
PLAINTEXT_MECHANISMS = ("LOGIN", "PLAIN")
# In the order EHLO lists them.
MECHANISMS = ("LOGIN", "CRAM-MD5", "PLAIN")

REPLY_MALFORMED = b"501 malformed auth input (#5.5.4)\r\n"
REPLY_CANCELLED = b"501 auth exchange cancelled (#5.0.0)\r\n"


@dataclass(frozen=True)
class Challenge:
    """Send ``334 base64(text)`` and pass the answer to ``answer``."""

    text: bytes

    @property
    def line(self) -> bytes:
        return b"334 " + base64.b64encode(self.text) + b"\r\n"


@dataclass(frozen=True)
class Ended:
    """The exchange is over without credentials: send ``reply``."""

    reply: bytes


Step = Challenge | Ended | ICredentials


def decode(line: str) -> bytes | Ended:
    """A client's base64 answer; '*' cancels (RFC 4954 §4), '=' is an empty answer."""
    line = line.strip()
    if line == "*":
        return Ended(REPLY_CANCELLED)
    if line == "=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return Ended(REPLY_MALFORMED)


class Exchange:
    """One mechanism's exchange; subclasses say what a decoded answer means."""

    name = ""

    def start(self, initial: str | None) -> Step:
        """The first step: ``initial`` is the response given with AUTH, if any."""
        return self.challenge() if initial is None else self.answer(initial)

    def answer(self, line: str) -> Step:
        decoded = decode(line)
        return decoded if isinstance(decoded, Ended) else self.answered(decoded)

    def challenge(self) -> Challenge:
        raise NotImplementedError

    def answered(self, data: bytes) -> Step:
        raise NotImplementedError


class Plain(Exchange):
    """authzid NUL authcid NUL password, in the initial response or after an empty challenge."""

    name = "PLAIN"

    def challenge(self) -> Challenge:
        return Challenge(b"")

    def answered(self, data: bytes) -> Step:
        parts = data.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            return Ended(REPLY_MALFORMED)
        authzid, authcid, password = parts
        return PlainCredentials(authcid, password, authzid)


class Login(Exchange):
    """Username: then Password:, each its own challenge."""

    name = "LOGIN"

    def __init__(self) -> None:
        self.username: bytes | None = None

    def challenge(self) -> Challenge:
        return Challenge(b"Username:")

    def answered(self, data: bytes) -> Step:
        if self.username is None:
            self.username = data
            return Challenge(b"Password:")
        return PlainCredentials(self.username, data)


class CramMD5(Exchange):
    """A fresh challenge, always (the client cannot answer before it); the
    answer is the user name and the HMAC-MD5 of the challenge."""

    name = "CRAM-MD5"

    def __init__(self, me: str, now: float) -> None:
        self.credentials = CramMD5Credentials()
        self.credentials.challenge = f"<{secrets.randbelow(10**12)}.{int(now)}@{me}>".encode()

    def start(self, initial: str | None) -> Step:
        return self.challenge()

    def challenge(self) -> Challenge:
        return Challenge(self.credentials.challenge)

    def answered(self, data: bytes) -> Step:
        response = data.strip()
        if b" " not in response:
            return Ended(REPLY_MALFORMED)
        self.credentials.setResponse(response)
        return self.credentials


def exchange(mechanism: str, me: str, now: float) -> Exchange:
    """The exchange for one of MECHANISMS."""
    if mechanism == "PLAIN":
        return Plain()
    if mechanism == "LOGIN":
        return Login()
    return CramMD5(me, now)
