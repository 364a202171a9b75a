"""qmail control files → one immutable Settings snapshot, reloaded while running.

qmail programs read control/ when they start; qtwist is one long-lived process,
so ControlWatcher rebuilds the snapshot whenever a file's stat changes (or on
SIGHUP) and each SMTP session keeps the snapshot it began with.  A file that
cannot be parsed leaves its last good value in force, so a typo never turns
relay control or a smarthost route back into a default.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import FrameType, MappingProxyType
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from qtwist.fsutil import Signature, StatCache, stat_signature
from qtwist.login import ip_literal
from qtwist.numbers import MOST_DIGITS, decimal
from qtwist.periodic import Periodic
from qtwist.rules import Rules

LISTENER_NAMES = ("smtp", "submission", "smtps", "pop3", "pop3s")


@functools.cache
def default_me() -> str:
    """qmail's config-fast fallback for control/me.  Cached: getfqdn may wait on DNS."""
    return socket.getfqdn().lower()


@dataclass(frozen=True)
class SimRule:
    """One control/simcontrol line, simscan's: ``KEY:clam=yes,spam=yes,spam_hits=12,attach=.exe:.scr``.
    KEY is an address, a domain, or empty for the default; an option a line
    does not set is None (or empty), so the default line or the strictest
    recipient decides it."""

    key: str
    clam: bool | None = None
    spam: bool | None = None
    spam_hits: float | None = None
    attach: tuple[str, ...] = ()

    def __str__(self) -> str:
        options = [f"{name}={'yes' if value else 'no'}" for name, value in (("clam", self.clam), ("spam", self.spam))
                   if value is not None]
        if self.spam_hits is not None:
            options.append(f"spam_hits={self.spam_hits:g}")
        if self.attach:
            options.append("attach=" + ":".join(self.attach))
        return f"{self.key}:{','.join(options)}"


@dataclass(frozen=True)
class Route:
    """One smtproutes entry.  domain '' is the default route and '.x' covers the
    subdomains of x; host '' means "look up the MX as usual"."""

    domain: str
    host: str
    port: int | None

    def __str__(self) -> str:
        return f"{self.domain}:{self.host}" + (f":{self.port}" if self.port is not None else "")


# Settings that qmail defaults to control/me when their own file is absent.
_FOLLOW_ME = ("smtpgreeting", "bouncehost", "doublebouncehost", "envnoathost", "helohost")


