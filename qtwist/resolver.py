"""DNS look-ups for the whole process: MX and A for remote delivery, TXT and
A for plugins (SPF, DNSBL).  They honour --nameserver, run in the reactor's
thread pool, never on the reactor thread, and share one cache that keeps
answers (negative ones too) for their TTL, as dnscache does for qmail."""

from __future__ import annotations

from typing import Any

import dns.exception
import dns.resolver
from twisted.internet import threads
from twisted.internet.defer import Deferred

DNS_LIFETIME = 30.0
CACHE_ENTRIES = 100_000


class Lookups:
    def __init__(self, reactor: Any, nameserver: tuple[str, int] | None, lifetime: float = DNS_LIFETIME):
        self.reactor = reactor
        self.nameserver = nameserver
        self.lifetime = lifetime
        self.cache = dns.resolver.LRUCache(CACHE_ENTRIES)

    def resolver(self) -> dns.resolver.Resolver:
        """A fresh resolver per look-up, so /etc/resolv.conf edits take effect."""
        if self.nameserver is None:
            resolver = dns.resolver.Resolver()
        else:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [self.nameserver[0]]
            resolver.port = self.nameserver[1]
        resolver.lifetime = self.lifetime
        resolver.cache = self.cache
        return resolver

    def in_thread(self, function, *arguments) -> Deferred:
        """Run blocking DNS work (``function(resolver, *arguments)``) in the pool."""
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         lambda: function(self.resolver(), *arguments))

    def records(self, name: str, rdtype: str) -> Deferred:
        """The records' texts; [] when the name or the type does not exist.
        Other trouble (timeouts, SERVFAIL) fails the Deferred with dns.exception.DNSException."""
        return self.in_thread(_records, name, rdtype)


def _records(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> list[str]:
    try:
        answer = resolver.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    if rdtype == "TXT":
        return [b"".join(record.strings).decode("utf-8", "replace") for record in answer]
    return [record.to_text() for record in answer]
