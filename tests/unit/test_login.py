"""The one login flow of SMTP AUTH and POP3: client addresses, the failed-login
throttle, credentials, the cred checker over a real vpasswd home, and ``Logins``
(qtwist.login)."""

from __future__ import annotations

import hashlib
import hmac
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from twisted.cred.credentials import CramMD5Credentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from qtwist.login import (
    MAX_DELAY,
    NO_IP,
    PRUNE_EVERY,
    APOPCredentials,
    FailureThrottle,
    IMailUser,
    LoginResult,
    Logins,
    PlainCredentials,
    Refusal,
    client_address,
    mail_portal,
    normal_ip,
)
from qtwist.users import NO_POP, NO_SMTP, UserDB
from tests.support.home import DOMAIN, PASSWORD, make_home, set_flags

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
IP = "192.0.2.7"
OTHER_IP = "198.51.100.9"


# -- client addresses -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("::FFFF:c000:0201", "192.0.2.1"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("2001:DB8::1", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("::1", "::1"),
])
def test_normal_ip_gives_one_spelling_per_address(text: str, expected: str):
    assert normal_ip(text) == expected


@pytest.mark.parametrize("junk", ["", "mx.example.test", "192.0.2", "192.0.2.256", "2001:db8::1::2", "%eth0"])
def test_normal_ip_refuses_text_that_is_no_address(junk: str):
    with pytest.raises(ValueError):
        normal_ip(junk)


@pytest.mark.parametrize("peer, expected", [
    (IPv4Address("TCP", "192.0.2.1", 51000), "192.0.2.1"),
    (IPv6Address("TCP", "::ffff:192.0.2.1", 51000), "192.0.2.1"),
    (IPv6Address("TCP", "2001:0db8::0001", 51000), "2001:db8::1"),
    (IPv6Address("TCP", "fe80::1%eth0", 51000, 0, 2), "fe80::1"),
    (UNIXAddress(b"/run/qtwist.sock"), NO_IP),
    (UNIXAddress(None), NO_IP),
    (IPv4Address("TCP", "not-an-ip", 51000), NO_IP),
])
def test_client_address_of_a_connection(peer, expected: str):
    assert client_address(StringTransport(peerAddress=peer)) == expected


# -- the failure throttle ------------------------------------------------------------------------

def throttle_on(clock: task.Clock, limit: int = 100, window: int = 600, block: int = 900) -> FailureThrottle:
    return FailureThrottle(clock, lambda: (limit, window, block))


def test_each_failure_waits_longer_up_to_max_delay():
    throttle = throttle_on(task.Clock())
    delays = [throttle.failed(IP) for _ in range(12)]
    assert delays[:4] == [1.0, 1.5, 2.0, 2.5]
    assert delays == sorted(delays)
    assert max(delays) == MAX_DELAY
    assert delays[-1] == MAX_DELAY


def test_limit_failures_within_the_window_block_the_address():
    clock = task.Clock()
    throttle = throttle_on(clock, limit=3, window=60, block=300)
    throttle.failed(IP)
    clock.advance(10)
    throttle.failed(IP)
    assert not throttle.blocked(IP)
    clock.advance(10)
    throttle.failed(IP)
    assert throttle.blocked(IP)


def test_failures_older_than_the_window_do_not_count():
    clock = task.Clock()
    throttle = throttle_on(clock, limit=3, window=60, block=300)
    throttle.failed(IP)
    throttle.failed(IP)
    clock.advance(61)
    assert throttle.failed(IP) == 1.0
    assert not throttle.blocked(IP)


def test_the_block_is_lifted_after_block_seconds():
    clock = task.Clock()
    throttle = throttle_on(clock, limit=2, window=60, block=300)
    throttle.failed(IP)
    throttle.failed(IP)
    clock.advance(299.9)
    assert throttle.blocked(IP)
    clock.advance(0.1)
    assert not throttle.blocked(IP)
    assert throttle.failed(IP) == 1.0  # counting starts afresh


