"""Connections at once (qtwist.limits): the counting, the tcp.smtp overrides,
making room for a new client when the server is full of idle ones, and the
SMTP and POP3 servers refusing with one line, all in memory."""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import pytest
from twisted.trial.unittest import TestCase

from qtwist.control import Settings
from qtwist.limits import (EVICT_IDLE, TOO_MANY, TOO_MANY_FROM_ADDRESS, TOO_MANY_FROM_NETWORK, Admission, Limits,
                           client_keys, pop3_limits, smtp_limits)
from tests.support.home import ME, edit_file, make_home
from qtwist.smtpd import SMTPServer
from tests.support.memory import MemoryHome, POP3Rig, SMTPClient, SMTPRig


class FakeSession:
    """What admission sees of a session."""

    def __init__(self, last_activity: float = 0.0, busy: bool = False) -> None:
        self.last_activity = last_activity
        self.busy = busy
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


# -- counting ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ip, keys", [
    ("192.0.2.7", ("192.0.2.7", "192.0.2.")),
    ("2001:db8:1:2:3:4:5:6", ("2001:db8:1:2::/64", "2001:db8:1::/48")),
    ("::1", ("::/64", "::/48")),
    ("unknown", ("unknown", "unknown")),
])
def test_an_ipv4_client_counts_by_address_and_slash_24_an_ipv6_one_by_slash_64_and_slash_48(ip, keys):
    assert client_keys(ip) == keys


def test_the_per_address_limit_refuses_the_next_connection_and_a_release_makes_room():
    admission = Admission()
    limits = Limits(total=None, per_address=2, per_network=None)
    first, second, third = FakeSession(), FakeSession(), FakeSession()
    assert admission.admit(first, "192.0.2.7", limits, 0) is None
    assert admission.admit(second, "192.0.2.7", limits, 0) is None
    assert admission.admit(third, "192.0.2.7", limits, 0) == TOO_MANY_FROM_ADDRESS
    assert admission.admit(third, "192.0.2.8", limits, 0) is None  # another address
    admission.release(first)
    assert admission.admit(FakeSession(), "192.0.2.7", limits, 0) is None
    assert len(admission) == 3


def test_ipv6_clients_of_one_slash_64_share_their_count():
    admission = Admission()
    limits = Limits(total=None, per_address=1, per_network=None)
    assert admission.admit(FakeSession(), "2001:db8::1", limits, 0) is None
    assert admission.admit(FakeSession(), "2001:db8::ffff:2", limits, 0) == TOO_MANY_FROM_ADDRESS
    assert admission.admit(FakeSession(), "2001:db8:0:1::1", limits, 0) is None


def test_the_network_limit_counts_a_slash_24():
    admission = Admission()
    limits = Limits(total=None, per_address=None, per_network=2)
    assert admission.admit(FakeSession(), "192.0.2.1", limits, 0) is None
    assert admission.admit(FakeSession(), "192.0.2.2", limits, 0) is None
    assert admission.admit(FakeSession(), "192.0.2.3", limits, 0) == TOO_MANY_FROM_NETWORK
    assert admission.admit(FakeSession(), "192.0.3.3", limits, 0) is None


def test_releasing_twice_or_an_unknown_session_changes_nothing():
    admission = Admission()
    limits = Limits(total=None, per_address=1, per_network=None)
    session = FakeSession()
    admission.admit(session, "192.0.2.7", limits, 0)
    admission.release(session)
    admission.release(session)
    admission.release(FakeSession())
    assert len(admission) == 0
    assert admission.admit(FakeSession(), "192.0.2.7", limits, 0) is None


# -- making room ---------------------------------------------------------------------------------

def test_when_full_the_session_silent_the_longest_makes_room():
    admission = Admission()
    limits = Limits(total=2, per_address=None, per_network=None)
    older, newer = FakeSession(0.0), FakeSession(5.0)
    admission.admit(older, "192.0.2.1", limits, 0.0)
    admission.admit(newer, "192.0.2.2", limits, 5.0)
    newer.last_activity = 6.0
    admission.active(newer)
    newcomer = FakeSession(10.0)
    assert admission.admit(newcomer, "192.0.2.3", limits, 10.0) is None
    assert older.evicted and not newer.evicted
    assert len(admission) == 2


def test_the_line_follows_activity_not_arrival():
    admission = Admission()
    limits = Limits(total=2, per_address=None, per_network=None)
    first, second = FakeSession(0.0), FakeSession(1.0)
    admission.admit(first, "192.0.2.1", limits, 0.0)
    admission.admit(second, "192.0.2.2", limits, 1.0)
    first.last_activity = 2.0
    admission.active(first)  # it sent a command: it goes to the back
    admission.admit(FakeSession(10.0), "192.0.2.3", limits, 10.0)
    assert second.evicted and not first.evicted


