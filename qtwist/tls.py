"""control/servercert.pem → the server side of TLS (STARTTLS, STLS, SMTPS, POP3S).

One PEM file holds the private key and the certificate chain, as qmail's TLS
patch reads it.  The OpenSSL context is built once per version of the file
(its stat signature) and shared by every connection; a renewed certificate is
picked up by the next handshake without a restart.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Callable

from OpenSSL import SSL
from twisted.internet.interfaces import (IHandshakeListener, IOpenSSLServerConnectionCreator, ISSLTransport,
                                         ITLSTransport)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, TimeoutMixin, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import directlyProvides, implementer, providedBy

from qtwist.fsutil import StatCache, replace_file

log = Logger(namespace="qtwist.tls")

# TLS 1.2 ciphers with forward secrecy and AEAD only; TLS 1.3 keeps OpenSSL's defaults.
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
# How long an implicit-TLS client (SMTPS, POP3S) may take to finish its
# handshake: a few round trips, not the minutes a command may take.
HANDSHAKE_TIMEOUT = 60


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """An OpenSSL context factory over whatever servercert.pem holds now.

    ``path`` is asked for on every use (None = no certificate configured), so
    the file may appear, change or go away while the server runs.
    """

    def __init__(self, path: Callable[[], Path | None]):
        self._path = path
        self._contexts: StatCache[SSL.Context | None] = StatCache(self._load)

    def available(self) -> bool:
        """Whether TLS can be offered right now (STARTTLS/STLS are advertised only then)."""
        return self._current() is not None

    def getContext(self) -> SSL.Context:
        context = self._current()
        if context is None:
            raise SSL.Error("no usable control/servercert.pem")
        return context

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        """Asked for each handshake, so a certificate added later is used at once."""
        return SSL.Connection(self.getContext(), None)

    def _current(self) -> SSL.Context | None:
        path = self._path()
        if path is None:
            return None
        try:
            return self._contexts.get(path)
        except OSError:  # control/ not searchable: no TLS, as with no certificate
            return None

    @staticmethod
    def _load(path: Path) -> SSL.Context | None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.set_cipher_list(CIPHERS)
        try:
            context.use_certificate_chain_file(str(path))
            context.use_privatekey_file(str(path))
            context.check_privatekey()
        except SSL.Error as error:
            log.error("tls: control/servercert.pem cannot be used ({why}); TLS is off until it is fixed",
                      why=_reason(error))
            return None
        log.info("tls: loaded control/servercert.pem")
        return context


def _reason(error: SSL.Error) -> str:
    details = error.args[0] if error.args else []
    if isinstance(details, list) and details:
        return "; ".join(str(item[-1]) for item in details if item)
    return str(error) or "unreadable"


def tls_ready(options: object | None) -> bool:
    """Whether a context factory can do a handshake now: a ServerTLS has none
    while servercert.pem is missing or broken."""
    return options is not None and (not isinstance(options, ServerTLS) or options.available())


# -- STARTTLS (SMTP, RFC 3207) and STLS (POP3, RFC 2595) alike ---------------------------------

def is_encrypted(transport: object) -> bool:
    """True for implicit TLS (smtps, pop3s); a session that upgrades later
    keeps its own flag, since a wrapper around the transport may not show it."""
    return ISSLTransport.providedBy(transport)


def can_upgrade(transport: object, options: object | None, encrypted: bool) -> bool:
    """Whether STARTTLS/STLS may be offered: a plain connection that can start
    TLS, and a usable certificate."""
    return not encrypted and ITLSTransport.providedBy(transport) and tls_ready(options)


def cipher_of(transport: object) -> str:
    """``TLSv1.3:TLS_AES_256_GCM_SHA384`` for the Received: line of an encrypted session."""
    try:
        connection = transport.getHandle()  # type: ignore[attr-defined]
        return f"{connection.get_protocol_version_name()}:{connection.get_cipher_name()}"
    except Exception:  # a transport that cannot say
        return "TLS"


@implementer(IHandshakeListener)
class _AfterHandshake(ProtocolWrapper, TimeoutMixin):
    """Connects the wrapped protocol only once the TLS handshake is done.

    SMTP and POP3 servers speak first.  A greeting written before the
    handshake is buffered by the TLS layer, which then pauses its producer;
    for a server that pauses by no longer reading, that would stop the
    handshake itself.  The protocol is also told it is encrypted
    (ISSLTransport), as startTLS tells a STARTTLS session.
    """

    timeOut = HANDSHAKE_TIMEOUT

    def makeConnection(self, transport) -> None:
        directlyProvides(self, providedBy(transport), ISSLTransport)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.setTimeout(self.timeOut)

    def handshakeCompleted(self) -> None:
        self.setTimeout(None)
        self.wrappedProtocol.makeConnection(self)

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.setTimeout(None)
        if self.wrappedProtocol.transport is None:  # the handshake never finished
            self.factory.unregisterProtocol(self)
            # The session never started, but it was built: it must know it is over
            # (it counts against the descriptors from the moment it was built).
            self.wrappedProtocol.connectionLost(reason)
            return
        super().connectionLost(reason)


class _AfterHandshakeFactory(WrappingFactory):
    protocol = _AfterHandshake

    def buildProtocol(self, addr):
        """No wrapper when the session's factory builds no session (over the
        descriptor budget, say): the connection is closed at once."""
        wrapped = self.wrappedFactory.buildProtocol(addr)
        return None if wrapped is None else self.protocol(self, wrapped)


class ImplicitTLSFactory(TLSMemoryBIOFactory):
    """SMTPS/POP3S: TLS from the first byte; without a usable certificate a
    connection is closed at once (one log line, not a traceback per client)."""

    def __init__(self, server_tls: ServerTLS, wrapped, name: str):
        super().__init__(server_tls, False, _AfterHandshakeFactory(wrapped))
        self.server_tls = server_tls
        self.name = name

    def buildProtocol(self, addr):
        if not self.server_tls.available():
            log.warn("{name}: no usable control/servercert.pem; closed the connection from {peer}",
                     name=self.name, peer=getattr(addr, "host", addr))
            return None
        after_handshake = self.wrappedFactory.buildProtocol(addr)
        return None if after_handshake is None else self.protocol(self, after_handshake)


def make_self_signed(path: Path, hostname: str) -> None:
    """A throw-away key and certificate for ``hostname`` in one PEM file
    (for a demo home that asks for it with control/selfsignedcert)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
                   .sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption()) + certificate.public_bytes(serialization.Encoding.PEM)
    replace_file(path, pem, 0o600)
