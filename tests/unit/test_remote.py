"""qmail-remote's job over real loopback sockets: the tests' fake SMTP server (in threads),
a test DNS server (dnspython) in a thread, and RemoteDelivery between them."""

from __future__ import annotations

import re
import ssl
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from qtwist.control import Settings, load
from qtwist.delivery import Outcome
from qtwist.remote import (
    AMBIGUOUS_MX,
    NO_CONNECTION,
    ConnectTimeouts,
    RemoteDelivery,
    opportunistic_tls,
    smtp_address,
    this_host_addresses,
)
from qtwist.resolver import Lookups
from tests.support.dns import ZoneServer
from tests.support.fakesmtp import FakeSMTP, Script


# -- the remote MX: the tests' fake SMTP server, answering like a typical MX ------------

def mx_script(**changes: object) -> Script:
    return Script(**{"greeting": b"220 mx.example.test ESMTP",
                     "extensions": (b"PIPELINING", b"8BITMIME", b"SIZE 10000000"),
                     "final_reply": b"250 ok 1700000000 qp 42", **changes})


# -- the tests ----------------------------------------------------------------------

MESSAGE = b"From: a@example.org\nTo: b@example.test\nSubject: hi\n\nhello\n"


class RemoteDeliveryTests(TestCase):
    def setUp(self) -> None:
        self.servers: list[FakeSMTP] = []

    def start_mx(self, script: Script | None = None, interface: str = "127.0.0.1",
                 port: int = 0) -> tuple[FakeSMTP, int]:
        server = FakeSMTP(script or mx_script(), host=interface, port=port)
        self.addCleanup(server.close)
        self.servers.append(server)
        return server, server.port

    def start_dns(self, zone: dict[str, dict[str, list[str]]],
                  servfail: frozenset[str] = frozenset()) -> tuple[str, int]:
        server = ZoneServer(zone, servfail)
        self.addCleanup(server.stop)
        return server.address

    def remote(self, nameserver: tuple[str, int] | None = None, port: int = 25, **options: object) -> RemoteDelivery:
        options.setdefault("local_addresses", lambda: {"192.0.2.200"})
        return RemoteDelivery(reactor, lookups=Lookups(reactor, nameserver, lifetime=5), remote_port=port,
                              **options)

    def settings(self, smtproutes: str = "", **controls: str) -> Settings:
        """Settings as control.load reads them from a fresh home."""
        scratch = tempfile.TemporaryDirectory()
        self.addCleanup(scratch.cleanup)
        home = Path(scratch.name)
        (home / "control").mkdir()
        for name, text in {"me": "relay.example.test", "smtproutes": smtproutes, **controls}.items():
            (home / "control" / name).write_text(text + "\n")
        settings, errors = load(home)
        self.assertEqual(errors, [])
        return settings

    def routed(self, host: str, port: int, domain: str = "example.test") -> Settings:
        return self.settings(f"{domain}:{host}:{port}")

    async def deliver(self, remote: RemoteDelivery, settings: Settings, recipients: list[str],
                      message: bytes = MESSAGE, domain: str = "example.test") -> list[Outcome]:
        outcomes = await remote.deliver(settings, domain, "a@example.org", recipients, message)
        await self.servers_idle()
        return outcomes

    async def servers_idle(self) -> None:
        """Until every fake MX has seen its sessions end: its transcript is whole."""
        for server in self.servers:
            await deferToThread(server.wait_idle)

    def drive(self, coroutine: Coroutine[Any, Any, None]) -> Deferred[None]:
        return Deferred.fromCoroutine(coroutine)