def test_a_limit_of_zero_never_blocks():
    throttle = throttle_on(task.Clock(), limit=0)
    for _ in range(50):
        throttle.failed(IP)
    assert not throttle.blocked(IP)


def test_a_success_forgets_the_failures():
    throttle = throttle_on(task.Clock(), limit=3)
    throttle.failed(IP)
    throttle.failed(IP)
    throttle.succeeded(IP)
    assert throttle.failed(IP) == 1.0
    throttle.failed(IP)
    assert not throttle.blocked(IP)


def test_each_address_is_throttled_on_its_own():
    throttle = throttle_on(task.Clock(), limit=3)
    for _ in range(3):
        throttle.failed(IP)
    assert throttle.blocked(IP)
    assert not throttle.blocked(OTHER_IP)
    assert throttle.failed(OTHER_IP) == 1.0
    throttle.succeeded(OTHER_IP)
    assert throttle.blocked(IP)


def test_pruning_forgets_addresses_idle_past_the_window():
    clock = task.Clock()
    throttle = throttle_on(clock, limit=100, window=60)
    for number in range(PRUNE_EVERY - 1):
        throttle.failed(f"10.0.{number // 256}.{number % 256}")
    assert len(throttle.failures) == PRUNE_EVERY - 1
    clock.advance(61)
    throttle.failed(IP)
    assert list(throttle.failures) == [IP]


def test_pruning_forgets_blocks_that_ended():
    clock = task.Clock()
    throttle = throttle_on(clock, limit=1, window=60, block=30)
    for number in range(PRUNE_EVERY - 1):
        throttle.failed(f"10.0.{number // 256}.{number % 256}")
    assert len(throttle.blocked_until) == PRUNE_EVERY - 1
    clock.advance(31)
    throttle.failed(IP)
    assert list(throttle.blocked_until) == [IP]
    assert throttle.failures == {}


# -- credentials ---------------------------------------------------------------------------------

@pytest.mark.parametrize("authzid, itself", [
    (b"", True),
    (b"alice@example.test", True),
    (b"Alice@Example.TEST", True),
    (b"bob@example.test", False),
])
def test_plain_credentials_act_only_as_themselves(authzid: bytes, itself: bool):
    assert PlainCredentials(b"alice@example.test", b"pw", authzid).acts_as_itself() is itself


def apop_digest(timestamp: bytes, password: bytes) -> bytes:
    return hashlib.md5(timestamp + password).hexdigest().encode("ascii")


def test_apop_credentials_check_the_digest_of_timestamp_and_password():
    timestamp = b"<1896.697170952@mx.example.test>"
    digest = apop_digest(timestamp, b"tanstaaf")
    assert APOPCredentials(b"alice", timestamp, digest).checkPassword(b"tanstaaf")
    assert APOPCredentials(b"alice", timestamp, digest.upper()).checkPassword(b"tanstaaf")
    assert not APOPCredentials(b"alice", timestamp, digest).checkPassword(b"tanstaaF")
    assert not APOPCredentials(b"alice", b"<other@mx>", digest).checkPassword(b"tanstaaf")


def cram_md5(username: str, secret: str, challenge: bytes = b"<12345.1700000000@mx.example.test>") -> CramMD5Credentials:
    credentials = CramMD5Credentials()
    credentials.challenge = challenge
    answer = hmac.new(secret.encode(), challenge, "md5").hexdigest()
    credentials.setResponse(f"{username} {answer}".encode())
    return credentials



def break_store(home: Path) -> None:
    """A store that cannot answer: the vpasswd table cannot be read."""
    vpasswd = home / "domains" / DOMAIN / "vpasswd"
    vpasswd.unlink()
    vpasswd.mkdir()


def temporary_home(test: unittest.TestCase, cleartext: bool = False) -> Path:
    """A home made by make_home in a fresh temporary folder, removed after the test
    (trial's mktemp() would leave it under the working directory)."""
    root = Path(tempfile.mkdtemp(prefix="qtwist-login-"))
    test.addCleanup(shutil.rmtree, root, True)
    make_home(root / "home", cleartext=cleartext)
    return root / "home"