def test_a_full_server_of_talking_clients_refuses_the_newcomer():
    admission = Admission()
    limits = Limits(total=1, per_address=None, per_network=None)
    talking = FakeSession(10.0)
    admission.admit(talking, "192.0.2.1", limits, 10.0)
    assert admission.admit(FakeSession(), "192.0.2.2", limits, 10.0 + EVICT_IDLE / 2) == TOO_MANY
    assert not talking.evicted


def test_a_session_waiting_on_the_server_is_never_evicted():
    admission = Admission()
    limits = Limits(total=2, per_address=None, per_network=None)
    waiting, idle = FakeSession(0.0, busy=True), FakeSession(0.5)
    admission.admit(waiting, "192.0.2.1", limits, 0.0)
    admission.admit(idle, "192.0.2.2", limits, 0.5)
    assert admission.admit(FakeSession(), "192.0.2.3", limits, 60.0) is None
    assert idle.evicted and not waiting.evicted


def test_when_full_of_young_silent_sessions_the_address_holding_most_gives_one_up():
    admission = Admission()
    limits = Limits(total=4, per_address=None, per_network=None)
    flood = [FakeSession(0.0) for _ in range(3)]
    for session in flood:
        admission.admit(session, "192.0.2.66", limits, 0.0)
    other = FakeSession(0.0)
    admission.admit(other, "192.0.2.7", limits, 0.0)
    newcomer = FakeSession(0.1)
    assert admission.admit(newcomer, "198.51.100.1", limits, 0.1) is None  # nobody silent for a second yet
    assert [session.evicted for session in flood] == [True, False, False] and not other.evicted


def test_a_session_that_talked_is_not_given_up_for_fairness():
    admission = Admission()
    limits = Limits(total=3, per_address=None, per_network=None)
    talking = [FakeSession(0.0) for _ in range(3)]
    for session in talking:
        admission.admit(session, "192.0.2.66", limits, 0.0)
        admission.active(session)
    assert admission.admit(FakeSession(0.1), "198.51.100.1", limits, 0.1) == TOO_MANY


def test_addresses_with_about_the_same_share_do_not_push_each_other_out():
    admission = Admission()
    limits = Limits(total=2, per_address=None, per_network=None)
    admission.admit(FakeSession(0.0), "192.0.2.1", limits, 0.0)
    admission.admit(FakeSession(0.0), "192.0.2.2", limits, 0.0)
    assert admission.admit(FakeSession(0.1), "192.0.2.3", limits, 0.1) == TOO_MANY


# -- the limits of one client -----------------------------------------------------------------------

def test_smtp_limits_come_from_control_files_and_the_clients_tcp_smtp_rule():
    settings = Settings(me=ME, concurrencyincoming=500, concurrencyperip=20)
    assert smtp_limits({}, settings) == Limits(500, 20, None)
    assert smtp_limits({"MAXCONNIP": "3", "MAXCONNC": "30"}, settings) == Limits(500, 3, 30)
    assert smtp_limits({"RELAYCLIENT": ""}, settings) == Limits(500, None, None)  # our own network
    assert smtp_limits({"RELAYCLIENT": "", "MAXCONNIP": "50"}, settings) == Limits(500, 50, None)
    assert smtp_limits({"MAXCONNIP": "lots"}, settings) == Limits(500, 20, None)
    assert smtp_limits({}, Settings(me=ME, concurrencyincoming=0, concurrencyperip=0)) == Limits(None, None, None)


def test_pop3_limits_come_from_their_control_files():
    assert pop3_limits(Settings(me=ME, pop3concurrencyincoming=7, pop3concurrencyperip=2)) == Limits(7, 2, None)


# -- the servers ----------------------------------------------------------------------------------