@dataclass(frozen=True)
class Settings:
    """The control files in force at one moment.

    Every field has qmail's default, so ``Settings(me="mx.example.test")`` is a
    usable snapshot in tests; the host-name fields left empty follow ``me`` and
    an empty ``locals`` means {me}, as qmail's defaults chain does."""

    me: str = field(default_factory=default_me)
    rcpthosts: frozenset[str] = frozenset()
    locals: frozenset[str] = frozenset()
    virtualdomains: tuple[tuple[str, str], ...] = ()
    smtpgreeting: str = ""
    databytes: int = 0
    badmailfrom: frozenset[str] = frozenset()
    badrcptto: frozenset[str] = frozenset()
    queuelifetime: int = 604800
    bouncefrom: str = "MAILER-DAEMON"
    bouncehost: str = ""
    doublebouncehost: str = ""
    doublebounceto: str = "postmaster"
    envnoathost: str = ""
    percenthack: frozenset[str] = frozenset()
    concurrencylocal: int = 10
    concurrencyremote: int = 20
    queueactivelimit: int = 20000
    timeoutconnect: int = 60
    timeoutremote: int = 1200
    timeoutsmtpd: int = 1200
    timeoutpop3d: int = 600
    concurrencyincoming: int = 500
    concurrencyperip: int = 20
    pop3concurrencyincoming: int = 500
    pop3concurrencyperip: int = 20
    helohost: str = ""
    smtproutes: tuple[Route, ...] = ()
    spfbehavior: int = 0
    relaygrantlifetime: int = 10800
    plugins: tuple[str, ...] = ()
    plugintimeout: int = 60
    rblservers: tuple[str, ...] = ()
    chkusersender: bool = False
    authrequirestls: bool = False
    pop3requiretls: bool = False
    authsendercheck: bool = False
    authfaillimit: int = 10
    authfailwindow: int = 600
    authfailblock: int = 900
    dotqmailprograms: bool = False
    selfsignedcert: bool = False
    servercert: Path | None = None
    listeners: tuple[tuple[str, str], ...] = ()
    userdb: str = "vpasswd"
    spamdserver: str = "127.0.0.1:783"
    clamdserver: str = "127.0.0.1:3310"
    simcontrol: tuple[SimRule, ...] = ()
    spamsizelimit: int = 524288
    spamskiprelay: bool = True
    filterfailopen: bool = False
    local_domains: frozenset[str] = frozenset()
    origins: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        for name in _FOLLOW_ME:
            if not getattr(self, name):
                object.__setattr__(self, name, self.me)
        if not self.locals:
            object.__setattr__(self, "locals", frozenset({self.me}))

    def is_rcpthost(self, domain: str) -> bool:
        """qmail-smtpd's rcpthosts test: an exact entry, or a '.suffix' entry for
        a proper subdomain.  Malformed domains (empty labels) never match."""
        name = _bare_domain(domain)
        if not name or name.startswith(".") or ".." in name:
            return False
        return any(key in self.rcpthosts for key in _lookup_keys(name, with_default=False))

    def local_domain(self, domain: str) -> str | None:
        """The HOME/domains directory that receives mail for ``domain``: the domain
        itself, or the prefix of the virtualdomains entry that covers it (exact,
        then '.suffix', then the '' catch-all; the first entry found decides)."""
        name = _bare_domain(domain)
        if name in self.local_domains:
            return name
        for key in _lookup_keys(name, with_default=True):
            prefix = self._virtualdomain_map.get(key)
            if prefix is not None:
                prefix = prefix.lower()
                return prefix if prefix in self.local_domains else None
        return None

    def route_for(self, domain: str) -> Route | None:
        """qmail-remote's smtproutes look-up: exact domain, '.suffix' entries from
        the longest, then the '' default; None means use MX records."""
        for key in _lookup_keys(_bare_domain(domain), with_default=True):
            route = self._route_map.get(key)
            if route is not None:
                return route
        return None

    def describe(self) -> list[tuple[str, str, bool]]:
        """(control name, value as shown, is it the default) for ``qtwist showctl``.
        Lists show one entry per line."""
        rows = []
        for control_field in fields(self):
            if control_field.name == "origins":
                continue
            names = _SOURCES.get(control_field.name, (control_field.name,))
            value = getattr(self, control_field.name)
            if control_field.name == "local_domains":
                is_default = not value
            else:
                is_default = all(self.origins.get(name, "default") == "default" for name in names)
            rows.append((names[0], _show(control_field.name, value), is_default))
        return rows

    # Last entry wins, as with qmail's constmap; built once per snapshot.
    @functools.cached_property
    def _route_map(self) -> dict[str, Route]:
        return {route.domain: route for route in self.smtproutes}

    @functools.cached_property
    def _virtualdomain_map(self) -> dict[str, str]:
        return dict(self.virtualdomains)


# Fields fed by a file whose name differs from the field, or by several files.
_SOURCES: dict[str, tuple[str, ...]] = {
    "rcpthosts": ("rcpthosts", "morercpthosts"),
    "servercert": ("servercert.pem",),
    "local_domains": ("domains",),
}


def _bare_domain(domain: str) -> str:
    name = domain.lower()
    return name[:-1] if name.endswith(".") else name


def _lookup_keys(name: str, with_default: bool) -> Iterator[str]:
    """``a.b.c``, ``.b.c``, ``.c`` (and ``''``): the keys qmail tries for a domain."""
    yield name
    dot = name.find(".")
    while dot >= 0:
        yield name[dot:]
        dot = name.find(".", dot + 1)
    if with_default and name:
        yield ""


def _show(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name == "databytes" and value == 0:
        return "0 (unlimited)"
    if isinstance(value, (int, str)):
        return str(value)
    if value is None:
        return "(none)"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset):
        entries = sorted(value)
    elif name == "virtualdomains":
        entries = [f"{domain}:{prefix}" for domain, prefix in value]
    elif name == "listeners":
        entries = [f"{listener} {endpoint}" for listener, endpoint in value]
    else:
        entries = [str(entry) for entry in value]
    return "\n".join(entries) if entries else "(none)"


# -- parsing one file ----------------------------------------------------------
# A parser gets "control/NAME" and the file's (line number, text) entries and
# returns the value plus "control/NAME:LINE: problem" messages.  Messages quote
# only what cannot be a secret: smtproutes and listeners lines can hold
# credentials in some setups, so their values are never repeated.

