"""qmail-smtpd's job: the ESMTP server protocol.

The protocol machine reads commands in order and asks policy (policy.py),
plugins (hooks.py) and the login flow (login.py, through the SASL exchanges
of sasl.py) what to answer; a handler may return a Deferred, and then nothing
more is read until it fires, so replies stay in order under PIPELINING
however long a check takes.  Replies produced while handling one read are
written together.  Message data is not handled line by line (``DataReader``):
the terminator is searched in the buffered bytes, and dot-unstuffing, the
bare-LF check and CRLF→LF are each one pass over the whole message in C.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from typing import Callable

from twisted.cred.credentials import ICredentials
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from qtwist import sasl
from qtwist.control import Settings
from qtwist.descriptors import DescriptorBudget
from qtwist.hooks import Answer, Hooks, PluginContext, Session
from qtwist.limits import Admission, smtp_limits
from qtwist.login import Logins, Refusal, client_address
from qtwist.numbers import decimal
from qtwist.pipelining import PipeliningServer, write_now
from qtwist.policy import ClientInfo, bad_mail_from, bad_rcpt_to, channel_for, rcpt_allowed, with_default_host
from qtwist.tls import can_upgrade, cipher_of, is_encrypted
from qtwist.users import IUserStore

log = Logger(namespace="qtwist.smtpd")

MAX_RECIPIENTS = 1000
MAX_HOPS = 100
HARD_DATA_LIMIT = 128 * 1024 * 1024  # when databytes is 0 (unlimited): memory still has an end
TERMINATOR = b"\r\n.\r\n"

REPLY_SIZE = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
REPLY_RCPTHOSTS = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
REPLY_BADMAILFROM = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
REPLY_BADRCPTTO = b"553 sorry, your envelope recipient is in my badrcptto list (#5.7.1)\r\n"
REPLY_USERS_DOWN = b"451 sorry, the user database is unavailable, try again later (#4.3.0)\r\n"
REPLY_BARE_LF = b"451 See http://pobox.com/~djb/docs/smtplf.html.\r\n"
REPLY_LOOPING = b"554 too many hops, this message is looping (#5.4.6)\r\n"
REPLY_QUEUE_ERROR = b"451 qq write error or disk full (#4.3.0)\r\n"
REPLY_AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
REPLY_AUTH_NEEDS_TLS = b"538 auth not available without TLS (#5.3.3)\r\n"
REPLY_AUTH_REFUSED = {
    Refusal.WRONG: b"535 authentication failed (#5.7.1)\r\n",
    Refusal.BLOCKED: b"454 too many failed authentications, try again later (#4.7.0)\r\n",
    Refusal.UNAVAILABLE: b"454 temporary authentication failure, try again later (#4.7.0)\r\n",
}
# What a client names itself goes into the header as qmail's safeput() does it:
# no character that could end a comment or start a new header line.
UNSAFE_IN_RECEIVED = re.compile(r"[^A-Za-z0-9.@%+/=:-]")


def parse_address(argument: str) -> tuple[str, str] | None:
    """qmail-smtpd's addrparse(): the address inside <...> (or the first word),
    quotes removed and a source route (@a,@b:) dropped; plus the text after it
    (ESMTP parameters).  None when there is nothing address-like."""
    argument = argument.strip()
    if argument.startswith("<"):
        routed = argument.startswith("<@")  # as typed: <""@x> is no route
        address, quoted, escaped, end = [], False, False, -1
        for position in range(1, len(argument)):
            char = argument[position]
            if escaped:
                address.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = not quoted
            elif char == ">" and not quoted:
                end = position
                break
            else:
                address.append(char)
        if end < 0:
            return None
        text, rest = "".join(address), argument[end + 1:]
    else:
        text, _, rest = argument.partition(" ")
        routed = text.startswith("@")
        text = text.replace('"', "")
    if routed:
        _, colon, after = text.partition(":")
        text = after if colon else ""
    if any(c in text for c in " \t<>"):
        return None
    return text, rest.strip()


def parse_parameters(text: str) -> dict[str, str]:
    parameters = {}
    for word in text.split():
        key, _, value = word.partition("=")
        parameters[key.upper()] = value
    return parameters


def received_header(helo: str, ip: str, me: str, protocol: str, now: float, cipher: str = "",
                    user: str = "") -> bytes:
    """qmail's Received: line (LF ends, as the queue stores messages), with the
    TLS cipher and the authenticated user as qmail's TLS and AUTH patches add them."""
    stamp = formatdate(now).replace("+0000", "-0000")
    helo = UNSAFE_IN_RECEIVED.sub("?", helo)
    client = f"({user}@{ip})" if user else f"({ip})"
    encrypted = f"({cipher} encrypted) " if cipher else ""
    return (f"Received: from unknown (HELO {helo or 'unknown'}) {client}\n"
            f"  by {me} with {encrypted}{protocol}; {stamp}\n").encode("latin-1", "replace")


