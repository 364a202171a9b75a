"""simscan's job as two plugins at the data hook: ``clamav`` (clamd, and
simscan's attachment check) and ``spamassassin`` (spamd), both steered per
recipient by control/simcontrol.

A simcontrol line applies to a recipient by its address, else its domain,
else the default line (an empty key); with several recipients the strictest
setting wins: scan if any says so, the lowest spam_hits, every listed
extension.  With no line at all, an enabled plugin scans.

A daemon that cannot be reached, takes longer than plugintimeout, or
answers nonsense gives 451, or with control/filterfailopen an accepted
message with a header saying what was skipped.  Every verdict is one log line.
"""

from __future__ import annotations

import email.policy
from dataclasses import dataclass
from email.parser import BytesParser

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from qtwist.control import Settings
from qtwist.hooks import CONTINUE, Answer, Plugin, Session, add_headers, defer, reject
from qtwist.policy import split_address
from qtwist.scanners import ScanError, TooLarge, clamd_scan, spamd_check

log = Logger(namespace="qtwist.plugins.scanning")

SPAM_FIELDS = ("X-Spam-Flag", "X-Spam-Status", "X-Spam-Level")
SKIPPED = "X-Qtwist-Scan"
# SpamAssassin's X-Spam-Level: one star a point, at most 50.
MOST_STARS = 50


@dataclass(frozen=True)
class ScanPolicy:
    """What simcontrol asks for one message."""

    clam: bool = True
    spam: bool = True
    spam_hits: float | None = None
    attach: frozenset[str] = frozenset()


def scan_policy(settings: Settings, recipients: list[str]) -> ScanPolicy:
    """The strictest of the recipients' simcontrol settings."""
    rules = {rule.key: rule for rule in settings.simcontrol}
    default = rules.get("")
    clam = spam = False
    hits: list[float] = []
    attach: set[str] = set()
    for recipient in recipients or [""]:
        _, domain = split_address(recipient)
        found = [rule for rule in (rules.get(recipient.lower()), rules.get(domain.lower()), default) if rule]

        def setting(name: str, unset: object) -> object:
            return next((getattr(rule, name) for rule in found if getattr(rule, name) is not None), unset)
        clam = clam or bool(setting("clam", True))
        spam = spam or bool(setting("spam", True))
        limit = setting("spam_hits", None)
        if limit is not None:
            hits.append(float(limit))  # type: ignore[arg-type]
        attach.update(next((rule.attach for rule in found if rule.attach), ()))
    return ScanPolicy(clam, spam, min(hits) if hits else None, frozenset(attach))


def _timeout(settings: Settings) -> float:
    """A daemon must answer before the hook's own limit, so fail-open can still apply."""
    return max(1.0, settings.plugintimeout - 1)


def _envelope(session: Session) -> str:
    return f"from <{session.sender}> to {', '.join(f'<{r}>' for r in session.recipients)}"


def _daemon_failed(session: Session, scanner: str, error: ScanError) -> Answer:
    settings = session.settings
    log.warn("{scanner}: {error}; {action} ({envelope})", scanner=scanner, error=str(error),
             action="accepted unscanned (filterfailopen)" if settings.filterfailopen else "451",
             envelope=_envelope(session))
    if settings.filterfailopen:
        return add_headers(f"{SKIPPED}: {scanner} check skipped, its daemon failed")
    return defer(f"4.3.0 sorry, the {scanner} check is not available, try again later")


def attachment_names(message: bytes) -> list[str]:
    """The file names of the message's MIME parts; a malformed structure gives
    what could be read, never an exception."""
    try:
        parsed = BytesParser(policy=email.policy.compat32).parsebytes(message)
        names = []
        for part in parsed.walk():
            try:
                name = part.get_filename()
            except Exception:
                continue  # a broken Content-Disposition: no name to judge
            if name:
                names.append(str(name))
        return names
    except Exception:
        return []