Entries = list[tuple[int, str]]
Parser = Callable[[str, Entries], tuple[Any, list[str]]]


def _first_line(where: str, entries: Entries) -> tuple[str, list[str]]:
    return entries[0][1], []


def _host_name(where: str, entries: Entries) -> tuple[str, list[str]]:
    return entries[0][1].lower(), []


def _number(where: str, entries: Entries) -> tuple[int | None, list[str]]:
    number, text = entries[0]
    value = decimal(text)
    if value is not None:
        return value, []
    if text.isascii() and text.isdigit():
        return None, [f"{where}:{number}: number too big (at most {MOST_DIGITS} digits)"]
    return None, [f"{where}:{number}: not a number: {text[:40]!r}"]


def _userdb(where: str, entries: Entries) -> tuple[str | None, list[str]]:
    """The user store, as shown: "vpasswd" or the database without its password."""
    from qtwist.sqldb import UserDBError, parse_userdb

    try:
        address = parse_userdb("\n".join(text for _, text in entries))
    except UserDBError as error:
        return None, [f"{where}:{entries[0][0]}: {str(error).removeprefix('control/userdb: ')}"]
    return ("vpasswd" if address is None else str(address)), []


def _flag(where: str, entries: Entries) -> tuple[bool | None, list[str]]:
    value, errors = _number(where, entries)
    return (None if value is None else value != 0), errors


def _lowercase_set(where: str, entries: Entries) -> tuple[frozenset[str], list[str]]:
    return frozenset(text.lower() for _, text in entries), []


def _line_tuple(where: str, entries: Entries) -> tuple[tuple[str, ...], list[str]]:
    return tuple(text for _, text in entries), []


def _virtualdomains(where: str, entries: Entries) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    pairs, errors = [], []
    for number, text in entries:
        domain, colon, prefix = text.partition(":")
        if not colon:
            errors.append(f"{where}:{number}: missing ':' between domain and prefix")
        elif not prefix.strip():
            errors.append(f"{where}:{number}: empty prefix")
        else:
            pairs.append((domain.strip().lower(), prefix.strip()))
    return tuple(pairs), errors


def _per_line(parse: Callable[[str], Any]) -> Parser:
    """A parser of one entry a line: a line ``parse`` refuses (ValueError) is
    reported with its number and left out, the others kept in order."""
    def parser(where: str, entries: Entries) -> tuple[tuple[Any, ...], list[str]]:
        values, errors = [], []
        for number, text in entries:
            try:
                values.append(parse(text))
            except ValueError as problem:
                errors.append(f"{where}:{number}: {problem}")
        return tuple(values), errors
    return parser


def _sim_rule(text: str) -> SimRule:
    key, colon, options = text.partition(":")
    if not colon:
        raise ValueError("expected KEY:OPTIONS (an empty KEY for the default line)")
    values: dict[str, Any] = {}
    for option in filter(None, (part.strip() for part in options.split(","))):
        name, _, value = option.partition("=")
        name, value = name.strip().lower(), value.strip()
        if name in ("clam", "spam"):
            if value.lower() not in ("yes", "no"):
                raise ValueError(f"{name}= takes yes or no, not {value[:20]!r}")
            values[name] = value.lower() == "yes"
        elif name == "spam_hits":
            try:
                values[name] = float(value)
            except ValueError:
                raise ValueError(f"spam_hits= takes a score, not {value[:20]!r}") from None
        elif name == "attach":
            values[name] = tuple(ext.strip().lower() for ext in value.split(":") if ext.strip())
        # simscan's other options (trophie, regex, size...) are simscan's own: ignored here.
    return SimRule(key.strip().lower(), **values)