def unstuff(raw: bytes) -> bytes:
    """Dot-unstuffing (RFC 5321 §4.5.2) and CRLF→LF, for data known to have no bare LF."""
    if raw.startswith(b"."):
        raw = raw[1:]
    return raw.replace(b"\r\n.", b"\r\n").replace(b"\r\n", b"\n")


def too_many_hops(message: bytes) -> bool:
    """100 or more Received:/Delivered-To: lines in the header: a mail loop."""
    end = message.find(b"\n\n")
    header = (message if end < 0 else message[:end + 1]).lower()
    if header.count(b"received:") + header.count(b"delivered-to:") < MAX_HOPS:
        return False
    lines = header.split(b"\n")
    return sum(1 for line in lines if line.startswith((b"received:", b"delivered-to:"))) >= MAX_HOPS


def without_fields(message: bytes, names: tuple[str, ...]) -> bytes:
    """``message`` (LF ends) without the header fields named ``names`` (lower
    case), continuation lines included; the body is never touched."""
    end = message.find(b"\n\n")
    if end < 0 or not names or message.startswith(b"\n"):
        return message
    wanted = {name.encode("latin-1") for name in names}
    kept, dropping = [], False
    for line in message[:end + 1].split(b"\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.partition(b":")[0].strip().lower() in wanted
        if not dropping:
            kept.append(line)
    return b"".join(line + b"\n" for line in kept) + message[end + 1:]


class BareLF(Exception):
    """A line in the message data ended with LF alone."""


class DataReader:
    """DATA's framing over the bytes as they arrive.

    Like qmail-smtpd, a bare LF is refused as soon as it arrives (an LF-only
    client would never send CRLF.CRLF), and past the size limit only the tail
    that may still hold the terminator is kept, so a client cannot fill the
    server's memory.
    """

    def __init__(self, databytes: int) -> None:
        # A CRLF in front, so a message that is only "." ends at once.
        self.data = bytearray(b"\r\n")
        self.searched = 0
        self.checked = 2  # every LF before this offset follows a CR; always >= 1
        self.overflow = False
        self.limit = 2 * (databytes or HARD_DATA_LIMIT) + 65536  # too big even if it were all CRLFs

    def feed(self, chunk: bytes) -> None:
        self.data += chunk

    def end(self) -> tuple[bytes, bytes] | None:
        """(the message as sent, the bytes after its terminator) once the
        terminator has arrived, else None; raises BareLF."""
        data = self.data
        end = data.find(TERMINATOR, self.searched)
        checked_to = end + len(TERMINATOR) if end >= 0 else len(data)
        if data.count(b"\n", self.checked, checked_to) != data.count(b"\r\n", self.checked - 1, checked_to):
            raise BareLF()
        if end < 0:
            self.checked = len(data)
            if len(data) > self.limit:
                self.overflow = True
                del data[:-4]
                self.checked = len(data)
            self.searched = max(0, len(data) - 4)
            return None
        return bytes(data[2:end + 2]), bytes(data[end + 5:])


class SMTPServer(PipeliningServer):
    """One SMTP session: qmail-smtpd's state machine (the I/O is PipeliningServer's)."""

    def __init__(self, factory: "SMTPFactory"):
        super().__init__(factory.clock)
        self.factory = factory
        self.settings: Settings = factory.settings()
        self.client: ClientInfo | None = None
        self.databytes = 0
        self.helo = ""
        self.protocol_name = "SMTP"
        self.sender: str | None = None
        self.sender_bad = False
        self.recipients: list[str] = []
        self.encrypted = False
        self.auth_user = None
        self.exchange: sasl.Exchange | None = None
        self.notes: dict[str, object] = {}

    # -- connection -----------------------------------------------------------

    def connectionMade(self) -> None:
        ip = client_address(self.transport)
        rule = self.factory.rules().match(ip)
        if not rule.allow:
            log.info("smtpd: {ip} denied by tcp.smtp rule {key!r}", ip=ip, key=rule.key)
            self.transport.abortConnection()
            return
        self.last_activity = self.clock.seconds()
        refused = self.factory.admission.admit(self, ip, smtp_limits(rule.env, self.settings), self.last_activity)
        if refused is not None:
            # One line, no session: a flood of these must cost next to nothing (not even a log line).
            self.transport.write(f"421 {self.settings.me} {refused} (#4.7.0)\r\n".encode("latin-1", "replace"))
            self.transport.loseConnection()
            return
        grant = rule.key != ip and self.factory.has_grant(ip, self.settings)
        self.client = ClientInfo(ip, dict(rule.env), pop_grant=grant)
        self.start(self.settings.timeoutsmtpd)
        self.encrypted = is_encrypted(self.transport)
        self.databytes = self.settings.databytes
        databytes = decimal(rule.env.get("DATABYTES", ""))
        if databytes is not None:
            self.databytes = databytes
        greeting = f"220 {self.settings.smtpgreeting} ESMTP\r\n".encode("latin-1", "replace")
        chain = self._hooks("connect")
        if chain:
            self.out.append(greeting)
            asked = self._ask(chain, "connect", (), lambda answer: None, greeting=True)
            if isinstance(asked, Deferred):
                self._wait_for(asked)
            elif not self.gone:
                self._flush()
        else:
            write_now(self.transport, greeting)

    def line_received(self, line: str):
        if self.exchange is not None:
            return self._auth_step(self.exchange.answer(line))
        return self._command(line)

    def line_too_long(self) -> None:
        self.out.append(b"500 line too long (#5.5.2)\r\n")

    def timed_out(self) -> None:
        self._hang_up(b"451 timeout (#4.4.2)\r\n")

    def active(self) -> None:
        self.factory.admission.active(self)

    def evict(self) -> None:
        self._hang_up(f"421 {self.settings.me} the server is full, closing an idle connection (#4.4.2)\r\n"
                      .encode("latin-1", "replace"))

    def closing(self) -> None:
        # Counted out at once, not when the socket is gone: a client that
        # reconnects straight after its 221 (as smtp-source does) could
        # otherwise meet its own old session and a 421.
        self.factory.admission.release(self)

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        self.factory.admission.release(self)
        if self.factory.budget is not None:
            self.factory.budget.closed()

    def failed(self) -> None:
        self.out.append(b"451 internal error, try again later (#4.3.0)\r\n")

    # -- plugins (qtwist.hooks) ---------------------------------------------------

    def _hooks(self, hook: str) -> list:
        """The enabled plugins answering ``hook``; empty (and free) without plugins."""
        hooks = self.factory.hooks
        return hooks.chain(self.settings, hook) if hooks is not None else []

    def _hook_session(self) -> Session:
        return Session(self.client, self.settings, self.factory.plugin_context, self.encrypted, self.helo,
                       self.sender, list(self.recipients), self.notes)

    def _then(self, accepted: Callable[[], None], hook: str, *arguments: object):
        """``accepted()`` once the plugins for ``hook`` agree (at once without any)."""
        chain = self._hooks(hook)
        if not chain:
            accepted()
            return None
        return self._ask(chain, hook, arguments, lambda answer: accepted())

    def _ask(self, chain: list, hook: str, arguments: tuple, go_on: Callable[[Answer], object],
             greeting: bool = False, session: Session | None = None):
        """Ask the plugins, then either ``go_on`` with their answer (continue or
        accept) or give their reply; "disconnect" also hangs up.  At connect,
        a refusal replaces the greeting (kept in ``out`` until then).  Plugins
        that answer at once keep the session from waiting a reactor turn."""
        answer = self.factory.hooks.ask(chain, hook, session or self._hook_session(), *arguments)
        if isinstance(answer, Deferred):
            return answer.addCallback(self._answered, hook, go_on, greeting)
        return self._answered(answer, hook, go_on, greeting)

    def _answered(self, answer: Answer, hook: str, go_on: Callable[[Answer], object], greeting: bool):
        if self.gone:
            return None
        if answer.kind in ("continue", "accept"):
            return go_on(answer)
        log.info("smtpd: plugin answer to {hook} from {ip}: {reply}", hook=hook, ip=self.client.ip,
                 reply=answer.reply)
        if greeting:
            self.out.clear()
        self.out.append(f"{answer.reply}\r\n".encode("latin-1", "replace"))
        if greeting or answer.kind == "disconnect":
            self._flush()
            self._close()
        return None

    def _command(self, line: str):
        verb, _, argument = line.partition(" ")
        handler = self.COMMANDS.get(verb.upper())
        if handler is None:
            self.out.append(b"502 unimplemented (#5.5.1)\r\n")
            return None
        return handler(self, argument)

    def smtp_helo(self, argument: str):
        return self._greeted(argument.strip(), "SMTP", self._helo_reply)

    def smtp_ehlo(self, argument: str):
        return self._greeted(argument.strip(), "ESMTP", self._ehlo_reply)

    def _greeted(self, name: str, protocol: str, reply: Callable[[], None]):
        def accepted() -> None:
            self.helo, self.protocol_name = name, protocol
            self._reset()
            reply()
        return self._then(accepted, "helo", name)

    def _helo_reply(self) -> None:
        self.out.append(f"250 {self.settings.me}\r\n".encode("latin-1", "replace"))

    def _ehlo_reply(self) -> None:
        lines = [self.settings.me, "PIPELINING", "8BITMIME"]
        if can_upgrade(self.transport, self.factory.tls, self.encrypted):
            lines.append("STARTTLS")
        mechanisms = " ".join(self._mechanisms())
        if mechanisms and self.auth_user is None:
            lines += [f"AUTH {mechanisms}", f"AUTH={mechanisms}"]
        lines.append(f"SIZE {self.databytes}" if self.databytes else "SIZE")
        self.out.append(("".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n")
                        .encode("latin-1", "replace"))

    def smtp_mail(self, argument: str):
        if self.factory.submission and self.client.authenticated is None:
            self.out.append(b"530 Authorization required (#5.7.1)\r\n")
            return
        if argument[:5].upper() != "FROM:":
            self.out.append(b"501 syntax error in parameters (#5.5.4)\r\n")
            return
        parsed = parse_address(argument[5:])
        if parsed is None:
            self.out.append(b"501 bad address syntax (#5.1.7)\r\n")
            return
        address, rest = parsed
        parameters = parse_parameters(rest)
        size = decimal(parameters.get("SIZE", ""))
        if size is not None and self.databytes and size > self.databytes:
            self.out.append(REPLY_SIZE)
            return
        sender = with_default_host(address, self.settings)
        if (self.settings.authsendercheck and self.auth_user is not None
                and sender.lower() != self.auth_user.address.lower()):
            self.out.append(b"553 sorry, that sender address is not yours (#5.7.1)\r\n")
            return
        bad = bad_mail_from(sender, self.settings)

        def accepted() -> None:
            self._reset()
            self.sender, self.sender_bad = sender, bad
            self.out.append(b"250 ok\r\n")
        if bad:  # refused at every RCPT, as qmail does; no plugin need be asked
            accepted()
            return None
        return self._then(accepted, "mail", sender)

    def smtp_rcpt(self, argument: str):
        if self.sender is None:
            self.out.append(b"503 MAIL first (#5.5.1)\r\n")
            return
        if self.sender_bad:
            self.out.append(REPLY_BADMAILFROM)
            return
        if argument[:3].upper() != "TO:":
            self.out.append(b"501 syntax error in parameters (#5.5.4)\r\n")
            return
        parsed = parse_address(argument[3:])
        if parsed is None or not parsed[0]:
            self.out.append(b"501 bad address syntax (#5.1.3)\r\n")
            return
        address = parsed[0]
        if self.client.relayclient:
            address += self.client.env["RELAYCLIENT"]
        if not rcpt_allowed(address, self.client, self.settings):
            self.out.append(REPLY_RCPTHOSTS)
            return
        if bad_rcpt_to(address, self.settings):
            self.out.append(REPLY_BADRCPTTO)
            return
        if len(self.recipients) >= MAX_RECIPIENTS:
            self.out.append(b"452 too many recipients (#4.5.3)\r\n")
            return
        address = with_default_host(address, self.settings)
        if self.factory.users_down() and channel_for(address, self.settings) == "local":
            # Whether the mailbox exists cannot be known: neither a 550 nor a 250 that may bounce.
            self.out.append(REPLY_USERS_DOWN)
            return

        def accepted() -> None:
            self.recipients.append(address)
            self.out.append(b"250 ok\r\n")
        return self._then(accepted, "rcpt", address)

    def smtp_data(self, argument: str):
        if self.sender is None:
            self.out.append(b"503 MAIL first (#5.5.1)\r\n")
            return
        if not self.recipients:
            self.out.append(b"503 RCPT first (#5.5.1)\r\n")
            return
        self.out.append(b"354 go ahead\r\n")
        self.bulk = DataReader(self.databytes)
        self.bulk.feed(self._take_buffer())

    def smtp_rset(self, argument: str):
        self._reset()
        self.out.append(b"250 flushed\r\n")

    def smtp_noop(self, argument: str):
        self.out.append(b"250 ok\r\n")

    def smtp_vrfy(self, argument: str):
        self.out.append(b"252 send some mail, i'll try my best\r\n")

    def smtp_help(self, argument: str):
        self.out.append(b"214 qtwist: a qmail-compatible server; commands: HELO EHLO MAIL RCPT DATA "
                        b"RSET NOOP VRFY HELP QUIT\r\n")

    def smtp_quit(self, argument: str):
        self.out.append(f"221 {self.settings.me}\r\n".encode("latin-1", "replace"))
        self._flush()
        self._close()

    # -- STARTTLS (RFC 3207) --------------------------------------------------------

    def smtp_starttls(self, argument: str):
        if not can_upgrade(self.transport, self.factory.tls, self.encrypted):
            self.out.append(b"454 TLS not available (#4.3.0)\r\n")
            return
        if argument.strip():
            self.out.append(b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n")
            return
        self.out.append(b"220 ready for tls\r\n")
        self._flush()
        # Whatever the client pipelined after STARTTLS came in the clear: never act on it.
        self._take_buffer()
        self.transport.startTLS(self.factory.tls)
        self.encrypted = True
        # RFC 3207 §4.2: forget all the client said in the clear (its EHLO, a
        # mail transaction, an AUTH a man in the middle could have made).
        self.helo, self.protocol_name = "", "ESMTP"
        self.auth_user = None
        self.client.authenticated, self.client.auth_relay = None, False
        self._reset()

    # -- AUTH (RFC 4954) ------------------------------------------------------------

    def _plaintext_allowed(self) -> bool:
        """LOGIN and PLAIN send the password itself: on submission, and where
        control/authrequirestls says so, only inside TLS."""
        return self.encrypted or not (self.factory.submission or self.settings.authrequirestls)

    def _mechanisms(self) -> list[str]:
        if self.factory.logins is None:
            return []
        # CRAM-MD5 sends no password, so TLS is not needed for it; it works for
        # the users whose store keeps the clear-text password.
        if self._plaintext_allowed():
            return list(sasl.MECHANISMS)
        return [m for m in sasl.MECHANISMS if m not in sasl.PLAINTEXT_MECHANISMS]

    def smtp_auth(self, argument: str):
        mechanism, _, initial = argument.strip().partition(" ")
        mechanism = mechanism.upper()
        if self.factory.logins is None:
            self.out.append(b"502 unimplemented (#5.5.1)\r\n")
        elif self.auth_user is not None:
            self.out.append(b"503 you're already authenticated (#5.5.0)\r\n")
        elif self.sender is not None:
            self.out.append(b"503 no auth during mail transaction (#5.5.0)\r\n")
        elif not mechanism:
            self.out.append(b"501 auth type required (#5.5.4)\r\n")
        elif mechanism in sasl.PLAINTEXT_MECHANISMS and not self._plaintext_allowed():
            self.out.append(REPLY_AUTH_NEEDS_TLS)
        elif mechanism not in self._mechanisms():
            self.out.append(b"504 auth type unimplemented (#5.5.1)\r\n")
        elif self.factory.logins.blocked(self.client.ip):
            self.out.append(REPLY_AUTH_REFUSED[Refusal.BLOCKED])
        else:
            self.exchange = sasl.exchange(mechanism, self.settings.me, self.clock.seconds())
            return self._auth_step(self.exchange.start(initial.strip() or None))
        return None

    def _auth_step(self, step: sasl.Step):
        """A challenge keeps the exchange going; anything else ends it."""
        if isinstance(step, sasl.Challenge):
            self.out.append(step.line)
            return None
        exchange, self.exchange = self.exchange, None
        if isinstance(step, sasl.Ended):
            self.out.append(step.reply)
            return None
        return Deferred.fromCoroutine(self._authenticate(step, exchange.name))

    async def _authenticate(self, credentials: ICredentials, mechanism: str) -> None:
        result = await self.factory.logins.login(credentials, self.client.ip, f"AUTH {mechanism}")
        if self.gone:
            return
        if result.user is None:
            self.out.append(REPLY_AUTH_REFUSED[result.refusal])
        else:
            self.auth_user = result.user
            self.client.authenticated = result.user.address
            self.client.auth_relay = result.user.may_relay
            self.out.append(REPLY_AUTH_OK)
        self._flush()

    COMMANDS: dict[str, Callable] = {
        "HELO": smtp_helo, "EHLO": smtp_ehlo, "MAIL": smtp_mail, "RCPT": smtp_rcpt,
        "DATA": smtp_data, "RSET": smtp_rset, "NOOP": smtp_noop, "VRFY": smtp_vrfy,
        "HELP": smtp_help, "QUIT": smtp_quit, "STARTTLS": smtp_starttls, "AUTH": smtp_auth,
    }

    def _reset(self) -> None:
        self.sender, self.sender_bad, self.recipients = None, False, []

    # -- message data -----------------------------------------------------------------

    def bulk_ended(self) -> bool:
        """Finish the message if its terminator has arrived; False while waiting."""
        reader = self.bulk
        try:
            ended = reader.end()
        except BareLF:
            self._bare_lf()
            return False
        if ended is None:
            return False
        raw, after = ended
        self.bulk = None
        self._unread(after)
        result = self._message(raw, reader.overflow)
        if isinstance(result, Deferred):
            self._wait_for(result)
        return True

    def _bare_lf(self) -> None:
        self._reset()
        self.bulk = None
        self.out.append(REPLY_BARE_LF)
        self._flush()
        self._close()

    def _message(self, raw: bytes, overflow: bool):
        sender, recipients = self.sender, self.recipients
        self._reset()
        if overflow:
            self.out.append(REPLY_SIZE)
            return None
        message = unstuff(raw)
        if self.databytes and len(message) > self.databytes:
            self.out.append(REPLY_SIZE)
            return None
        if too_many_hops(message):
            self.out.append(REPLY_LOOPING)
            return None
        chain = self._hooks("data")
        if chain:
            # The data hook sees the transaction as it was; headers it adds go on top.
            session = self._hook_session()
            session.sender, session.recipients = sender, list(recipients)
            return self._ask(chain, "data", (message,),
                             lambda answer: self._queue(sender, recipients, message, answer),
                             session=session)
        return self._queue(sender, recipients, message)

    def _queue(self, sender: str, recipients: list, message: bytes, edits: Answer | None = None) -> Deferred:
        added = b""
        if edits is not None:
            message, added = without_fields(message, edits.removed), edits.header_block
        now = self.clock.seconds()
        protocol = self.protocol_name + ("S" if self.encrypted else "") + ("A" if self.auth_user else "")
        user = self.auth_user.address if self.auth_user is not None else ""
        message = added + received_header(self.helo, self.client.ip, self.settings.me, protocol, now,
                                          cipher_of(self.transport) if self.encrypted else "", user) + message
        accepted = self.factory.queue.accept(sender, recipients, message)
        accepted.addCallbacks(self._queued, self._queue_failed)
        return accepted

    def _queued(self, queued) -> None:
        self.out.append(f"250 ok {int(queued.born)} qp {queued.id}\r\n".encode())
        self._flush()
        self.factory.queued(queued)
        chain = self._hooks("queued")
        if chain:
            self.factory.hooks.ask(chain, "queued", self._hook_session(), queued)

    def _queue_failed(self, failure) -> None:
        log.error("smtpd: could not queue a message from {ip}: {why}", ip=self.client.ip,
                  why=failure.getErrorMessage())
        self.out.append(REPLY_QUEUE_ERROR)
        self._flush()


class SMTPFactory(Factory):
    """Builds sessions; holds what every session consults."""

    protocol = SMTPServer

    def __init__(self, *, settings: Callable[[], Settings], rules, queue, queued: Callable,
                 clock, grants=None, submission: bool = False, tls=None, logins: Logins | None = None,
                 hooks: Hooks | None = None, plugin_context: PluginContext | None = None,
                 admission: Admission | None = None, budget: DescriptorBudget | None = None,
                 users: IUserStore | None = None):
        """``admission`` counts the sessions against the connection limits; the
        SMTP listeners (smtp, submission, smtps) share one.  ``budget`` counts
        every connection against the process's descriptors.  ``users`` is asked
        whether the user store is down (RCPT to a local address then waits)."""
        self.users = users
        self.admission = admission if admission is not None else Admission()
        self.budget = budget
        self.hooks = hooks
        self.plugin_context = plugin_context
        self.submission = submission
        self.tls = tls
        self.logins = logins
        self.settings = settings
        self.rules = rules
        self.queue = queue
        self.queued = queued
        self.clock = clock
        self.grants = grants

    def users_down(self) -> bool:
        return self.users is not None and self.users.unavailable

    def has_grant(self, ip: str, settings: Settings) -> bool:
        return self.grants is not None and self.grants.is_live(ip, settings.relaygrantlifetime)

    def buildProtocol(self, addr) -> SMTPServer | None:
        if self.budget is not None and not self.budget.opened():
            return None
        return SMTPServer(self)
