"""dkim: sign outbound mail (DomainKeys Identified Mail, RFC 6376).

A message leaving for a remote domain is signed when control/dkim/DOMAIN.key
(a PEM private key) exists for the domain of its From: header (else of its
envelope sender); control/dkim/DOMAIN.selector names the selector (default
"default"), whose public key is published at SELECTOR._domainkey.DOMAIN.
Signing is dkimpy's, relaxed/relaxed, in a worker thread.
"""

from __future__ import annotations

import email.parser
import email.utils
from pathlib import Path

import dkim
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from qtwist.hooks import CONTINUE, Answer, Outbound, Plugin, add_headers
from qtwist.policy import split_address

log = Logger(namespace="qtwist.plugins.dkim")

SIGNED_HEADERS = [b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"mime-version",
                  b"content-type", b"content-transfer-encoding", b"in-reply-to", b"references"]


def signing_domain(sender: str, message: bytes) -> str:
    """The domain of From: (what DMARC aligns with), else of the envelope sender."""
    head = message.split(b"\n\n", 1)[0]
    headers = email.parser.BytesHeaderParser().parsebytes(head + b"\n\n")
    _, address = email.utils.parseaddr(str(headers.get("From", "")))
    _, domain = split_address(address or sender)
    return domain


def signature(home: Path, sender: str, message: bytes) -> str | None:
    """The DKIM-Signature header (LF-folded, no line end), or None when no key
    is configured for the domain — blocking: run in a thread."""
    domain = signing_domain(sender, message)
    keys = Path(home) / "control" / "dkim"
    if not domain or "/" in domain:
        return None
    try:
        key = (keys / f"{domain}.key").read_bytes()
    except FileNotFoundError:
        return None
    try:
        selector = (keys / f"{domain}.selector").read_text().strip() or "default"
    except FileNotFoundError:
        selector = "default"
    wire = message.replace(b"\n", b"\r\n")
    signed = dkim.sign(wire, selector.encode(), domain.encode(), key, canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=SIGNED_HEADERS)
    return signed.decode("ascii").replace("\r\n", "\n").rstrip("\n")


class DKIM(Plugin):
    name = "dkim"
    description = "sign outbound mail with the key in control/dkim/DOMAIN.key"

    def outbound(self, message: Outbound, body: bytes) -> Answer | Deferred:
        signing = deferToThread(signature, message.context.home, message.sender, body)
        return signing.addCallback(lambda header: add_headers(header) if header else CONTINUE)
