"""spf: Sender Policy Framework, as the qmail SPF patch applies it.

control/spfbehavior (or SPFBEHAVIOR from tcp.smtp, which wins):
0 no checks; 1 only add Received-SPF; 2 also answer 451 when DNS fails;
3 also refuse "fail"; 4 also "softfail"; 5 also "neutral"; 6 refuse
everything but "pass".  The evaluation is pyspf's; clients that may relay
are not checked, and the null sender is checked by its HELO name.
"""

from __future__ import annotations

import functools
from typing import Any

import dns.exception
import dns.resolver
import spf
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from qtwist.hooks import CONTINUE, Answer, Plugin, Session, add_headers, defer, reject
from qtwist.numbers import decimal

log = Logger(namespace="qtwist.plugins.spf")

NOTE = "spf.header"
REFUSED_FROM = {3: {"fail"}, 4: {"fail", "softfail"}, 5: {"fail", "softfail", "neutral"}}


def behavior(session: Session) -> int:
    value = decimal(session.client.env.get("SPFBEHAVIOR", ""))
    return session.settings.spfbehavior if value is None else value


def refused(result: str, level: int) -> bool:
    if level >= 6:
        return result not in ("pass", "temperror")
    return result in REFUSED_FROM.get(level, ())


@functools.lru_cache(maxsize=4)
def _lookup_with(lookups: Any):
    """pyspf's DNS function, answered by our resolver (so --nameserver applies
    and answers are cached); one per Lookups, made once."""
    def lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list:
        resolver = lookups.resolver()
        try:
            answer = resolver.resolve(name, qtype, lifetime=timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as trouble:
            raise spf.TempError(f"DNS {trouble}") from None
        found = []
        for record in answer:
            if qtype in ("A", "AAAA"):
                found.append(((name, qtype), record.address))
            elif qtype == "MX":
                found.append(((name, qtype), (record.preference, record.exchange)))
            elif qtype == "PTR":
                found.append(((name, qtype), record.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                found.append(((name, qtype), record.strings))
        return found
    return lookup


def evaluate(lookups: Any, ip: str, sender: str, helo: str, receiver: str) -> tuple[str, str, str]:
    """(result, explanation, Received-SPF header) — blocking: run in a thread."""
    spf.DNSLookup = _lookup_with(lookups)
    query = spf.query(i=ip, s=sender or f"postmaster@{helo}", h=helo or "unknown", receiver=receiver)
    result, _, explanation = query.check()
    # pyspf gives the field's value with the result capitalized; RFC 7208 writes it lowercase.
    _, _, details = query.get_header(result, receiver).partition(" ")
    return result, explanation, f"Received-SPF: {result} {details}"


class SPF(Plugin):
    name = "spf"
    description = "check the sender's SPF record (spfbehavior 0-6) and add Received-SPF"

    def mail(self, session: Session, sender: str) -> Answer | Deferred:
        session.notes.pop(NOTE, None)
        level = behavior(session)
        if level <= 0 or session.may_relay:
            return CONTINUE
        return Deferred.fromCoroutine(self._check(session, sender, level))

    async def _check(self, session: Session, sender: str, level: int) -> Answer:
        lookups = session.context.lookups
        result, explanation, header = await deferToThread(
            evaluate, lookups, session.client.ip, sender, session.helo, session.settings.me)
        session.notes[NOTE] = header
        if result == "temperror" and level >= 2:
            return defer(f"SPF lookup for {sender or session.helo} failed, try again later (#4.4.3)")
        if refused(result, level):
            log.info("spf: {result} for <{sender}> from {ip}", result=result, sender=sender, ip=session.client.ip)
            return reject(f"sorry, SPF {result} for <{sender}> from {session.client.ip}: "
                          f"{explanation} (#5.7.1)")
        return CONTINUE

    def data(self, session: Session, message: bytes) -> Answer:
        header = session.notes.get(NOTE)
        return add_headers(header) if header else CONTINUE
