"""The plugin interface: the questions the SMTP server and the remote channel
ask plugins, and the answers they may give.

A plugin is an object providing :class:`ISMTPPlugin`, found by Twisted's
plugin system in any installed package's ``twisted/plugins/``;
``control/plugins`` names the enabled ones, in order.  Hooks run in that
order and the first answer that is not "continue" wins, as in qpsmtpd and
Haraka.  qmail's own checks (rcpthosts, badmailfrom, badrcptto, databytes)
run first: a plugin may refuse more, never let through what they refuse, so
no plugin can open the relay.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface, implementer

from qtwist.control import Settings
from qtwist.policy import ClientInfo, may_relay
from qtwist.users import IUserStore

log = Logger(namespace="qtwist.hooks")

HOOKS = ("connect", "helo", "mail", "rcpt", "data", "queued", "outbound")


@dataclass(frozen=True)
class Answer:
    """What a hook says: go on, accept (ask no further plugin), refuse for
    good, refuse for now, or hang up; a "continue" may carry header lines to
    prepend to the message (data and outbound hooks)."""

    kind: str = "continue"
    code: int = 0
    text: str = ""
    headers: tuple[str, ...] = ()
    # Header fields (lower-case names) of the message that must go before the
    # added ones go on top: what a sender forged under a scanner's names.
    removed: tuple[str, ...] = ()

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def header_block(self) -> bytes:
        """The added header lines as they go on top of a message (LF ends)."""
        return "".join(f"{header}\n" for header in self.headers).encode("utf-8", "replace")


CONTINUE = Answer()
TROUBLE = Answer("defer", 451, "temporary failure in a plugin, try again later (#4.3.0)")


def accept() -> Answer:
    return Answer("accept")


def add_headers(*headers: str, removing: tuple[str, ...] = ()) -> Answer:
    """Continue, with ``headers`` (each "Name: value", no line end) above the
    message, after the message's own fields named in ``removing`` are dropped."""
    return Answer(headers=headers, removed=tuple(name.lower() for name in removing))


def reject(text: str, code: int = 550) -> Answer:
    if not 500 <= code <= 599:
        raise ValueError(f"a rejection needs a 5xx code, not {code}")
    return Answer("reject", code, text)


def defer(text: str, code: int = 451) -> Answer:
    if not 400 <= code <= 499:
        raise ValueError(f"a deferral needs a 4xx code, not {code}")
    return Answer("defer", code, text)


def disconnect(text: str, code: int = 421) -> Answer:
    return Answer("disconnect", code, text)


@dataclass
class PluginContext:
    """What the server lends every plugin: the home, the users, DNS look-ups
    (honouring --nameserver) and the clock."""

    home: Path
    users: IUserStore
    lookups: Any
    clock: Any


@dataclass
class Session:
    """One SMTP session as hooks see it; ``notes`` is the plugins' scratch space
    for the session (e.g. a DNSBL look-up started at connect, awaited at MAIL)."""

    client: ClientInfo
    settings: Settings
    context: PluginContext
    encrypted: bool = False
    helo: str = ""
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def may_relay(self) -> bool:
        """RELAYCLIENT, a POP grant or AUTH: mail from one of our own users."""
        return may_relay(self.client)


@dataclass(frozen=True)
class Outbound:
    """A message about to leave for a remote domain (the outbound hook)."""

    sender: str
    domain: str
    recipients: tuple[str, ...]
    settings: Settings
    context: PluginContext


class ISMTPPlugin(Interface):
    """A qtwist plugin.  Every hook is optional in practice: subclass
    :class:`Plugin`, which answers CONTINUE to everything, and override what
    you need.  A hook returns an :class:`Answer` or a Deferred firing with
    one; raising, or taking longer than control/plugintimeout seconds (60),
    counts as a temporary failure (451) for that transaction and is logged."""

    name = Attribute("The name control/plugins uses for this plugin.")
    description = Attribute("One line saying what the plugin does.")

    def connect(session: Session) -> Answer | Deferred:
        """A client connected; a refusal replaces the greeting and hangs up."""

    def helo(session: Session, name: str) -> Answer | Deferred:
        """HELO or EHLO ``name``."""

    def mail(session: Session, sender: str) -> Answer | Deferred:
        """MAIL FROM, after qmail's checks passed."""

    def rcpt(session: Session, recipient: str) -> Answer | Deferred:
        """RCPT TO, after rcpthosts and badrcptto passed."""

    def data(session: Session, message: bytes) -> Answer | Deferred:
        """The whole message (LF line ends) before it is queued; may add headers."""

    def queued(session: Session, message: Any) -> Answer | Deferred:
        """The message is in the queue (after the 250); the answer is ignored."""

    def outbound(message: Outbound, body: bytes) -> Answer | Deferred:
        """Before a remote delivery; may add headers (a DKIM signature), defer or refuse."""


@implementer(IPlugin, ISMTPPlugin)
class Plugin:
    """A base for plugins: every hook says CONTINUE until overridden."""

    name = ""
    description = ""

    def connect(self, session: Session) -> Answer | Deferred:
        return CONTINUE

    def helo(self, session: Session, name: str) -> Answer | Deferred:
        return CONTINUE

    def mail(self, session: Session, sender: str) -> Answer | Deferred:
        return CONTINUE

    def rcpt(self, session: Session, recipient: str) -> Answer | Deferred:
        return CONTINUE

    def data(self, session: Session, message: bytes) -> Answer | Deferred:
        return CONTINUE

    def queued(self, session: Session, message: Any) -> Answer | Deferred:
        return CONTINUE

    def outbound(self, message: Outbound, body: bytes) -> Answer | Deferred:
        return CONTINUE


