"""The POP3 server in memory: POP3Server over StringTransport (tests/support/memory.py),
with real vpasswd users, real Maildirs, the real login flow and a task.Clock.

What a client sees is asserted byte for byte; what the Maildir shows, file by file.
TLS (STLS, pop3s) is tested against a real server in tests/blackbox/test_pop3_clients.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from twisted.trial.unittest import TestCase

from qtwist.login import MAX_DELAY
from qtwist.pop3d import crlf_chunks, dot_stuffed, top_chunks
from qtwist.users import NO_POP, NO_RELAY, UserDB
from tests.support.home import DOMAIN, PASSWORD, make_home, set_flags
from tests.support.memory import MemoryHome, POP3Client, POP3Rig, wait_for

ALICE = f"alice@{DOMAIN}"
OK = b"+OK\r\n"
REFUSED = b"-ERR [AUTH] authorization failed\r\n"
BLOCKED = b"-ERR [SYS/TEMP] too many failed logins from your address, try again later\r\n"
LIFETIME = 10800  # relaygrantlifetime's default

# LF line ends as qmail-local writes them; a dot line, a lone dot, a CRLF line.
MESSAGE = (b"From: bob@example.net\n"
           b"Subject: dots\n"
           b"\n"
           b"first line\n"
           b".leading dot\n"
           b".\n"
           b"already crlf\r\n"
           b"last line\n")
MESSAGE_AS_SENT = (b"From: bob@example.net\r\n"
                   b"Subject: dots\r\n"
                   b"\r\n"
                   b"first line\r\n"
                   b".leading dot\r\n"
                   b".\r\n"
                   b"already crlf\r\n"
                   b"last line\r\n")


def as_sent(raw: bytes) -> bytes:
    return b"".join(crlf_chunks(io.BytesIO(raw)))


# -- message text as sent -----------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\r\nb", b"a\r\nb\r\n"),
    (b"a\r", b"a\r\n"),
    (b"", b""),
    (b"\n\n", b"\r\n\r\n"),
])
def test_crlf_chunks_end_every_line_with_crlf(raw: bytes, expected: bytes) -> None:
    assert as_sent(raw) == expected


def test_crlf_chunks_keep_a_crlf_split_between_two_reads() -> None:
    raw = b"x" * 9 + b"\r\nnext\n"
    chunks = list(crlf_chunks(io.BytesIO(raw), chunk_size=10))
    assert b"".join(chunks) == b"x" * 9 + b"\r\nnext\r\n"
    assert all(not chunk.endswith(b"\r") for chunk in chunks)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 65536])
def test_top_cuts_after_the_requested_body_lines_whatever_the_chunking(chunk_size: int) -> None:
    def top(lines: int) -> bytes:
        return b"".join(top_chunks(crlf_chunks(io.BytesIO(MESSAGE), chunk_size), lines))
    assert top(0) == b"From: bob@example.net\r\nSubject: dots\r\n\r\n"
    assert top(2) == b"From: bob@example.net\r\nSubject: dots\r\n\r\nfirst line\r\n.leading dot\r\n"
    assert top(100) == MESSAGE_AS_SENT


def test_top_of_a_message_without_body_is_the_whole_message() -> None:
    assert b"".join(top_chunks(iter([b"Subject: x\r\n"]), 3)) == b"Subject: x\r\n"


def test_dot_stuffing_doubles_leading_dots_across_chunks() -> None:
    stuffed = b"".join(dot_stuffed(iter([b".a\r\n", b".b\r\nc\r\n.", b"d\r\n"])))
    assert stuffed == b"..a\r\n..b\r\nc\r\n..d\r\n.\r\n"


# -- the server in memory -----------------------------------------------------------------------

class StoreDown(Exception):
    """The user database cannot be reached."""


class UnreachableUserDB(UserDB):
    """A user store whose every password check fails (a database outage)."""

    def authenticate(self, address: str, password: str):
        raise StoreDown("the user database is down")


class POP3TestCase(TestCase):
    """A home with alice and bob (clear-text passwords kept, for APOP) and its POP3 server."""

    def setUp(self) -> None:
        path = Path(tempfile.mkdtemp(prefix="qtwist-pop3d-"))
        self.addCleanup(shutil.rmtree, path, True)
        make_home(path, cleartext=True)
        self.home = MemoryHome(path)
        self.maildir = path / "domains" / DOMAIN / "alice" / "Maildir"
        self.rig = POP3Rig(self.home)

    # -- setting up ---------------------------------------------------------------------------

    def control(self, name: str, text: str) -> None:
        (self.home.path / "control" / name).write_text(text)
        self.home.reload()

    def drop(self, raw: bytes, name: str = "1000000000.P1Q1.mx.example.test", mtime: float | None = None,
             folder: str = "new") -> Path:
        """Deliver as a delivery agent does: tmp/ then rename."""
        tmp = self.maildir / "tmp" / name.split(":")[0]
        tmp.write_bytes(raw)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        final = self.maildir / folder / name
        os.rename(tmp, final)
        return final

    def files(self) -> list[str]:
        """What the Maildir holds, as folder/name."""
        return sorted(f"{folder}/{name}" for folder in ("new", "cur", "tmp")
                      for name in os.listdir(self.maildir / folder))

    def granted(self) -> list[str]:
        """The client IPs with a live POP-before-SMTP grant."""
        return [ip for ip, _ in self.home.grants.list() if self.home.grants.is_live(ip, LIFETIME)]

    # -- talking ------------------------------------------------------------------------------

    async def greeted_with_timestamp(self, ip: str = "127.0.0.1") -> tuple[POP3Client, str]:
        client = self.rig.connect(ip)
        greeting = await client.wait()
        match = re.fullmatch(rb"\+OK (<[^<>@\s]+@mx\.example\.test>)\r\n", greeting)
        self.assertIsNotNone(match, greeting)
        return client, match.group(1).decode()

    async def login(self, ip: str = "127.0.0.1", user: str = ALICE) -> POP3Client:
        client = await self.rig.greeted(ip)
        self.assertEqual(await client.ask(f"USER {user}"), OK)
        self.assertEqual(await client.ask(f"PASS {PASSWORD}"), OK)
        return client

    async def quit(self, client: POP3Client, reply: bytes = OK) -> None:
        self.assertEqual(await client.ask("QUIT"), reply)
        self.assertTrue(client.closed)

    async def held_back(self, client: POP3Client, line: str) -> None:
        """Send a login that fails, and wait until the password check (in a thread) has
        set the throttle's delay on the clock; nothing is answered before it passes."""
        clock = self.home.clock
        pending = len(clock.getDelayedCalls())
        client.send(line + "\r\n")
        await wait_for(lambda: len(clock.getDelayedCalls()) > pending or client.output[client.read:],
                       "the failed-login throttle to delay the answer")
        self.assertEqual(client.output[client.read:], b"", "answered without the throttle's delay")

    async def refused_late(self, client: POP3Client, line: str) -> bytes:
        """The answer to a failing login, once the throttle's delay has passed."""
        await self.held_back(client, line)
        self.home.clock.advance(MAX_DELAY)
        return await client.wait()