def _route(text: str) -> Route:
    """``domain:relay[:port]``; relay may be a name, an IP or ``[IP]``, or empty."""
    domain, colon, rest = text.partition(":")
    domain = domain.strip().lower()
    if not colon:
        raise ValueError(f"missing ':' after the domain {domain!r}")
    label = repr(domain) if domain else "the default route"
    rest = rest.strip()
    if rest.startswith("["):
        closing = rest.find("]")
        if closing < 0:
            raise ValueError(f"unclosed '[' in the relay for {label}")
        host, after = rest[:closing + 1], rest[closing + 1:]
        if ip_literal(host, bare=False) is None:
            raise ValueError(f"bad IP literal in the relay for {label}")
        if after and not after.startswith(":"):
            raise ValueError(f"unexpected text after the relay for {label}")
        port_text = after[1:]
    else:
        host, _, port_text = rest.partition(":")
    host, port_text = host.strip().lower(), port_text.strip()
    if any(char.isspace() for char in host + port_text):
        raise ValueError(f"unexpected text after the relay for {label} (authenticated routes are not supported)")
    if not port_text:
        return Route(domain, host, None)
    port = decimal(port_text)
    if port is None or not 0 < port < 65536:
        raise ValueError(f"bad port for {label} (expected 1-65535)")
    return Route(domain, host, port)


def _listeners(where: str, entries: Entries) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    listeners, errors = [], []
    for number, text in entries:
        parts = text.split(None, 1)
        name = parts[0].lower()
        if name not in LISTENER_NAMES:
            errors.append(f"{where}:{number}: unknown listener {name!r} (expected one of {', '.join(LISTENER_NAMES)})")
        elif len(parts) < 2:
            errors.append(f"{where}:{number}: missing endpoint after {name!r}")
        else:
            listeners.append((name, parts[1].strip()))
    return tuple(listeners), errors


class Control(NamedTuple):
    """One control file: where its value goes, how it is read, and what it is for."""

    name: str  # the file under control/
    field: str  # the Settings field it feeds
    parse: Parser
    about: str  # one line, shown by ``qtwist showctl --explain``


