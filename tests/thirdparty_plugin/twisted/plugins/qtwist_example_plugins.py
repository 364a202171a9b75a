"""Two plugins from outside qtwist: one refuses mail to a spam trap, one is broken."""

from qtwist.hooks import CONTINUE, Plugin, add_headers, reject


class SpamTrap(Plugin):
    name = "spamtrap"
    description = "refuse mail to trap@ addresses and mark the rest"

    def rcpt(self, session, recipient):
        if recipient.startswith("trap@"):
            return reject("5.7.1 that address is a spam trap", 550)
        return CONTINUE

    def data(self, session, message):
        return add_headers(f"X-Spamtrap: checked for {session.client.ip}")


class Broken(Plugin):
    name = "broken"
    description = "raises for crash@ and never answers for hang@"

    def rcpt(self, session, recipient):
        if recipient.startswith("crash@"):
            raise RuntimeError("this plugin is broken on purpose")
        if recipient.startswith("hang@"):
            from twisted.internet.defer import Deferred
            return Deferred()
        return CONTINUE


spamtrap = SpamTrap()
broken = Broken()