class POP3LoginTests(POP3TestCase):

    async def test_user_and_pass_log_in_after_a_greeting_with_an_apop_timestamp(self) -> None:
        client, _ = await self.greeted_with_timestamp()
        self.assertEqual(await client.ask(f"USER {ALICE}"), OK)
        self.assertEqual(await client.ask(f"PASS {PASSWORD}"), OK)
        self.assertEqual(await client.ask("STAT"), b"+OK 0 0\r\n")
        await self.quit(client)

    async def test_user_percent_domain_logs_in_as_user_at_domain(self) -> None:
        self.drop(MESSAGE)
        client = await self.login(user=f"alice%{DOMAIN}")
        self.assertEqual(await client.ask("STAT"), b"+OK 1 %d\r\n" % len(MESSAGE_AS_SENT))

    async def test_wrong_password_is_refused_after_a_delay_and_grants_nothing(self) -> None:
        client = await self.rig.greeted()
        await client.ask(f"USER {ALICE}")
        await self.held_back(client, "PASS wrong")
        self.home.clock.advance(0.9)
        self.assertEqual(client.output[client.read:], b"")
        self.home.clock.advance(0.1)
        self.assertEqual(await client.wait(), REFUSED)
        self.assertEqual(await client.ask("STAT"), b"-ERR STAT is not valid in the AUTHORIZATION state\r\n")
        self.assertEqual(self.granted(), [])

    async def test_ip_that_failed_too_often_is_refused_without_a_password_check(self) -> None:
        self.control("authfaillimit", "2\n")
        self.control("authfailblock", "600\n")
        client, timestamp = await self.greeted_with_timestamp()
        for _ in range(2):
            await client.ask(f"USER {ALICE}")
            self.assertEqual(await self.refused_late(client, "PASS wrong"), REFUSED)
        # The right password and the right APOP digest, answered at once without a look at either.
        await client.ask(f"USER {ALICE}")
        self.assertEqual(await client.ask(f"PASS {PASSWORD}"), BLOCKED)
        digest = hashlib.md5((timestamp + PASSWORD).encode()).hexdigest()
        self.assertEqual(await client.ask(f"APOP {ALICE} {digest}"), BLOCKED)
        self.assertEqual(self.granted(), [])

        other = await self.login("127.0.0.2")
        await self.quit(other)
        self.assertEqual(self.granted(), ["127.0.0.2"])

        self.home.clock.advance(600)
        await self.quit(await self.login())

    async def test_good_login_forgets_earlier_failures(self) -> None:
        self.control("authfaillimit", "2\n")
        client = await self.rig.greeted()
        await client.ask(f"USER {ALICE}")
        self.assertEqual(await self.refused_late(client, "PASS wrong"), REFUSED)
        await client.ask(f"USER {ALICE}")
        self.assertEqual(await client.ask(f"PASS {PASSWORD}"), OK)
        await self.quit(client)

        client = await self.rig.greeted()
        await client.ask(f"USER {ALICE}")
        self.assertEqual(await self.refused_late(client, "PASS wrong"), REFUSED)
        await client.ask(f"USER {ALICE}")
        self.assertEqual(await client.ask(f"PASS {PASSWORD}"), OK)

    async def test_unknown_user_is_answered_like_a_wrong_password(self) -> None:
        client = await self.rig.greeted()
        self.assertEqual(await client.ask(f"USER nobody@{DOMAIN}"), OK)
        self.assertEqual(await self.refused_late(client, f"PASS {PASSWORD}"), REFUSED)

    async def test_user_without_pop_rights_is_refused_like_a_wrong_password(self) -> None:
        set_flags(self.home.path, ALICE, NO_POP)
        client = await self.rig.greeted()
        await client.ask(f"USER {ALICE}")
        self.assertEqual(await self.refused_late(client, f"PASS {PASSWORD}"), REFUSED)
        self.assertEqual(self.granted(), [])

    async def test_pass_before_user_is_refused(self) -> None:
        client = await self.rig.greeted()
        self.assertEqual(await client.ask(f"PASS {PASSWORD}"), b"-ERR USER first\r\n")
        self.assertEqual(await client.ask("STAT"), b"-ERR STAT is not valid in the AUTHORIZATION state\r\n")

    async def test_stat_before_login_is_refused(self) -> None:
        client = await self.rig.greeted()
        self.assertEqual(await client.ask("STAT"), b"-ERR STAT is not valid in the AUTHORIZATION state\r\n")
        await self.quit(client)

    async def test_login_records_a_relay_grant_for_the_client_ip(self) -> None:
        self.assertEqual(self.granted(), [])
        await self.quit(await self.login("127.0.0.3"))
        self.assertEqual(self.granted(), ["127.0.0.3"])

    async def test_login_from_an_ipv4_mapped_address_grants_the_ipv4_address(self) -> None:
        await self.login("::ffff:127.0.0.5")
        self.assertEqual(self.granted(), ["127.0.0.5"])

    async def test_failures_from_an_ipv4_mapped_address_block_the_ipv4_address(self) -> None:
        self.control("authfaillimit", "1\n")
        client = await self.rig.greeted("::ffff:127.0.0.6")
        await client.ask(f"USER {ALICE}")
        self.assertEqual(await self.refused_late(client, "PASS wrong"), REFUSED)
        client = await self.rig.greeted("127.0.0.6")
        await client.ask(f"USER {ALICE}")
        self.assertEqual(await client.ask(f"PASS {PASSWORD}"), BLOCKED)

    async def test_user_without_relay_rights_logs_in_but_gets_no_grant(self) -> None:
        set_flags(self.home.path, ALICE, NO_RELAY)
        self.drop(MESSAGE)
        client = await self.login()
        self.assertEqual(await client.ask("STAT"), b"+OK 1 %d\r\n" % len(MESSAGE_AS_SENT))
        self.assertEqual(self.granted(), [])

    async def test_apop_with_the_greetings_timestamp_logs_in_and_grants_relaying(self) -> None:
        self.drop(MESSAGE)
        client, timestamp = await self.greeted_with_timestamp("127.0.0.4")
        digest = hashlib.md5((timestamp + PASSWORD).encode()).hexdigest()
        self.assertEqual(await client.ask(f"APOP {ALICE} {digest}"), OK)
        self.assertEqual(await client.ask("STAT"), b"+OK 1 %d\r\n" % len(MESSAGE_AS_SENT))
        self.assertEqual(self.granted(), ["127.0.0.4"])

    async def test_apop_with_a_wrong_digest_is_refused(self) -> None:
        client, timestamp = await self.greeted_with_timestamp()
        digest = hashlib.md5((timestamp + "wrong").encode()).hexdigest()
        self.assertEqual(await self.refused_late(client, f"APOP {ALICE} {digest}"), REFUSED)
        self.assertEqual(self.granted(), [])

    async def test_second_session_on_a_locked_maildrop_is_refused_until_the_first_ends(self) -> None:
        first = await self.login()
        second = await self.rig.greeted()
        await second.ask(f"USER {ALICE}")
        self.assertEqual(await second.ask(f"PASS {PASSWORD}"), b"-ERR [IN-USE] maildrop already locked\r\n")
        await self.quit(first)
        await second.ask(f"USER {ALICE}")
        self.assertEqual(await second.ask(f"PASS {PASSWORD}"), OK)

    async def test_dropped_session_releases_the_lock(self) -> None:
        (await self.login()).hang_up()
        await self.quit(await self.login())

    async def test_user_store_failure_is_a_temporary_error_not_counted_by_the_throttle(self) -> None:
        self.control("authfaillimit", "2\n")
        broken = POP3Rig(self.home, users=UnreachableUserDB(self.home.path))
        client = await broken.greeted()
        for _ in range(3):
            await client.ask(f"USER {ALICE}")
            self.assertEqual(await client.ask(f"PASS {PASSWORD}"),
                             b"-ERR [SYS/TEMP] unable to check the password now, try again later\r\n")
        self.assertEqual(len(self.flushLoggedErrors(StoreDown)), 3)
        self.assertEqual(self.granted(), [])
        await self.quit(await self.login())  # the same address, not locked out

    async def test_capa_lists_user_only_before_login_and_never_stls_without_tls(self) -> None:
        client = await self.rig.greeted()
        self.assertEqual(await client.ask("CAPA", multiline=True),
                         b"+OK capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nPIPELINING\r\nRESP-CODES\r\n"
                         b"AUTH-RESP-CODE\r\nIMPLEMENTATION qtwist\r\n.\r\n")
        self.assertEqual(await client.ask("STLS"), b"-ERR STLS not available\r\n")
        await client.ask(f"USER {ALICE}")
        await client.ask(f"PASS {PASSWORD}")
        self.assertEqual(await client.ask("CAPA", multiline=True),
                         b"+OK capability list follows\r\nTOP\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\n"
                         b"AUTH-RESP-CODE\r\nIMPLEMENTATION qtwist\r\n.\r\n")

    async def test_pop3requiretls_refuses_user_and_pass_in_the_clear_but_not_apop(self) -> None:
        self.control("pop3requiretls", "1\n")
        client, timestamp = await self.greeted_with_timestamp()
        self.assertEqual(await client.ask("CAPA", multiline=True),
                         b"+OK capability list follows\r\nTOP\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\n"
                         b"AUTH-RESP-CODE\r\nIMPLEMENTATION qtwist\r\n.\r\n")
        self.assertEqual(await client.ask(f"USER {ALICE}"), b"-ERR [AUTH] use STLS before logging in\r\n")
        self.assertEqual(await client.ask(f"PASS {PASSWORD}"), b"-ERR [AUTH] use STLS before logging in\r\n")
        self.assertEqual(self.granted(), [])
        # APOP sends a digest, never the password.
        digest = hashlib.md5((timestamp + PASSWORD).encode()).hexdigest()
        self.assertEqual(await client.ask(f"APOP {ALICE} {digest}"), OK)
        self.assertEqual(self.granted(), ["127.0.0.1"])