# In the order qmail-showctl lists them.
CONTROLS: tuple[Control, ...] = (
    Control("me", "me", _host_name,
            "this host's name; the default of the host names below, the greeting and Received: lines"),
    Control("rcpthosts", "rcpthosts", _lowercase_set,
            "domains anyone may send mail to here (with morercpthosts): a name, or .suffix for subdomains"),
    Control("morercpthosts", "rcpthosts", _lowercase_set,
            "more rcpthosts entries, one a line (qmail's are compiled into a cdb; here they stay text)"),
    Control("locals", "locals", _lowercase_set,
            "domains delivered through HOME/alias/.qmail-NAME files (qmail's ~alias); default: me"),
    Control("virtualdomains", "virtualdomains", _virtualdomains,
            "DOMAIN:PREFIX lines: mail for DOMAIN (or .suffix) goes to the local domain PREFIX"),
    Control("smtpgreeting", "smtpgreeting", _first_line, "the text after 220 in the SMTP greeting; default: me"),
    Control("databytes", "databytes", _number, "the largest message accepted, in bytes; 0: no limit"),
    Control("badmailfrom", "badmailfrom", _lowercase_set,
            "envelope senders refused (553 at RCPT): addresses, or @domain for a whole domain"),
    Control("badrcptto", "badrcptto", _lowercase_set,
            "recipients refused (553): addresses, or @domain for a whole domain"),
    Control("queuelifetime", "queuelifetime", _number,
            "seconds a message keeps being retried; the try after that is the last, then it bounces"),
    Control("bouncefrom", "bouncefrom", _first_line, "the user name bounces come from"),
    Control("bouncehost", "bouncehost", _first_line, "the host name bounces come from; default: me"),
    Control("doublebouncehost", "doublebouncehost", _first_line,
            "the host of the address double bounces go to; default: me"),
    Control("doublebounceto", "doublebounceto", _first_line,
            "the user double bounces (bounces that bounced) go to"),
    Control("envnoathost", "envnoathost", _first_line,
            "the domain an address without '@' belongs to; default: me"),
    Control("percenthack", "percenthack", _lowercase_set,
            "domains whose user%host recipients qmail rewrites; read, but not applied by qtwist"),
    Control("concurrencylocal", "concurrencylocal", _number, "local deliveries at once"),
    Control("concurrencyremote", "concurrencyremote", _number, "remote deliveries (SMTP connections out) at once"),
    Control("queueactivelimit", "queueactivelimit", _number,
            "queued messages held in memory, those due soonest; the rest wait on disk in the queue's index"),
    Control("timeoutconnect", "timeoutconnect", _number,
            "seconds to wait for a remote SMTP server to accept a connection"),
    Control("timeoutremote", "timeoutremote", _number, "seconds to wait for each reply of a remote SMTP server"),
    Control("timeoutsmtpd", "timeoutsmtpd", _number,
            "seconds an SMTP client may go without a whole command or message line before 451 and goodbye"),
    Control("timeoutpop3d", "timeoutpop3d", _number,
            "seconds a POP3 client may go without a whole command before -ERR and goodbye"),
    Control("concurrencyincoming", "concurrencyincoming", _number,
            "SMTP connections at once over smtp, submission and smtps; 0: no limit"),
    Control("concurrencyperip", "concurrencyperip", _number,
            "SMTP connections at once from one address (IPv6: a /64); tcp.smtp MAXCONNIP wins; 0: none"),
    Control("pop3concurrencyincoming", "pop3concurrencyincoming", _number,
            "POP3 connections at once over pop3 and pop3s; 0: no limit"),
    Control("pop3concurrencyperip", "pop3concurrencyperip", _number,
            "POP3 connections at once from one address (IPv6: a /64); 0: no limit"),
    Control("helohost", "helohost", _first_line, "the name given in EHLO/HELO to remote servers; default: me"),
    Control("smtproutes", "smtproutes", _per_line(_route),
            "DOMAIN:RELAY[:PORT] lines: where mail for DOMAIN goes instead of its MX; ':RELAY' for all"),
    Control("spfbehavior", "spfbehavior", _number,
            "the spf plugin's strictness, 0 (off) to 6, as the qmail SPF patch reads it"),
    Control("relaygrantlifetime", "relaygrantlifetime", _number,
            "seconds a POP3 login lets its client address relay (POP-before-SMTP)"),
    Control("plugins", "plugins", _line_tuple, "the enabled plugins, one name a line, asked in this order"),
    Control("plugintimeout", "plugintimeout", _number, "seconds a plugin may take before the client gets 451"),
    Control("rblservers", "rblservers", _line_tuple,
            "the DNS blocklists the rbl plugin asks; a zone starting with '-' refuses for good (553)"),
    Control("chkusersender", "chkusersender", _flag,
            "1: the chkuser plugin also refuses senders whose domain has neither MX nor A records"),
    Control("authrequirestls", "authrequirestls", _flag,
            "1: AUTH LOGIN and PLAIN on the SMTP port only after STARTTLS (submission always wants it)"),
    Control("pop3requiretls", "pop3requiretls", _flag,
            "1: POP3 USER/PASS only after STLS (APOP sends no password)"),
    Control("authsendercheck", "authsendercheck", _flag,
            "1: an authenticated client may only send as its own address"),
    Control("authfaillimit", "authfaillimit", _number,
            "failed logins (SMTP AUTH and POP3 alike) that block a client address; 0: never block"),
    Control("authfailwindow", "authfailwindow", _number, "seconds over which authfaillimit failures are counted"),
    Control("authfailblock", "authfailblock", _number, "seconds a blocked client address is refused logins"),
    Control("dotqmailprograms", "dotqmailprograms", _flag, "1: dot-qmail files may run |program lines"),
    Control("selfsignedcert", "selfsignedcert", _flag,
            "1: make a self-signed servercert.pem at start when there is none (for a demo)"),
    Control("listeners", "listeners", _listeners,
            "NAME ENDPOINT lines (smtp tcp:25): the listeners when the command line names none"),
    Control("spamdserver", "spamdserver", _first_line,
            "where the spamassassin plugin finds spamd: HOST:PORT or a unix socket's path"),
    Control("clamdserver", "clamdserver", _first_line,
            "where the clamav plugin finds clamd: HOST:PORT or a unix socket's path"),
    Control("simcontrol", "simcontrol", _per_line(_sim_rule),
            "simscan's KEY:clam=yes,spam=yes,spam_hits=N,attach=.exe:.scr lines; KEY an address, domain or ''"),
    Control("spamsizelimit", "spamsizelimit", _number,
            "messages larger than this (bytes) skip the spam check, as spamc's limit"),
    Control("spamskiprelay", "spamskiprelay", _flag,
            "1: authenticated and RELAYCLIENT senders skip the spam check (never the virus scan)"),
    Control("filterfailopen", "filterfailopen", _flag,
            "1: accept, with a header saying so, when spamd or clamd fails (default 451)"),
    Control("userdb", "userdb", _userdb,
            "where users live: vpasswd (files), a mysql:// or postgresql:// URL, or a vpopmail.mysql line"),
)