class ClamAV(Plugin):
    name = "clamav"
    description = "refuse viruses (clamd INSTREAM) and attachments simcontrol lists (attach=.exe:.scr)"

    def data(self, session: Session, message: bytes) -> Answer | Deferred:
        policy = scan_policy(session.settings, session.recipients)
        if not (policy.clam or policy.attach):
            return CONTINUE
        return Deferred.fromCoroutine(self._scan(session, message, policy))

    async def _scan(self, session: Session, message: bytes, policy: ScanPolicy) -> Answer:
        settings = session.settings
        if policy.attach:
            # Walking a large message's MIME takes a while: not on the reactor's thread.
            reactor = session.context.clock
            for name in await deferToThreadPool(reactor, reactor.getThreadPool(), attachment_names, message):
                if any(name.lower().endswith(extension) for extension in policy.attach):
                    log.info("clamav: attachment {name!r} refused ({envelope})", name=name,
                             envelope=_envelope(session))
                    return reject(f"5.7.1 sorry, attachments named like {name!r} are refused here", 554)
        if not policy.clam:
            return CONTINUE
        try:
            virus = await clamd_scan(session.context.clock, settings.clamdserver, message, _timeout(settings))
        except TooLarge as error:
            # As large as clamd refuses to look at: no retry could change that.
            log.info("clamav: not scanned, {error} ({envelope})", error=str(error), envelope=_envelope(session))
            return add_headers(f"{SKIPPED}: clamav check skipped, the message is over clamd's stream limit")
        except ScanError as error:
            return _daemon_failed(session, "clamav", error)
        if virus is None:
            log.info("clamav: clean ({envelope})", envelope=_envelope(session))
            return CONTINUE
        log.info("clamav: virus {virus} refused ({envelope})", virus=virus, envelope=_envelope(session))
        return reject(f"5.7.1 sorry, the message contains a virus ({virus})", 554)


class SpamAssassin(Plugin):
    name = "spamassassin"
    description = "score with spamd: refuse at simcontrol's spam_hits, else tag with X-Spam-* headers"

    def data(self, session: Session, message: bytes) -> Answer | Deferred:
        settings = session.settings
        policy = scan_policy(settings, session.recipients)
        if not policy.spam or (settings.spamskiprelay and session.may_relay):
            return CONTINUE
        if len(message) > settings.spamsizelimit:
            log.info("spamassassin: not checked, {size} bytes are over spamsizelimit ({envelope})",
                     size=len(message), envelope=_envelope(session))
            return add_headers(f"{SKIPPED}: spam check skipped, the message is over spamsizelimit "
                               f"({settings.spamsizelimit} bytes)", removing=SPAM_FIELDS)
        return Deferred.fromCoroutine(self._check(session, message, policy))

    async def _check(self, session: Session, message: bytes, policy: ScanPolicy) -> Answer:
        settings = session.settings
        try:
            verdict = await spamd_check(session.context.clock, settings.spamdserver, message, _timeout(settings))
        except ScanError as error:
            return _daemon_failed(session, "spamassassin", error)
        refused = policy.spam_hits is not None and verdict.score >= policy.spam_hits
        log.info("spamassassin: score {score:.1f}/{threshold:.1f} tests={tests} {action} ({envelope})",
                 score=verdict.score, threshold=verdict.threshold, tests=",".join(verdict.tests) or "none",
                 action=f"refused (spam_hits {policy.spam_hits:g})" if refused else "tagged",
                 envelope=_envelope(session))
        if refused:
            return reject(f"5.7.1 sorry, the message looks like spam (score {verdict.score:.1f})", 554)
        stars = "*" * min(MOST_STARS, max(0, int(verdict.score)))
        status = (f"{'Yes' if verdict.spam else 'No'}, score={verdict.score:.1f} required={verdict.threshold:.1f} "
                  f"tests={','.join(verdict.tests) or 'none'}")
        headers = [f"X-Spam-Status: {status}", f"X-Spam-Level: {stars}"]
        if verdict.spam:
            headers.insert(0, "X-Spam-Flag: YES")
        return add_headers(*headers, removing=SPAM_FIELDS)