class POP3MaildropTests(POP3TestCase):

    async def test_stat_list_retr_are_byte_exact_with_crlf_and_dot_lines(self) -> None:
        self.drop(MESSAGE)
        size = len(MESSAGE_AS_SENT)
        client = await self.login()
        self.assertEqual(await client.ask("STAT"), b"+OK 1 %d\r\n" % size)
        self.assertEqual(await client.ask("LIST", multiline=True), b"+OK 1 messages\r\n1 %d\r\n.\r\n" % size)
        self.assertEqual(await client.ask("LIST 1"), b"+OK 1 %d\r\n" % size)
        self.assertEqual(await client.ask("RETR 1", multiline=True),
                         b"+OK message follows\r\n"
                         b"From: bob@example.net\r\n"
                         b"Subject: dots\r\n"
                         b"\r\n"
                         b"first line\r\n"
                         b"..leading dot\r\n"
                         b"..\r\n"
                         b"already crlf\r\n"
                         b"last line\r\n"
                         b".\r\n")

    async def test_retr_sends_a_large_message_intact(self) -> None:
        # Many chunks long, with a CRLF straddling the first 64 KiB chunk boundary.
        head = b"Subject: big\n\n" + (b"x" * 99 + b"\n") * 655
        head += b"z" * (65535 - len(head))
        raw = head + b"\r\n" + b".dot\nline\n" * 300000
        self.drop(raw)
        crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        client = await self.login()
        self.assertEqual(await client.ask("LIST 1"), b"+OK 1 %d\r\n" % len(crlf))
        reply = await client.ask("RETR 1", multiline=True)
        self.assertEqual(len(reply), len(b"+OK message follows\r\n") + len(crlf) + 300000 + len(b".\r\n"))
        self.assertTrue(reply == b"+OK message follows\r\n" + crlf.replace(b"\r\n.", b"\r\n..") + b".\r\n")

    async def test_top_sends_the_header_and_the_first_body_lines(self) -> None:
        self.drop(MESSAGE)
        client = await self.login()
        self.assertEqual(await client.ask("TOP 1 0", multiline=True),
                         b"+OK message follows\r\nFrom: bob@example.net\r\nSubject: dots\r\n\r\n.\r\n")
        self.assertEqual(await client.ask("TOP 1 2", multiline=True),
                         b"+OK message follows\r\nFrom: bob@example.net\r\nSubject: dots\r\n\r\n"
                         b"first line\r\n..leading dot\r\n.\r\n")

    async def test_messages_are_numbered_by_delivery_time(self) -> None:
        self.drop(b"Subject: newer\n\nb\n", "1000.a.host", mtime=2_000_000_000)
        self.drop(b"Subject: older\n\na\n", "2000.b.host", mtime=1_000_000_000)
        client = await self.login()
        self.assertEqual(await client.ask("TOP 1 0", multiline=True),
                         b"+OK message follows\r\nSubject: older\r\n\r\n.\r\n")
        self.assertEqual(await client.ask("UIDL", multiline=True),
                         b"+OK unique-id listing follows\r\n1 2000.b.host\r\n2 1000.a.host\r\n.\r\n")

    async def test_uidl_is_the_maildir_unique_name_and_stable_across_sessions(self) -> None:
        self.drop(MESSAGE, "1000000000.M1P2Q3.mx.example.test")

        async def session() -> tuple[bytes, bytes]:
            client = await self.login()
            listing = await client.ask("UIDL", multiline=True)
            one = await client.ask("UIDL 1")
            await client.ask("RETR 1", multiline=True)  # flags it seen at QUIT: a rename
            await self.quit(client)
            return listing, one

        first = await session()
        self.assertEqual(first, (b"+OK unique-id listing follows\r\n1 1000000000.M1P2Q3.mx.example.test\r\n.\r\n",
                                 b"+OK 1 1000000000.M1P2Q3.mx.example.test\r\n"))
        self.assertEqual(self.files(), ["cur/1000000000.M1P2Q3.mx.example.test:2,S"])
        self.assertEqual(await session(), first)

    async def test_uidl_of_a_name_outside_rfc_1939s_characters_is_a_digest_of_it(self) -> None:
        self.drop(MESSAGE, "1000.odd name.host")
        client = await self.login()
        self.assertEqual(await client.ask("UIDL 1"),
                         b"+OK 1 %s\r\n" % hashlib.md5(b"1000.odd name.host").hexdigest().encode())

    async def test_login_moves_new_to_cur_and_quit_flags_retrieved_messages_seen(self) -> None:
        self.drop(MESSAGE, "1000.fresh.host", mtime=1_000_000_000)
        self.drop(MESSAGE, "2000.flagged.host:2,FT", mtime=2_000_000_000, folder="cur")
        (self.maildir / "new" / ".hidden").write_bytes(b"not mail")
        (self.maildir / "tmp" / "3000.partial.host").write_bytes(b"half a delivery")
        client = await self.login()
        self.assertEqual(self.files(), ["cur/1000.fresh.host:2,", "cur/2000.flagged.host:2,FT", "new/.hidden",
                                        "tmp/3000.partial.host"])
        self.assertEqual(await client.ask("STAT"), b"+OK 2 %d\r\n" % (2 * len(MESSAGE_AS_SENT)))
        await client.ask("RETR 1", multiline=True)
        await client.ask("RETR 2", multiline=True)
        self.assertEqual(self.files(), ["cur/1000.fresh.host:2,", "cur/2000.flagged.host:2,FT", "new/.hidden",
                                        "tmp/3000.partial.host"])
        await self.quit(client)
        self.assertEqual(self.files(), ["cur/1000.fresh.host:2,S", "cur/2000.flagged.host:2,FST", "new/.hidden",
                                        "tmp/3000.partial.host"])

    async def test_symlinks_in_the_maildir_are_not_messages(self) -> None:
        secret = self.home.path / "secret"
        secret.write_bytes(b"not for POP3 clients\n")
        (self.maildir / "new" / "1000.link.host").symlink_to(secret)
        (self.maildir / "cur" / "1001.link.host:2,").symlink_to(secret)
        client = await self.login()
        self.assertEqual(await client.ask("STAT"), b"+OK 0 0\r\n")
        self.assertEqual(await client.ask("LIST", multiline=True), b"+OK 0 messages\r\n.\r\n")
        self.assertEqual(await client.ask("RETR 1"), b"-ERR no such message\r\n")

    async def test_message_replaced_by_a_symlink_during_the_session_is_not_sent(self) -> None:
        secret = self.home.path / "secret"
        secret.write_bytes(b"not for POP3 clients\n")
        self.drop(MESSAGE, "1000.swapped.host")
        client = await self.login()
        listed = self.maildir / "cur" / "1000.swapped.host:2,"
        listed.unlink()
        listed.symlink_to(secret)
        self.assertEqual(await client.ask("RETR 1"), b"-ERR unable to open that message\r\n")
        self.assertEqual(await client.ask("TOP 1 0"), b"-ERR unable to open that message\r\n")

    async def test_top_does_not_mark_the_message_seen(self) -> None:
        self.drop(MESSAGE, "1000.top.host")
        client = await self.login()
        await client.ask("TOP 1 1", multiline=True)
        await self.quit(client)
        self.assertEqual(self.files(), ["cur/1000.top.host:2,"])

    async def test_dele_then_quit_removes_the_file(self) -> None:
        self.drop(b"Subject: keep\n\nk\n", "1000.keep.host", mtime=1_000_000_000)
        self.drop(b"Subject: remove\n\nr\n", "2000.remove.host", mtime=2_000_000_000)
        client = await self.login()
        self.assertEqual(await client.ask("DELE 2"), b"+OK message 2 deleted\r\n")
        self.assertEqual(await client.ask("STAT"), b"+OK 1 20\r\n")
        self.assertEqual(self.files(), ["cur/1000.keep.host:2,", "cur/2000.remove.host:2,"])
        await self.quit(client)
        self.assertEqual(self.files(), ["cur/1000.keep.host:2,"])
        client = await self.login()
        self.assertEqual(await client.ask("TOP 1 0", multiline=True),
                         b"+OK message follows\r\nSubject: keep\r\n\r\n.\r\n")

    async def test_dele_then_a_dropped_connection_removes_nothing(self) -> None:
        self.drop(MESSAGE, "1000.dele.host")
        client = await self.login()
        await client.ask("DELE 1")
        client.hang_up()
        self.assertEqual(self.files(), ["cur/1000.dele.host:2,"])
        client = await self.login()
        self.assertEqual(await client.ask("STAT"), b"+OK 1 %d\r\n" % len(MESSAGE_AS_SENT))

    async def test_retr_then_a_dropped_connection_flags_nothing(self) -> None:
        self.drop(MESSAGE, "1000.retr.host")
        client = await self.login()
        await client.ask("RETR 1", multiline=True)
        client.hang_up()
        self.assertEqual(self.files(), ["cur/1000.retr.host:2,"])

    async def test_connection_dropped_during_retr_keeps_the_message_and_frees_the_lock(self) -> None:
        self.drop(b"Subject: big\n\n" + b"line of a long message\n" * 200000, "1000.big.host")
        client = await self.login()
        await client.ask("DELE 1")
        await client.ask("RSET")
        client.send("RETR 1\r\n")
        await wait_for(lambda: client.output.endswith(b"+OK message follows\r\n"), "RETR to start")
        client.hang_up()  # before the client has read the message
        self.assertEqual(self.files(), ["cur/1000.big.host:2,"])
        client = await self.login()
        self.assertEqual(await client.ask("LIST", multiline=True),
                         b"+OK 1 messages\r\n1 %d\r\n.\r\n" % (len(b"Subject: big\r\n\r\n") + 200000 * 24))

    async def test_rset_undeletes(self) -> None:
        self.drop(MESSAGE, "1000.rset.host")
        client = await self.login()
        await client.ask("DELE 1")
        self.assertEqual(await client.ask("RETR 1"), b"-ERR message 1 already deleted\r\n")
        self.assertEqual(await client.ask("STAT"), b"+OK 0 0\r\n")
        self.assertEqual(await client.ask("RSET"), b"+OK 1 messages\r\n")
        self.assertEqual(await client.ask("STAT"), b"+OK 1 %d\r\n" % len(MESSAGE_AS_SENT))
        await self.quit(client)
        self.assertEqual(self.files(), ["cur/1000.rset.host:2,"])

    async def test_deleted_message_cannot_be_deleted_listed_or_read_again(self) -> None:
        self.drop(MESSAGE)
        client = await self.login()
        self.assertEqual(await client.ask("DELE 1"), b"+OK message 1 deleted\r\n")
        for command in ("DELE 1", "LIST 1", "UIDL 1", "TOP 1 0", "RETR 1"):
            self.assertEqual(await client.ask(command), b"-ERR message 1 already deleted\r\n", command)
        self.assertEqual(await client.ask("LIST", multiline=True), b"+OK 0 messages\r\n.\r\n")
        self.assertEqual(await client.ask("UIDL", multiline=True), b"+OK unique-id listing follows\r\n.\r\n")

    async def test_dele_notes_the_freed_sizes_in_maildirsize(self) -> None:
        self.drop(b"Subject: sized\n\ns\n", "1000.sized.host,S=4321", mtime=1_000_000_000)
        self.drop(MESSAGE, "2000.plain.host", mtime=2_000_000_000)
        (self.maildir / "maildirsize").write_text("1000000S\n4321 1\n120 1\n")
        client = await self.login()
        await client.ask("DELE 1")
        await client.ask("DELE 2")
        await self.quit(client)
        self.assertEqual(self.files(), [])
        self.assertEqual((self.maildir / "maildirsize").read_text(),
                         f"1000000S\n4321 1\n120 1\n-4321 -1\n-{len(MESSAGE)} -1\n")

    async def test_dele_starts_no_maildirsize(self) -> None:
        self.drop(MESSAGE)
        client = await self.login()
        await client.ask("DELE 1")
        await self.quit(client)
        self.assertFalse((self.maildir / "maildirsize").exists())

    async def test_quit_says_so_when_a_deleted_message_cannot_be_removed(self) -> None:
        self.drop(b"Subject: keep\n\nk\n", "1000.stuck.host", mtime=1_000_000_000)
        self.drop(b"Subject: remove\n\nr\n", "2000.gone.host", mtime=2_000_000_000)
        client = await self.login()
        await client.ask("DELE 1")
        await client.ask("DELE 2")
        stuck = self.maildir / "cur" / "1000.stuck.host:2,"
        stuck.unlink()
        stuck.mkdir()  # a name unlink() cannot remove, whoever runs the test
        await self.quit(client, b"-ERR some deleted messages not removed\r\n")
        self.assertEqual(self.files(), ["cur/1000.stuck.host:2,"])
        await self.quit(await self.login())  # the lock was released all the same