def installed_plugins() -> dict[str, ISMTPPlugin]:
    """Every plugin Twisted's plugin system finds, by name."""
    import twisted.plugins
    found: dict[str, ISMTPPlugin] = {}
    for plugin in getPlugins(ISMTPPlugin, twisted.plugins):
        found.setdefault(plugin.name, plugin)
    return found


def _overrides(plugin: ISMTPPlugin, hook: str) -> bool:
    """Whether ``plugin`` answers ``hook`` itself (skipping the others costs nothing)."""
    method = getattr(type(plugin), hook, None)
    return method is not None and method is not getattr(Plugin, hook)


class Hooks:
    """The enabled plugins, asked in control/plugins order.

    The chains are looked up by the settings snapshot's ``plugins`` on every
    question, so a change of control/plugins applies to the next session
    without a restart; a hook no enabled plugin overrides costs one
    dictionary look-up.
    """

    def __init__(self, available: dict[str, ISMTPPlugin], clock):
        self.available = available
        self.clock = clock
        self._chains: dict[tuple[str, ...], dict[str, list[ISMTPPlugin]]] = {}
        self._missing_reported: set[str] = set()

    def chain(self, settings: Settings, hook: str) -> list[ISMTPPlugin]:
        """The enabled plugins that answer ``hook``, in order."""
        chains = self._chains.get(settings.plugins)
        if chains is None:
            enabled = []
            for name in settings.plugins:
                plugin = self.available.get(name)
                if plugin is None:
                    if name not in self._missing_reported:
                        self._missing_reported.add(name)
                        log.error("control/plugins: no installed plugin is named {name!r} "
                                  "(`qtwist plugins` lists them)", name=name)
                    continue
                enabled.append(plugin)
            chains = {h: [p for p in enabled if _overrides(p, h)] for h in HOOKS}
            self._chains[settings.plugins] = chains
        return chains[hook]

    def ask(self, chain: list[ISMTPPlugin], hook: str, asked: Session | Outbound,
            *arguments: Any) -> Answer | Deferred:
        """Ask each plugin of ``chain`` in turn about ``asked`` (the session, or
        the outbound message); the first answer that is not "continue" wins and
        the headers of "continue" answers add up.  While every plugin answers
        at once, so does this (no Deferred, no reactor turn); from the first
        plugin that returns a Deferred on, the answer is a Deferred."""
        arguments = (asked, *arguments)
        kept: list[Answer] = []
        for position, plugin in enumerate(chain):
            answer = self._call(plugin, hook, arguments)
            if isinstance(answer, Deferred):
                return Deferred.fromCoroutine(self._ask_the_rest(
                    chain[position:], answer, hook, arguments, kept, asked.settings.plugintimeout))
            decided = _decided(answer, kept)
            if decided is not None:
                return decided
        return _combined(kept, CONTINUE)

    async def _ask_the_rest(self, chain: list[ISMTPPlugin], pending: Deferred, hook: str, arguments: tuple,
                            kept: list[Answer], timeout: float) -> Answer:
        """``chain[0]`` answered with ``pending``; wait for it, then ask the others."""
        for position, plugin in enumerate(chain):
            answer = pending if position == 0 else self._call(plugin, hook, arguments)
            if isinstance(answer, Deferred):
                answer = await self._wait(plugin, hook, answer, timeout)
            decided = _decided(answer, kept)
            if decided is not None:
                return decided
        return _combined(kept, CONTINUE)

    def _call(self, plugin: ISMTPPlugin, hook: str, arguments: tuple) -> Answer | Deferred:
        try:
            answer = getattr(plugin, hook)(*arguments)
        except Exception:
            log.failure("plugin {name}: the {hook} hook failed; answering 451", name=plugin.name, hook=hook)
            return TROUBLE
        return answer if isinstance(answer, Deferred) else _checked(plugin, hook, answer)

    async def _wait(self, plugin: ISMTPPlugin, hook: str, pending: Deferred, timeout: float) -> Answer:
        pending.addTimeout(timeout, self.clock)
        try:
            answer = await pending
        except Exception:
            log.failure("plugin {name}: the {hook} hook failed or timed out; answering 451",
                        name=plugin.name, hook=hook)
            return TROUBLE
        return _checked(plugin, hook, answer)


def _checked(plugin: ISMTPPlugin, hook: str, answer: object) -> Answer:
    if isinstance(answer, Answer):
        return answer
    log.error("plugin {name}: the {hook} hook answered {answer!r}, not an Answer; answering 451",
              name=plugin.name, hook=hook, answer=answer)
    return TROUBLE


def _decided(answer: Answer, kept: list[Answer]) -> Answer | None:
    """The final answer, or None to ask the next plugin (keeping its header edits)."""
    if answer.kind == "continue":
        kept.append(answer)
        return None
    if answer.kind == "accept":
        return _combined(kept, answer)
    return answer


def _combined(kept: list[Answer], final: Answer) -> Answer:
    """``final`` with the header edits of the "continue" answers before it, in order."""
    if not kept:
        return final
    return replace(final, headers=tuple(header for answer in kept for header in answer.headers),
                   removed=tuple(name for answer in kept for name in answer.removed))