class ServerLimitTests(TestCase):
    def setUp(self) -> None:
        path = Path(tempfile.mkdtemp(prefix="qtwist-limits-"))
        self.addCleanup(shutil.rmtree, path, True)
        make_home(path, controls={"concurrencyincoming": "4\n", "concurrencyperip": "2\n",
                                  "pop3concurrencyincoming": "2\n", "pop3concurrencyperip": "1\n"})
        self.home = MemoryHome(path)
        self.smtp = SMTPRig(self.home)
        self.addCleanup(self.smtp.close)

    def control(self, name: str, text: str) -> None:
        edit_file(self.home.path / "control" / name, text)
        self.home.reload()

    async def test_past_the_per_address_limit_an_smtp_client_gets_one_421_line_and_is_closed(self) -> None:
        await self.smtp.greeted("192.0.2.7")
        await self.smtp.greeted("192.0.2.7")
        refused = self.smtp.connect("192.0.2.7")
        self.assertEqual(refused.output, f"421 {ME} too many connections from your address, try again later "
                                         f"(#4.7.0)\r\n".encode())
        self.assertTrue(refused.closed)
        await self.smtp.greeted("192.0.2.8")

    async def test_an_ipv4_mapped_client_counts_as_its_ipv4_address(self) -> None:
        await self.smtp.greeted("192.0.2.7")
        await self.smtp.greeted("::ffff:192.0.2.7")
        self.assertTrue(self.smtp.connect("192.0.2.7").closed)

    async def test_a_closed_session_makes_room_for_the_next(self) -> None:
        first = await self.smtp.greeted("192.0.2.7")
        await self.smtp.greeted("192.0.2.7")
        await first.ask("QUIT")
        first.hang_up()
        await self.smtp.greeted("192.0.2.7")

    async def test_tcp_smtp_maxconnip_and_relayclient_change_the_per_address_limit(self) -> None:
        edit_file(self.home.path / "tcp.smtp", '192.0.2.9:allow,RELAYCLIENT=""\n'
                                               '192.0.2.10:allow,MAXCONNIP="1"\n:allow\n')
        self.home.reload()
        for _ in range(3):
            await self.smtp.greeted("192.0.2.9")  # our own network: no per-address limit
        await self.smtp.greeted("192.0.2.10")
        self.assertTrue(self.smtp.connect("192.0.2.10").closed)

    async def test_tcp_smtp_maxconnc_caps_a_slash_24(self) -> None:
        edit_file(self.home.path / "tcp.smtp", '198.51.100.:allow,MAXCONNC="2"\n:allow\n')
        self.home.reload()
        await self.smtp.greeted("198.51.100.1")
        await self.smtp.greeted("198.51.100.2")
        refused = self.smtp.connect("198.51.100.3")
        self.assertIn(b"too many connections from your network", refused.output)

    async def test_a_server_full_of_silent_clients_lets_a_new_client_in_and_drops_the_oldest(self) -> None:
        silent = [await self.smtp.greeted(f"192.0.2.{n}") for n in range(1, 5)]
        self.home.clock.advance(EVICT_IDLE + 1)
        newcomer = await self.smtp.greeted("192.0.2.50")
        self.assertEqual(await newcomer.ask("HELO newcomer.test"), [f"250 {ME}".encode()])
        (dropped,) = [client for client in silent if client.closed]
        self.assertIs(dropped, silent[0])
        self.assertEqual(dropped.replies(), [f"421 {ME} the server is full, closing an idle connection "
                                             f"(#4.4.2)".encode()])

    async def test_a_server_full_of_talking_clients_refuses_a_new_one(self) -> None:
        clients = [await self.smtp.greeted(f"192.0.2.{n}") for n in range(1, 5)]
        self.home.clock.advance(EVICT_IDLE + 1)
        for client in clients:
            await client.ask("NOOP")
        refused = self.smtp.connect("192.0.2.50")
        self.assertEqual(refused.output, f"421 {ME} too many connections, try again later (#4.7.0)\r\n".encode())
        self.assertFalse(any(client.closed for client in clients))

    async def test_a_new_limit_applies_to_the_next_connection(self) -> None:
        await self.smtp.greeted("192.0.2.7")
        await self.smtp.greeted("192.0.2.7")
        self.control("concurrencyperip", "3\n")
        await self.smtp.greeted("192.0.2.7")

    async def test_submission_and_smtp_listeners_count_together(self) -> None:
        submission = copy.copy(self.smtp.factory)  # another listener of the same server, as service.py builds it
        submission.submission = True
        await self.smtp.greeted("192.0.2.7")
        greeted = SMTPClient(SMTPServer(submission), "192.0.2.7")
        self.assertTrue(greeted.output.startswith(b"220 "))
        self.assertTrue(SMTPClient(SMTPServer(submission), "192.0.2.7").closed)

    async def test_past_a_pop3_limit_the_client_gets_one_err_line(self) -> None:
        pop3 = POP3Rig(self.home)
        await pop3.greeted("192.0.2.7")
        refused = pop3.connect("192.0.2.7")
        self.assertEqual(refused.output,
                         b"-ERR [SYS/TEMP] too many connections from your address, try again later\r\n")
        self.assertTrue(refused.closed)
        await pop3.greeted("192.0.2.8")
        self.assertEqual(pop3.connect("192.0.2.9").output,
                         b"-ERR [SYS/TEMP] too many connections, try again later\r\n")

    async def test_a_pop3_server_full_of_silent_clients_drops_the_oldest_for_a_new_one(self) -> None:
        pop3 = POP3Rig(self.home)
        first = await pop3.greeted("192.0.2.7")
        await pop3.greeted("192.0.2.8")
        self.home.clock.advance(EVICT_IDLE + 1)
        await pop3.greeted("192.0.2.9")
        self.assertTrue(first.closed)
        self.assertIn(b"-ERR [SYS/TEMP] the server is full, closing an idle connection\r\n", first.output)