class POP3SessionTests(POP3TestCase):

    async def test_bad_message_numbers_and_syntax_errors_get_err(self) -> None:
        self.drop(MESSAGE)
        client = await self.login()
        for command, reply in [("RETR 0", b"-ERR no such message"),
                               ("RETR 2", b"-ERR no such message"),
                               ("LIST 9", b"-ERR no such message"),
                               ("UIDL 3", b"-ERR no such message"),
                               ("TOP 2 0", b"-ERR no such message"),
                               ("RETR", b"-ERR syntax error"),
                               ("RETR x", b"-ERR syntax error"),
                               ("DELE -1", b"-ERR syntax error"),
                               ("DELE 1x", b"-ERR syntax error"),
                               ("TOP 1", b"-ERR syntax error"),
                               ("TOP 1 x", b"-ERR syntax error")]:
            self.assertEqual(await client.ask(command), reply + b"\r\n", command)
        self.assertEqual(await client.ask("STAT"), b"+OK 1 %d\r\n" % len(MESSAGE_AS_SENT))

    async def test_login_syntax_errors_get_err(self) -> None:
        client = await self.rig.greeted()
        self.assertEqual(await client.ask("USER"), b"-ERR syntax error\r\n")
        self.assertEqual(await client.ask("USER  "), b"-ERR syntax error\r\n")
        self.assertEqual(await client.ask(f"APOP {ALICE}"), b"-ERR syntax error\r\n")
        self.assertEqual(await client.ask("APOP"), b"-ERR syntax error\r\n")

    async def test_unknown_command_is_unimplemented(self) -> None:
        client = await self.rig.greeted()
        self.assertEqual(await client.ask("XYZZY"), b"-ERR unimplemented\r\n")
        self.assertEqual(await client.ask("AUTH PLAIN"), b"-ERR unimplemented\r\n")
        self.assertEqual(await client.ask("noop"), OK)

    async def test_commands_in_the_wrong_state_are_refused(self) -> None:
        self.drop(MESSAGE)
        client = await self.rig.greeted()
        for verb in ("RETR 1", "DELE 1", "LIST", "UIDL", "TOP 1 0", "RSET"):
            self.assertEqual(await client.ask(verb),
                             b"-ERR %s is not valid in the AUTHORIZATION state\r\n" % verb.split()[0].encode())
        await client.ask(f"USER {ALICE}")
        await client.ask(f"PASS {PASSWORD}")
        for verb in ("USER", "PASS", "APOP", "STLS"):
            self.assertEqual(await client.ask(f"{verb} x y"),
                             b"-ERR %s is not valid in the TRANSACTION state\r\n" % verb.encode())
        self.assertEqual(self.files(), ["cur/1000000000.P1Q1.mx.example.test:2,"])

    async def test_pipelined_commands_are_answered_in_order(self) -> None:
        self.drop(MESSAGE)
        size = len(MESSAGE_AS_SENT)
        client = await self.rig.greeted()
        client.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\nUIDL 1\r\nLIST\r\nTOP 1 0\r\nDELE 1\r\n"
                    f"NOOP\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(await client.wait(), OK)
        self.assertEqual(await client.wait(), OK)
        self.assertEqual(await client.wait(), b"+OK 1 %d\r\n" % size)
        self.assertEqual(await client.wait(), b"+OK 1 1000000000.P1Q1.mx.example.test\r\n")
        self.assertEqual(await client.wait(multiline=True), b"+OK 1 messages\r\n1 %d\r\n.\r\n" % size)
        self.assertEqual(await client.wait(multiline=True),
                         b"+OK message follows\r\nFrom: bob@example.net\r\nSubject: dots\r\n\r\n.\r\n")
        self.assertEqual(await client.wait(), b"+OK message 1 deleted\r\n")
        self.assertEqual(await client.wait(), OK)
        self.assertEqual(await client.wait(), OK)
        self.assertTrue(client.closed)
        self.assertEqual(client.output[client.read:], b"")  # nothing after QUIT's answer
        self.assertEqual(self.files(), [])

    async def test_commands_may_end_in_a_bare_lf_and_arrive_in_pieces(self) -> None:
        client = await self.rig.greeted()
        client.send("NOOP\n")
        self.assertEqual(await client.wait(), OK)
        client.send("NO")
        client.send("OP\r")
        client.send("\n")
        self.assertEqual(await client.wait(), OK)

    async def test_overlong_line_is_refused_and_the_connection_closed(self) -> None:
        client = await self.rig.greeted()
        self.assertEqual(await client.ask("USER " + "a" * 1000), OK)  # long passwords exist
        self.assertEqual(await client.ask("USER " + "a" * 1100), b"-ERR line too long\r\n")
        self.assertTrue(client.closed)

    async def test_idle_session_is_logged_out_after_the_idle_timeout(self) -> None:
        idle = self.home.settings.timeoutpop3d
        client = await self.login()
        self.home.clock.advance(idle - 1)
        self.assertEqual(await client.ask("NOOP"), OK)  # activity starts the wait again
        self.home.clock.advance(idle - 1)
        self.assertEqual(client.output[client.read:], b"")
        self.assertFalse(client.closed)
        self.home.clock.advance(1)
        self.assertEqual(await client.wait(), b"-ERR autologout time elapsed\r\n")
        self.assertTrue(client.closed)

    async def test_idle_timeout_in_the_middle_of_a_message_cuts_it_unfinished(self) -> None:
        self.drop(b"Subject: big\n\n" + b"y" * 200_000 + b"\n")
        client = await self.login()
        client.send("RETR 1\r\n")
        await wait_for(lambda: client.transport.producer is not None, "the message to start")
        client.transport.producer.resumeProducing()  # the client reads one chunk, then no more
        self.home.clock.advance(self.home.settings.timeoutpop3d)
        self.assertTrue(client.transport.disconnected)
        self.assertNotIn(b"-ERR", client.output)
        self.assertFalse(client.output.endswith(b"\r\n.\r\n"))