# What feeds the Settings fields that do not come from one CONTROLS file.
OTHER_SOURCES = {
    "servercert.pem": "the private key and certificate chain for STARTTLS, STLS, SMTPS and POP3S",
    "domains": "every folder of HOME/domains is a local virtual domain (vadddomain makes them)",
}


def about(name: str) -> str:
    """The line that says what the setting ``name`` (as showctl names it) is for."""
    for control in CONTROLS:
        if control.name == name:
            return control.about
    return OTHER_SOURCES[name]


def _entries(text: str) -> Entries:
    """Non-blank, non-comment lines with their numbers, whitespace stripped."""
    entries = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            entries.append((number, line))
    return entries


# -- reading with a stat cache ---------------------------------------------------

_texts: StatCache[str] = StatCache(lambda path: path.read_bytes().decode("utf-8", "replace"))


def load(home: Path, previous: Settings | None = None, *, reread: bool = False) -> tuple[Settings, list[str]]:
    """Settings from HOME/control and HOME/domains, plus error messages.

    A file with no entries counts as absent.  A file that cannot be read or
    parsed keeps the value ``previous`` had from it (the default if it had none
    from a file).  ``reread`` ignores the stat cache, for SIGHUP.  Blocking disk
    work: the watcher calls it on the reactor thread, which the few small files
    make acceptable."""
    home = Path(home)
    control = home / "control"
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    failed: set[str] = set()
    errors: list[str] = []
    for name, field_name, parse, _ in CONTROLS:
        where = f"control/{name}"
        origins[name] = "default"
        try:
            text = _texts.get(control / name, reread)
        except OSError as problem:
            errors.append(f"{where}: cannot read: {problem.strerror or problem}")
            failed.add(field_name)
            continue
        entries = _entries(text) if text is not None else []
        if not entries:
            continue
        value, problems = parse(where, entries)
        if problems:
            errors.extend(problems)
            failed.add(field_name)
            continue
        origins[name] = where
        values[field_name] = values[field_name] | value if field_name in values else value
    for field_name in failed:
        _keep_last_good(field_name, previous, values, origins)
    values["servercert"], origins["servercert.pem"] = _servercert(control)
    values["local_domains"] = _local_domains(home / "domains", previous, errors)
    return Settings(**values, origins=MappingProxyType(origins)), errors


def _keep_last_good(field_name: str, previous: Settings | None, values: dict[str, Any],
                    origins: dict[str, str]) -> None:
    """Put back what ``previous`` had for a field whose file is broken now."""
    names = [control.name for control in CONTROLS if control.field == field_name]
    came_from_file = previous is not None and any(
        previous.origins.get(name, "default") != "default" for name in names)
    if not came_from_file:
        values.pop(field_name, None)
        return
    values[field_name] = getattr(previous, field_name)
    for name in names:
        origins[name] = previous.origins.get(name, "default")


def _servercert(control: Path) -> tuple[Path | None, str]:
    path = control / "servercert.pem"
    try:
        present = path.is_file()
    except OSError:
        present = False
    return (path, "control/servercert.pem") if present else (None, "default")