class RoutingTests(RemoteDeliveryTests):
    def test_smtproutes_route_with_port_goes_to_that_host(self) -> Deferred:
        seen, port = self.start_mx()

        async def check() -> None:
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", port), ["b@example.test"])
            self.assertEqual(
                outcomes, [Outcome.success("127.0.0.1 accepted message.\nRemote host said: 250 ok 1700000000 qp 42")]
            )
            self.assertEqual(seen.command(b"RCPT"), b"RCPT TO:<b@example.test>")
            self.assertEqual(seen.verbs()[-1], b"QUIT")

        return self.drive(check())

    def test_default_route_sends_every_domain_to_the_relay(self) -> Deferred:
        seen, port = self.start_mx()

        async def check() -> None:
            settings = self.routed("[127.0.0.1]", port, domain="")
            outcomes = await self.deliver(self.remote(), settings, ["x@elsewhere.test"], domain="elsewhere.test")
            self.assertEqual(outcomes[0].kind, "success")
            self.assertEqual(seen.command(b"RCPT"), b"RCPT TO:<x@elsewhere.test>")

        return self.drive(check())

    def test_route_by_name_uses_its_address_records_and_route_port(self) -> Deferred:
        seen, port = self.start_mx()
        nameserver = self.start_dns({"smarthost.test": {"A": ["127.0.0.1"]}})

        async def check() -> None:
            settings = self.routed("smarthost.test", port, domain=".test")
            outcomes = await self.deliver(self.remote(nameserver), settings, ["b@sub.example.test"],
                                          domain="sub.example.test")
            self.assertEqual(outcomes[0].kind, "success")

        return self.drive(check())

    def test_mx_falls_back_to_next_preference_when_first_refuses(self) -> Deferred:
        seen, port = self.start_mx(interface="127.0.0.3")
        nameserver = self.start_dns({
            "example.test": {"MX": ["10 mx1.example.test.", "20 mx2.example.test."]},
            "mx1.example.test": {"A": ["127.0.0.2"]},
            "mx2.example.test": {"A": ["127.0.0.3"]},
        })

        async def check() -> None:
            outcomes = await self.deliver(self.remote(nameserver, port), self.settings(), ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "success")
            self.assertTrue(outcomes[0].text.startswith("127.0.0.3 accepted message."))
            self.assertEqual(len(seen.messages), 1)

        return self.drive(check())

    def test_empty_relay_in_smtproutes_means_mx(self) -> Deferred:
        seen, port = self.start_mx(interface="127.0.0.3")
        nameserver = self.start_dns({
            "example.test": {"MX": ["10 mx.example.test."]},
            "mx.example.test": {"A": ["127.0.0.3"]},
        })

        async def check() -> None:
            settings = self.settings(f"example.test:\n:[127.0.0.2]:{port}")
            outcomes = await self.deliver(self.remote(nameserver, port), settings, ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "success")

        return self.drive(check())

    def test_domain_without_mx_uses_its_address_record(self) -> Deferred:
        seen, port = self.start_mx(interface="127.0.0.3")
        nameserver = self.start_dns({"example.test": {"A": ["127.0.0.3"]}})

        async def check() -> None:
            outcomes = await self.deliver(self.remote(nameserver, port), self.settings(), ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "success")
            self.assertEqual(len(seen.messages), 1)

        return self.drive(check())

    def test_mx_reached_through_a_cname_chain(self) -> Deferred:
        seen, port = self.start_mx(interface="127.0.0.3")
        nameserver = self.start_dns({
            "example.test": {"CNAME": ["mail.hoster.test."]},
            "mail.hoster.test": {"MX": ["5 in.hoster.test."]},
            "in.hoster.test": {"A": ["127.0.0.3"]},
        })

        async def check() -> None:
            outcomes = await self.deliver(self.remote(nameserver, port), self.settings(), ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "success")

        return self.drive(check())

    def test_mx_with_ipv6_address_only(self) -> Deferred:
        seen, port = self.start_mx(interface="::1")
        nameserver = self.start_dns({
            "example.test": {"MX": ["10 mx.example.test."]},
            "mx.example.test": {"AAAA": ["::1"]},
        })

        async def check() -> None:
            outcomes = await self.deliver(self.remote(nameserver, port), self.settings(), ["b@example.test"])
            self.assertEqual(outcomes[0].text, "::1 accepted message.\nRemote host said: 250 ok 1700000000 qp 42")

        return self.drive(check())

    def test_mx_host_named_by_a_cname_is_followed(self) -> Deferred:
        seen, port = self.start_mx(interface="127.0.0.3")
        nameserver = self.start_dns({
            "example.test": {"MX": ["10 alias.example.test."]},
            "alias.example.test": {"CNAME": ["real.hoster.test."]},
            "real.hoster.test": {"A": ["127.0.0.3"]},
        })

        async def check() -> None:
            outcomes = await self.deliver(self.remote(nameserver, port), self.settings(), ["b@example.test"])
            self.assertEqual(outcomes[0].text, "127.0.0.3 accepted message.\nRemote host said: 250 ok 1700000000 qp 42")

        return self.drive(check())

    def test_unreachable_a_address_falls_back_to_the_aaaa_one(self) -> Deferred:
        seen, port = self.start_mx(interface="::1")  # nothing on 127.0.0.2 at that port
        nameserver = self.start_dns({
            "example.test": {"MX": ["10 mx.example.test."]},
            "mx.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        })

        async def check() -> None:
            outcomes = await self.deliver(self.remote(nameserver, port), self.settings(), ["b@example.test"])
            self.assertEqual(outcomes[0].text, "::1 accepted message.\nRemote host said: 250 ok 1700000000 qp 42")

        return self.drive(check())

    def test_domain_without_mx_uses_its_aaaa_record(self) -> Deferred:
        seen, port = self.start_mx(interface="::1")
        nameserver = self.start_dns({"example.test": {"AAAA": ["::1"]}})

        async def check() -> None:
            outcomes = await self.deliver(self.remote(nameserver, port), self.settings(), ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "success")
            self.assertEqual(len(seen.messages), 1)

        return self.drive(check())

    def test_null_mx_is_a_permanent_failure(self) -> Deferred:
        nameserver = self.start_dns({"example.test": {"MX": ["0 ."], "A": ["127.0.0.3"]}})

        async def check() -> None:
            recipients = ["b@example.test", "c@example.test"]
            outcomes = await self.deliver(self.remote(nameserver), self.settings(), recipients)
            self.assertEqual([o.kind for o in outcomes], ["failure", "failure"])
            self.assertIn("null MX", outcomes[0].text)

        return self.drive(check())

    def test_nxdomain_is_a_permanent_failure(self) -> Deferred:
        nameserver = self.start_dns({})

        async def check() -> None:
            outcomes = await self.deliver(self.remote(nameserver), self.settings(), ["b@nowhere.test"],
                                          domain="nowhere.test")
            self.assertEqual(
                outcomes, [Outcome.failure("Sorry, I couldn't find any host named nowhere.test. (#5.1.2)")]
            )

        return self.drive(check())

    def test_servfail_is_a_deferral(self) -> Deferred:
        nameserver = self.start_dns({}, servfail=frozenset({"example.test"}))

        async def check() -> None:
            outcomes = await self.deliver(self.remote(nameserver), self.settings(), ["b@example.test"])
            self.assertEqual(outcomes, [Outcome.deferral("Sorry, I couldn't find any host by that name. (#4.1.2)")])

        return self.drive(check())

    def test_name_without_any_address_is_a_failure(self) -> Deferred:
        nameserver = self.start_dns({"example.test": {"TXT": ['"no mail here"']}})

        async def check() -> None:
            outcomes = await self.deliver(self.remote(nameserver), self.settings(), ["b@example.test"])
            self.assertEqual(
                outcomes, [Outcome.failure("Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)")]
            )

        return self.drive(check())

    def test_only_better_mxes_than_this_host_are_used(self) -> Deferred:
        seen, port = self.start_mx(interface="127.0.0.3")
        nameserver = self.start_dns({
            "example.test": {"MX": ["5 better.example.test.", "10 me.example.test.", "20 worse.example.test."]},
            "better.example.test": {"A": ["127.0.0.3"]},
            "me.example.test": {"A": ["127.0.0.1"]},
            "worse.example.test": {"A": ["127.0.0.2"]},
        })

        async def check() -> None:
            remote = self.remote(nameserver, port, local_addresses=lambda: {"127.0.0.1"})
            outcomes = await self.deliver(remote, self.settings(), ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "success")

        return self.drive(check())

    def test_best_mx_being_this_host_is_a_failure(self) -> Deferred:
        nameserver = self.start_dns({
            "example.test": {"MX": ["10 me.example.test.", "20 other.example.test."]},
            "me.example.test": {"A": ["127.0.0.1"]},
            "other.example.test": {"A": ["127.0.0.3"]},
        })

        async def check() -> None:
            remote = self.remote(nameserver, local_addresses=lambda: {"127.0.0.1"})
            outcomes = await self.deliver(remote, self.settings(), ["b@example.test"])
            self.assertEqual(outcomes, [Outcome.failure(AMBIGUOUS_MX)])

        return self.drive(check())

    def test_nothing_listening_anywhere_is_a_deferral(self) -> Deferred:
        seen, port = self.start_mx(interface="127.0.0.3")  # only to own a free port number

        async def check() -> None:
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.2", port), ["b@example.test"])
            self.assertEqual(outcomes, [Outcome.deferral(NO_CONNECTION, unreachable=True)])

        return self.drive(check())


class ConversationTests(RemoteDeliveryTests):
    def test_each_recipient_gets_its_own_result(self) -> Deferred:
        seen, port = self.start_mx(mx_script(rcpt={
            "gone@example.test": b"550 5.1.1 no such user",
            "full@example.test": b"451 4.2.2 mailbox full",
        }))

        async def check() -> None:
            recipients = ["ok@example.test", "gone@example.test", "full@example.test"]
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", port), recipients)
            self.assertEqual(outcomes, [
                Outcome.success("127.0.0.1 accepted message.\nRemote host said: 250 ok 1700000000 qp 42"),
                Outcome.failure("127.0.0.1 does not like recipient.\nRemote host said: 550 5.1.1 no such user"),
                Outcome.deferral("127.0.0.1 does not like recipient.\nRemote host said: 451 4.2.2 mailbox full"),
            ])
            self.assertEqual(len(seen.messages), 1)

        return self.drive(check())

    def test_no_recipient_accepted_gives_up_without_data(self) -> Deferred:
        seen, port = self.start_mx(mx_script(rcpt={
            "gone@example.test": b"550 5.1.1 no such user",
            "later@example.test": b"451 try later",
        }))

        async def check() -> None:
            outcomes = await self.deliver(
                self.remote(), self.routed("127.0.0.1", port), ["gone@example.test", "later@example.test"]
            )
            self.assertEqual(outcomes, [
                Outcome.failure("127.0.0.1 does not like recipient.\nRemote host said: 550 5.1.1 no such user\n"
                                "Giving up on 127.0.0.1."),
                Outcome.deferral("127.0.0.1 does not like recipient.\nRemote host said: 451 try later\n"
                                 "Giving up on 127.0.0.1."),
            ])
            self.assertNotIn(b"DATA", seen.verbs())
            self.assertEqual(seen.verbs()[-1], b"QUIT")

        return self.drive(check())

    def test_message_goes_out_with_crlf_and_dot_stuffing_byte_exact(self) -> Deferred:
        seen, port = self.start_mx()
        message = b"Subject: dots\n\n.hidden\nline\n..two\n.\n\n. \nlast"

        async def check() -> None:
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", port), ["b@example.test"], message)
            self.assertEqual(outcomes[0].kind, "success")
            self.assertEqual(
                seen.messages,
                [b"Subject: dots\r\n\r\n..hidden\r\nline\r\n...two\r\n..\r\n\r\n.. \r\nlast\r\n.\r\n"],
            )

        return self.drive(check())

    def test_large_message_is_stuffed_across_piece_boundaries(self) -> Deferred:
        seen, port = self.start_mx()
        message = b"".join(b".%06d" % n + b"x" * (n % 97) + b"\n" for n in range(40000))

        async def check() -> None:
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", port), ["b@example.test"], message)
            self.assertEqual(outcomes[0].kind, "success")
            expected = re.sub(rb"(?m)^\.", b"..", message).replace(b"\n", b"\r\n") + b".\r\n"
            self.assertEqual(seen.messages, [expected])

        return self.drive(check())

    def test_empty_message_is_just_the_final_dot(self) -> Deferred:
        seen, port = self.start_mx()

        async def check() -> None:
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", port), ["b@example.test"], b"")
            self.assertEqual(outcomes[0].kind, "success")
            self.assertEqual(seen.messages, [b".\r\n"])

        return self.drive(check())

    def test_eight_bit_body_declares_8bitmime_and_size(self) -> Deferred:
        seen, port = self.start_mx()
        message = "Subject: caf\u00e9\n\nna\u00efve\n".encode()

        async def check() -> None:
            await self.deliver(self.remote(), self.routed("127.0.0.1", port), ["b@example.test"], message)
            size = len(message) + message.count(b"\n")
            self.assertEqual(seen.command(b"MAIL"), b"MAIL FROM:<a@example.org> SIZE=%d BODY=8BITMIME" % size)
            self.assertEqual(seen.messages, [message.replace(b"\n", b"\r\n") + b".\r\n"])

        return self.drive(check())

    def test_no_extension_parameters_when_not_advertised(self) -> Deferred:
        seen, port = self.start_mx(mx_script(extensions=(b"HELP",)))
        message = "Subject: caf\u00e9\n\nbody\n".encode()

        async def check() -> None:
            await self.deliver(self.remote(), self.routed("127.0.0.1", port), ["b@example.test"], message)
            self.assertEqual(seen.command(b"MAIL"), b"MAIL FROM:<a@example.org>")

        return self.drive(check())

    def test_size_refusal_is_a_permanent_failure(self) -> Deferred:
        seen, port = self.start_mx(mx_script(mail_reply=b"552 5.3.4 message too big"))

        async def check() -> None:
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", port), ["b@example.test"])
            self.assertEqual(outcomes, [Outcome.failure(
                "Connected to 127.0.0.1 but sender was rejected.\nRemote host said: 552 5.3.4 message too big")])

        return self.drive(check())

    def test_pipelining_sends_envelope_in_one_go_only_when_offered(self) -> Deferred:
        piped, piped_port = self.start_mx()
        serial, serial_port = self.start_mx(mx_script(extensions=(b"8BITMIME",)))

        async def check() -> None:
            recipients = ["b@example.test", "c@example.test"]
            await self.deliver(self.remote(), self.routed("127.0.0.1", piped_port), recipients)
            await self.deliver(self.remote(), self.routed("127.0.0.1", serial_port), recipients)

            def reads(seen: FakeSMTP) -> set[int]:
                return {n for n, command, _ in seen.commands if command[:4] in (b"MAIL", b"RCPT")}

            self.assertEqual(len(reads(piped)), 1)
            self.assertEqual(len(reads(serial)), 3)

        return self.drive(check())

    def test_bounce_uses_null_sender_and_quotes_odd_local_parts(self) -> Deferred:
        seen, port = self.start_mx()

        async def check() -> None:
            remote = self.remote()
            settings = self.routed("127.0.0.1", port)
            await remote.deliver(settings, "example.test", "", ["john doe@example.test"], MESSAGE)
            await self.servers_idle()
            self.assertEqual(seen.command(b"MAIL"), b"MAIL FROM:<> SIZE=%d" % (len(MESSAGE) + MESSAGE.count(b"\n")))
            self.assertEqual(seen.command(b"RCPT"), b'RCPT TO:<"john doe"@example.test>')

        return self.drive(check())

    def test_addresses_with_line_breaks_are_never_sent(self) -> Deferred:
        seen, port = self.start_mx()

        async def check() -> None:
            recipients = ["b@example.test", "x@example.test>\r\nRSET\r\nRCPT TO:<c@example.test"]
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", port), recipients)
            self.assertEqual([o.kind for o in outcomes], ["success", "failure"])
            self.assertEqual(outcomes[1].text, "Sorry, that address has characters SMTP cannot carry. (#5.1.3)")
            self.assertEqual(seen.verbs(), [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"])

        return self.drive(check())

    def test_greeting_refusals(self) -> Deferred:
        _, refusing = self.start_mx(mx_script(greeting=b"554 no mail for you"))
        _, busy = self.start_mx(mx_script(greeting=b"421 too busy"))

        async def check() -> None:
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", refusing), ["b@example.test"])
            self.assertEqual(outcomes, [Outcome.failure(
                "Connected to 127.0.0.1 but greeting failed.\nRemote host said: 554 no mail for you")])
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", busy), ["b@example.test"])
            self.assertEqual(outcomes, [Outcome.deferral(
                "Connected to 127.0.0.1 but greeting failed.\nRemote host said: 421 too busy")])

        return self.drive(check())

    def test_ehlo_refused_falls_back_to_helo(self) -> Deferred:
        seen, port = self.start_mx(mx_script(ehlo_code=b"502"))

        async def check() -> None:
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", port), ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "success")
            self.assertEqual(seen.verbs()[:3], [b"EHLO", b"HELO", b"MAIL"])
            self.assertEqual(seen.command(b"HELO"), b"HELO relay.example.test")

        return self.drive(check())

    def test_lost_connection_after_message_is_a_possible_duplicate(self) -> Deferred:
        seen, port = self.start_mx(mx_script(hang_up_after_message=True))

        async def check() -> None:
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", port), ["b@example.test"])
            self.assertEqual(outcomes, [Outcome.deferral(
                "Connected to 127.0.0.1 but connection died. Possible duplicate! (#4.4.2)")])

        return self.drive(check())

    def test_silent_server_times_out_as_a_deferral(self) -> Deferred:
        _, port = self.start_mx(mx_script(silent=True))  # accepts, but never greets

        async def check() -> None:
            settings = self.settings(f"example.test:127.0.0.1:{port}", timeoutremote="1")
            outcomes = await self.deliver(self.remote(), settings, ["b@example.test"])
            self.assertEqual(outcomes, [Outcome.deferral("Connected to 127.0.0.1 but connection died. (#4.4.2)")])

        return self.drive(check())


class TLSTests(RemoteDeliveryTests):
    def server_tls(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        trustme.CA().issue_cert("mx.example.test").configure_cert(context)
        return context

    def test_starttls_is_used_when_offered_without_verifying_the_certificate(self) -> Deferred:
        script = mx_script(extensions=(b"STARTTLS", b"PIPELINING", b"SIZE 1000"), tls=self.server_tls())
        seen, port = self.start_mx(script)

        async def check() -> None:
            remote = self.remote(tls_context_factory=opportunistic_tls())
            outcomes = await self.deliver(remote, self.routed("127.0.0.1", port), ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "success")
            self.assertEqual(seen.verbs()[:3], [b"EHLO", b"STARTTLS", b"EHLO"])
            self.assertTrue(all(secure for _, command, secure in seen.commands if command.startswith(b"MAIL")))
            self.assertEqual(seen.messages, [MESSAGE.replace(b"\n", b"\r\n") + b".\r\n"])

        return self.drive(check())

    def test_starttls_is_skipped_without_a_context(self) -> Deferred:
        seen, port = self.start_mx(mx_script(extensions=(b"STARTTLS",), tls=self.server_tls()))

        async def check() -> None:
            outcomes = await self.deliver(self.remote(), self.routed("127.0.0.1", port), ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "success")
            self.assertNotIn(b"STARTTLS", seen.verbs())

        return self.drive(check())

    def test_failed_handshake_defers_and_never_continues_in_plaintext(self) -> Deferred:
        seen, port = self.start_mx(mx_script(extensions=(b"STARTTLS",), garbage_after_starttls=True))

        async def check() -> None:
            remote = self.remote(tls_context_factory=opportunistic_tls())
            outcomes = await self.deliver(remote, self.routed("127.0.0.1", port), ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "deferral")
            self.assertTrue(outcomes[0].text.startswith("TLS connect failed: "), outcomes[0].text)
            self.assertTrue(outcomes[0].text.endswith("; connected to 127.0.0.1."), outcomes[0].text)
            self.assertEqual(seen.verbs(), [b"EHLO", b"STARTTLS"])

        return self.drive(check())

    def test_refused_starttls_defers_instead_of_going_on_in_plaintext(self) -> Deferred:
        script = mx_script(extensions=(b"STARTTLS", b"PIPELINING"), starttls_reply=b"454 4.7.0 TLS not available")
        seen, port = self.start_mx(script)

        async def check() -> None:
            remote = self.remote(tls_context_factory=opportunistic_tls())
            outcomes = await self.deliver(remote, self.routed("127.0.0.1", port), ["b@example.test"])
            self.assertEqual(outcomes, [Outcome.deferral(
                "TLS connect failed: STARTTLS was refused; connected to 127.0.0.1.\n"
                "Remote host said: 454 4.7.0 TLS not available")])
            self.assertEqual(seen.verbs(), [b"EHLO", b"STARTTLS", b"QUIT"])
            self.assertEqual(seen.messages, [])

        return self.drive(check())

    def test_replies_sent_before_the_handshake_are_not_believed(self) -> Deferred:
        script = mx_script(extensions=(b"STARTTLS",), tls=self.server_tls(), inject_after_starttls=True)
        seen, port = self.start_mx(script)

        async def check() -> None:
            remote = self.remote(tls_context_factory=opportunistic_tls())
            outcomes = await self.deliver(remote, self.routed("127.0.0.1", port), ["b@example.test"])
            self.assertEqual(outcomes[0].kind, "deferral")
            self.assertIn("before the TLS handshake", outcomes[0].text)
            self.assertEqual(seen.verbs(), [b"EHLO", b"STARTTLS"])

        return self.drive(check())


class PieceTests(TestCase):
    def test_this_host_has_loopback_but_not_the_rest_of_127(self) -> None:
        mine = this_host_addresses()
        self.assertIn("127.0.0.1", mine)
        self.assertNotIn("127.0.0.2", mine)
        self.assertNotIn("127.0.0.3", mine)

    def test_tcpto_skips_a_host_after_two_timeouts_for_an_hour(self) -> None:
        clock = Clock()
        timeouts = ConnectTimeouts(clock)
        timeouts.record("127.0.0.9", timed_out=True)
        self.assertFalse(timeouts.should_skip("127.0.0.9"))
        timeouts.record("127.0.0.9", timed_out=True)
        self.assertTrue(timeouts.should_skip("127.0.0.9"))
        clock.advance(3601)
        self.assertFalse(timeouts.should_skip("127.0.0.9"))

    def test_tcpto_forgets_a_host_that_answered(self) -> None:
        timeouts = ConnectTimeouts(Clock())
        timeouts.record("127.0.0.9", timed_out=True)
        timeouts.record("127.0.0.9", timed_out=False)
        timeouts.record("127.0.0.9", timed_out=True)
        self.assertFalse(timeouts.should_skip("127.0.0.9"))

    def test_addresses_are_quoted_only_when_needed(self) -> None:
        self.assertEqual(smtp_address("a.b+c@example.test"), "<a.b+c@example.test>")
        self.assertEqual(smtp_address(".a@example.test"), '<".a"@example.test>')
        self.assertEqual(smtp_address('x"y@example.test'), '<"x\\"y"@example.test>')
