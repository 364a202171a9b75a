"""`twistd qmail`: found by Twisted's plugin system; the real work is in qtwist.service."""

from twisted.application.service import ServiceMaker

qmail = ServiceMaker(
    "qtwist qmail",
    "qtwist.service",
    "qmail-compatible mail server: SMTP, submission, POP3, durable queue, Maildir delivery",
    "qmail",
)
