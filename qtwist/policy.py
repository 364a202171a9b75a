"""Relay, recipient and sender decisions as plain functions of data.

qmail-smtpd's rules: a recipient is accepted when its domain is in
rcpthosts/morercpthosts, or when the client may relay (RELAYCLIENT from
tcp.smtp, a live POP-before-SMTP grant, or an authenticated session).
Everything here is pure, so it is tested without a socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from qtwist.control import Settings


@dataclass
class ClientInfo:
    """What the SMTP session knows of its client when deciding."""

    ip: str
    env: Mapping[str, str] = field(default_factory=dict)
    pop_grant: bool = False
    authenticated: str | None = None
    auth_relay: bool = False  # the authenticated user's vpasswd flags allow relaying

    @property
    def relayclient(self) -> bool:
        return "RELAYCLIENT" in self.env


def may_relay(client: ClientInfo) -> bool:
    """Relay only for RELAYCLIENT, a live POP grant, or an authenticated session."""
    return client.relayclient or client.pop_grant or (client.authenticated is not None and client.auth_relay)


def split_address(address: str) -> tuple[str, str]:
    """(local part, domain) at the last '@'; the domain lowercased, without a trailing dot."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower().rstrip(".")


def rcpt_allowed(address: str, client: ClientInfo, settings: Settings) -> bool:
    """qmail-smtpd's addrallowed(), plus the relay rights.  The domain is what
    follows the last '@', so '%', '!', quoted local parts and source routes
    (already stripped by the parser) never widen what is accepted.  An address
    without '@' (RFC 5321's <postmaster>) is for envnoathost, so it is ours."""
    if may_relay(client) or "@" not in address:
        return True
    _, domain = split_address(address)
    return bool(domain) and settings.is_rcpthost(domain)


def bad_mail_from(sender: str, settings: Settings) -> bool:
    """badmailfrom: an exact address, or an '@domain' entry for the whole domain."""
    if not sender or not settings.badmailfrom:
        return False
    lowered = sender.lower()
    _, domain = split_address(lowered)
    return lowered in settings.badmailfrom or f"@{domain}" in settings.badmailfrom


def bad_rcpt_to(address: str, settings: Settings) -> bool:
    if not settings.badrcptto:
        return False
    lowered = address.lower()
    _, domain = split_address(lowered)
    return lowered in settings.badrcptto or f"@{domain}" in settings.badrcptto


def channel_for(address: str, settings: Settings) -> str:
    """'local' for our own domains (vpopmail domains, virtualdomains, locals), else 'remote'."""
    _, domain = split_address(address)
    if settings.local_domain(domain) is not None or domain in settings.locals:
        return "local"
    return "remote"


def with_default_host(address: str, settings: Settings) -> str:
    """qmail's envnoathost: an address without '@' belongs to that host."""
    return address if "@" in address or not address else f"{address}@{settings.envnoathost}"