async def until(condition, what: str, timeout: float = 10.0) -> None:
    """Let the real reactor run (worker threads report through it) until ``condition`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await task.deferLater(reactor, 0.001, lambda: None)


# -- the cred checker over the user store ---------------------------------------------------------

class StoreCheckerTests(unittest.TestCase):
    """mail_portal over a real vpasswd home with clear-text passwords."""

    def setUp(self) -> None:
        self.home_path = temporary_home(self, cleartext=True)
        self.users = UserDB(self.home_path)

    async def login(self, credentials, service: str = "smtp"):
        _, user, _ = await mail_portal(self.users, service).login(credentials, None, IMailUser)
        return user

    async def refused(self, credentials, service: str = "smtp") -> None:
        with self.assertRaises(UnauthorizedLogin):
            await self.login(credentials, service)

    async def test_the_right_password_gives_the_user(self):
        user = await self.login(UsernamePassword(ALICE.encode(), PASSWORD.encode()))
        self.assertEqual(user.address, ALICE)

    async def test_the_address_is_found_in_any_case(self):
        user = await self.login(PlainCredentials(b"Alice@Example.Test", PASSWORD.encode()), "pop3")
        self.assertEqual(user.address, ALICE)

    async def test_a_wrong_password_is_refused(self):
        await self.refused(PlainCredentials(ALICE.encode(), b"wrong"))

    async def test_an_unknown_user_is_refused(self):
        await self.refused(PlainCredentials(f"carol@{DOMAIN}".encode(), PASSWORD.encode()))

    async def test_cram_md5_checks_against_the_clear_text_field(self):
        user = await self.login(cram_md5(BOB, PASSWORD))
        self.assertEqual(user.address, BOB)
        await self.refused(cram_md5(BOB, "wrong"))

    async def test_cram_md5_without_a_clear_text_field_is_refused(self):
        self.users = UserDB(temporary_home(self, cleartext=False))
        await self.refused(cram_md5(ALICE, PASSWORD))
        await self.refused(cram_md5(ALICE, ""))

    async def test_cram_md5_for_an_unknown_user_is_refused(self):
        await self.refused(cram_md5(f"carol@{DOMAIN}", ""))

    async def test_apop_checks_against_the_clear_text_field(self):
        timestamp = b"<1.2@mx.example.test>"
        user = await self.login(APOPCredentials(ALICE.encode(), timestamp,
                                                apop_digest(timestamp, PASSWORD.encode())), "pop3")
        self.assertEqual(user.address, ALICE)
        await self.refused(APOPCredentials(ALICE.encode(), timestamp, apop_digest(timestamp, b"wrong")), "pop3")

    async def test_no_smtp_refuses_smtp_only(self):
        set_flags(self.home_path, ALICE, NO_SMTP)
        credentials = PlainCredentials(ALICE.encode(), PASSWORD.encode())
        await self.refused(credentials, "smtp")
        self.assertEqual((await self.login(credentials, "pop3")).address, ALICE)

    async def test_no_pop_refuses_pop3_only(self):
        set_flags(self.home_path, ALICE, NO_POP)
        credentials = PlainCredentials(ALICE.encode(), PASSWORD.encode())
        await self.refused(credentials, "pop3")
        self.assertEqual((await self.login(credentials, "smtp")).address, ALICE)
        await self.refused(cram_md5(ALICE, PASSWORD), "pop3")

    def test_an_authzid_naming_someone_else_is_refused_before_any_check(self):
        break_store(self.home_path)  # asking the store now would fail otherwise
        credentials = PlainCredentials(ALICE.encode(), PASSWORD.encode(), BOB.encode())
        # Refused at once, with no worker thread: the store was never asked.
        self.failureResultOf(mail_portal(self.users, "smtp").login(credentials, None, IMailUser),
                             UnauthorizedLogin)

    async def test_an_authzid_naming_the_user_is_accepted(self):
        user = await self.login(PlainCredentials(ALICE.encode(), PASSWORD.encode(), ALICE.encode()))
        self.assertEqual(user.address, ALICE)

    async def test_a_store_that_cannot_answer_is_no_refusal(self):
        break_store(self.home_path)
        with self.assertRaises(OSError):
            await self.login(PlainCredentials(ALICE.encode(), PASSWORD.encode()))


# -- Logins: the flow both protocols use -----------------------------------------------------------

class LoginsTests(unittest.TestCase):
    """Logins on a task.Clock (the throttle's delays); the store answers from worker threads."""

    def setUp(self) -> None:
        self.home_path = temporary_home(self)
        self.clock = task.Clock()
        self.throttle = throttle_on(self.clock, limit=3, window=600, block=900)
        self.logins = Logins("smtp", mail_portal(UserDB(self.home_path), "smtp"), self.throttle, self.clock)

    def start(self, password: str, ip: str = IP) -> Deferred:
        return Deferred.fromCoroutine(
            self.logins.login(PlainCredentials(ALICE.encode(), password.encode()), ip, "AUTH PLAIN"))

    async def test_a_right_password_gives_the_user(self):
        self.throttle.failed(IP)
        result = await self.start(PASSWORD)
        self.assertEqual(result.user.address, ALICE)
        self.assertIsNone(result.refusal)
        self.assertNotIn(IP, self.throttle.failures)  # success forgets earlier failures

    async def test_a_wrong_password_is_answered_after_the_throttles_delay(self):
        answered = self.start("wrong")
        await until(lambda: self.clock.getDelayedCalls(), "the failure to be counted")
        self.assertEqual(len(self.throttle.failures[IP]), 1)
        self.clock.advance(0.99)
        self.assertNoResult(answered)
        self.clock.advance(0.01)
        self.assertEqual(self.successResultOf(answered), LoginResult(refusal=Refusal.WRONG))

    async def test_wrong_passwords_block_the_address_after_the_limit(self):
        for _ in range(3):
            answered = self.start("wrong")
            await until(lambda: self.clock.getDelayedCalls(), "the failure to be counted")
            self.clock.advance(MAX_DELAY)
            self.assertEqual(self.successResultOf(answered).refusal, Refusal.WRONG)
        self.assertTrue(self.logins.blocked(IP))
        self.assertFalse(self.logins.blocked(OTHER_IP))

    async def test_a_blocked_address_is_refused_without_asking_the_store(self):
        for _ in range(3):
            self.throttle.failed(IP)
        break_store(self.home_path)  # asking the store would give UNAVAILABLE
        with capturedLogs() as events:
            result = self.successResultOf(self.start(PASSWORD))
        self.assertEqual(result, LoginResult(refusal=Refusal.BLOCKED))
        self.assertEqual([event.get("log_failure") for event in events], [None])
        self.assertEqual(len(self.throttle.failures[IP]), 0)  # not counted again

    async def test_a_store_that_fails_gives_unavailable_and_counts_nothing(self):
        break_store(self.home_path)
        with capturedLogs() as events:
            result = await self.start(PASSWORD)
        self.assertEqual(result, LoginResult(refusal=Refusal.UNAVAILABLE))
        self.assertEqual(self.throttle.failures, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(any(event.get("log_failure") is not None for event in events))

    async def test_log_lines_never_contain_the_password(self):
        with capturedLogs() as events:
            await self.start(PASSWORD)
            answered = self.start("WrongSecret-42")
            await until(lambda: self.clock.getDelayedCalls(), "the failure to be counted")
            self.clock.advance(MAX_DELAY)
            self.successResultOf(answered)
            for _ in range(2):
                self.throttle.failed(IP)
            self.successResultOf(self.start("BlockedSecret-42"))
        lines = [formatEvent(event) for event in events]
        self.assertEqual(len(lines), 3, lines)
        for line in lines:
            self.assertIn(ALICE, line)
            for secret in (PASSWORD, "WrongSecret-42", "BlockedSecret-42"):
                self.assertNotIn(secret, line)
