"""chkuser: refuse at RCPT what local delivery would bounce.

Unknown local mailboxes get 550 5.1.1 and full ones 552 5.2.2, so the
sender's own server writes the bounce instead of ours (no backscatter).
With control/chkusersender (1), a sender whose domain has neither MX nor A
records is refused at MAIL with 550 5.1.8.  Clients that may relay are
never refused for their sender.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from qtwist.hooks import CONTINUE, Answer, Plugin, Session, defer, reject
from qtwist.local import mailbox_check
from qtwist.policy import channel_for, split_address
from qtwist.users import UserStoreUnavailable

NO_MAILBOX = reject("5.1.1 sorry, no mailbox here by that name (chkuser)", 550)
MAILBOX_FULL = reject("5.2.2 sorry, mailbox full (chkuser)", 552)
STORE_DOWN = defer("4.3.0 sorry, the user database is unavailable, try again later (chkuser)")
NO_SENDER_DOMAIN = reject("5.1.8 sorry, can't find a valid MX for sender domain (chkuser)", 550)


class ChkUser(Plugin):
    name = "chkuser"
    description = "refuse unknown or full local mailboxes at RCPT, and optionally senders without MX/A"

    def mail(self, session: Session, sender: str) -> Answer | Deferred:
        if not session.settings.chkusersender or not sender or session.may_relay:
            return CONTINUE
        return Deferred.fromCoroutine(self._check_sender(session, sender))

    async def _check_sender(self, session: Session, sender: str) -> Answer:
        _, domain = split_address(sender)
        lookups = session.context.lookups
        for rdtype in ("MX", "A", "AAAA"):
            if await lookups.records(domain, rdtype):
                return CONTINUE
        return NO_SENDER_DOMAIN

    def rcpt(self, session: Session, recipient: str) -> Answer | Deferred:
        if channel_for(recipient, session.settings) != "local":
            return CONTINUE
        context = session.context
        checked = context.users.defer(mailbox_check, context.home, session.settings, context.users, recipient)
        checked.addCallback(lambda status: {"unknown": NO_MAILBOX, "full": MAILBOX_FULL}.get(status, CONTINUE))
        return checked.addErrback(_store_down)


def _store_down(failure: Failure) -> Answer:
    """The user database cannot say: try again later, never "no such user"."""
    failure.trap(UserStoreUnavailable)
    return STORE_DOWN
