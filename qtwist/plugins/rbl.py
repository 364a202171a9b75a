"""rbl: DNS blocklists, as rblsmtpd does them.

control/rblservers names the zones, one a line; a listed client gets 451
(a line starting with '-' makes that zone's answer a permanent 553).  The
look-ups start when the client connects and are answered at MAIL, so a
listed client learns why and a clean one never waits.  tcp.smtp's RBLSMTPD
works as in rblsmtpd: set but empty skips the check, set to TEXT refuses
with 451 TEXT, or 553 TEXT when it starts with '-'.  Clients that may relay
(RELAYCLIENT, a POP grant, AUTH) are never checked.
"""

from __future__ import annotations

import ipaddress

import dns.exception
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from qtwist.hooks import CONTINUE, Answer, Plugin, Session, defer, reject

log = Logger(namespace="qtwist.plugins.rbl")

NOTE = "rbl.listing"
KNOWN = "rbl.known"


def query_name(ip: str, zone: str) -> str:
    """The DNSBL name for ``ip`` in ``zone``: reversed octets, or nibbles for IPv6."""
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        return ".".join(reversed(ip.split("."))) + "." + zone
    return ".".join(reversed(address.exploded.replace(":", ""))) + "." + zone


def verdict(text: str | None) -> Answer:
    return CONTINUE if text is None else refusal(text)


def refusal(text: str) -> Answer:
    """rblsmtpd's convention: a leading '-' makes the refusal permanent."""
    if text.startswith("-"):
        return reject(text[1:].strip() or "rejected by a DNS blocklist", 553)
    return defer(text.strip() or "rejected by a DNS blocklist")


class RBL(Plugin):
    name = "rbl"
    description = "refuse clients listed in the DNS blocklists of control/rblservers (rblsmtpd)"

    def connect(self, session: Session) -> Answer:
        if self._exempt(session) is None and session.settings.rblservers:
            session.notes[NOTE] = Deferred.fromCoroutine(self._listing(session))
        return CONTINUE

    def mail(self, session: Session, sender: str) -> Answer | Deferred:
        exempt = self._exempt(session)
        if exempt is not None:
            return exempt
        if KNOWN in session.notes:
            return verdict(session.notes[KNOWN])
        listing = session.notes.get(NOTE)
        if listing is None:
            return CONTINUE
        return Deferred.fromCoroutine(self._answer(session, listing))

    @staticmethod
    async def _answer(session: Session, listing: Deferred) -> Answer:
        # A Deferred gives its result to one await only: keep it for the next MAIL.
        session.notes[KNOWN] = await listing
        return verdict(session.notes[KNOWN])

    @staticmethod
    def _exempt(session: Session) -> Answer | None:
        """CONTINUE when this client is not checked, or RBLSMTPD's verdict; None to look up."""
        if session.may_relay:
            return CONTINUE
        env = session.client.env.get("RBLSMTPD")
        if env is None:
            return None
        return CONTINUE if env == "" else refusal(env)

    async def _listing(self, session: Session) -> str | None:
        """The refusal text of the first zone listing the client, or None."""
        ip = session.client.ip
        zones = session.settings.rblservers
        lookups = session.context.lookups
        try:
            names = [query_name(ip, zone.lstrip("-")) for zone in zones]
        except ValueError:
            return None
        answers = await DeferredList([lookups.records(name, "A") for name in names], consumeErrors=True)
        for zone, name, (ok, found) in zip(zones, names, answers):
            if not ok:
                if not found.check(dns.exception.DNSException):
                    log.failure("rbl: look-up of {name} failed", found, name=name)
                continue
            if found:
                texts = await lookups.records(name, "TXT").addErrback(lambda _: [])
                reason = texts[0] if texts else f"{ip} is listed in {zone.lstrip('-')}"
                log.info("rbl: {ip} is listed in {zone}: {reason}", ip=ip, zone=zone.lstrip("-"), reason=reason)
                return ("-" if zone.startswith("-") else "") + reason
        return None