def _local_domains(domains: Path, previous: Settings | None, errors: list[str]) -> frozenset[str]:
    """Every directory under HOME/domains is a local virtual domain."""
    try:
        with os.scandir(domains) as listing:
            return frozenset(entry.name.lower() for entry in listing
                             if not entry.name.startswith(".") and entry.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return frozenset()
    except OSError as problem:
        errors.append(f"domains: cannot list: {problem.strerror or problem}")
        return previous.local_domains if previous is not None else frozenset()


# -- keeping it current ------------------------------------------------------------

class ControlWatcher(Service):
    """Holds the Settings and tcp.smtp Rules in force and keeps them current.

    Every ``interval`` seconds it stats the control files, tcp.smtp and the
    domains directory (nothing is read unless a stat changed); SIGHUP forces a
    full re-read.  Subscribers are called with the new Settings after every
    reload that touched control/ or domains/, even when the values are equal,
    because a renewed servercert.pem keeps its path."""

    log = Logger()

    def __init__(self, home: Path, clock: IReactorTime | None = None, interval: float = 1.0) -> None:
        self.home = Path(home)
        self.interval = interval
        self._clock = clock
        self._subscribers: list[Callable[[Settings], object]] = []
        self._poller: Periodic | None = None
        self._previous_sighup: Any = None
        self._sighup_installed = False
        self._stamps = self._stat_all()
        self._errors: frozenset[str] = frozenset()
        self.settings, errors = load(self.home)
        self._report(errors, everything=True)
        self.rules = self._load_rules(Rules.allow_all())

    def subscribe(self, callback: Callable[[Settings], object]) -> None:
        self._subscribers.append(callback)

    def startService(self) -> None:
        super().startService()
        self._poller = Periodic("control: looking for changed control files", self.poll, self.interval,
                                self._time())
        self._poller.startService()
        if self._owns_signals():
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
            self._sighup_installed = True

    def stopService(self) -> None:
        if self._poller is not None:
            self._poller.stopService()
        self._poller = None
        if self._sighup_installed:
            if signal.getsignal(signal.SIGHUP) == self._on_sighup:
                previous = self._previous_sighup
                signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
            self._sighup_installed = False
        return super().stopService()

    def reload(self) -> bool:
        """Re-read everything, ignoring the stat cache; True if settings or rules changed."""
        self._stamps = self._stat_all()
        return self._refresh(control=True, tcp=True, forced=True)

    def poll(self) -> None:
        """Reload what changed since the last look (every ``interval`` seconds)."""
        stamps = self._stat_all()
        if stamps == self._stamps:
            return
        changed = {path for path, stamp in stamps.items() if self._stamps.get(path) != stamp}
        self._stamps = stamps
        tcp = self.home / "tcp.smtp"
        self._refresh(control=bool(changed - {tcp}), tcp=tcp in changed, forced=False)

    def _refresh(self, control: bool, tcp: bool, forced: bool) -> bool:
        changed = False
        if control:
            old = self.settings
            self.settings, errors = load(self.home, old, reread=forced)
            self._report(errors, everything=forced)
            before = {name: (shown, default) for name, shown, default in old.describe()}
            for name, shown, default in self.settings.describe():
                if before.get(name) != (shown, default):
                    where = "domains" if name == "domains" else f"control/{name}"
                    self.log.info("control: reloaded {where}", where=where)
            changed = self.settings != old
            for callback in list(self._subscribers):
                try:
                    callback(self.settings)
                except Exception:
                    self.log.failure("control: subscriber {callback!r} failed", callback=callback)
        if tcp:
            old_rules = self.rules
            self.rules = self._load_rules(old_rules)
            self.log.info("control: reloaded tcp.smtp")
            changed = changed or self.rules != old_rules
        return changed

    def _report(self, errors: list[str], everything: bool) -> None:
        """Log parse errors; while polling, only the ones not logged already,
        since an unchanged broken file is parsed again whenever another changes."""
        for error in errors:
            if everything or error not in self._errors:
                self.log.error("control: {error}", error=error)
        self._errors = frozenset(errors)

    def _load_rules(self, current: Rules) -> Rules:
        """tcp.smtp, or allow-all when it is absent; an unreadable file keeps ``current``."""
        path = self.home / "tcp.smtp"
        try:
            text = path.read_bytes().decode("utf-8", "replace")
        except (FileNotFoundError, NotADirectoryError):
            return Rules.allow_all()
        except OSError as problem:
            self.log.error("control: tcp.smtp: cannot read: {problem}", problem=problem.strerror or problem)
            return current
        rules, errors = Rules.parse(text, "tcp.smtp")
        for error in errors:
            self.log.error("control: {error}", error=error)
        return rules

    def _stat_all(self) -> dict[Path, Signature | None]:
        control = self.home / "control"
        paths = [control / entry.name for entry in CONTROLS]
        paths += [control / "servercert.pem", self.home / "tcp.smtp", self.home / "domains"]
        return {path: stat_signature(path) for path in paths}

    def _time(self) -> IReactorTime:
        if self._clock is not None:
            return self._clock
        from twisted.internet import reactor
        return reactor  # type: ignore[return-value]

    def _owns_signals(self) -> bool:
        """Signal handlers only make sense for the real reactor in the main thread."""
        if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
            return False
        from twisted.internet import reactor
        return self._clock is None or self._clock is reactor

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        # A signal can land in the middle of reactor code: hand the work over.
        from twisted.internet import reactor
        reactor.callFromThread(self._hangup)  # type: ignore[attr-defined]
        previous = self._previous_sighup
        if callable(previous):
            previous(signum, frame)

    def _hangup(self) -> None:
        self.log.info("control: SIGHUP, re-reading everything")
        self.reload()
