"""qmail-smtpd's state machine in memory: SMTPServer over StringTransport."""

from __future__ import annotations

import tempfile
import shutil
from pathlib import Path

from twisted.trial.unittest import TestCase

from qtwist.smtpd import SMTPServer
from tests.support.home import make_home, PASSWORD
from tests.support.memory import Home, SMTPRig


class SMTPTests(TestCase):
    def setUp(self) -> None:
        path = Path(tempfile.mkdtemp(prefix="qtwist-smtpd-"))
        self.addCleanup(shutil.rmtree, path, True)
        make_home(path, cleartext=True)
        self.home = Home(path)
        self.rig = SMTPRig(self.home)
        self.addCleanup(self.rig.close)

    async def test_smoke(self) -> None:
        client = await self.rig.greeted()
        replies = await client.ask("EHLO client.test", "MAIL FROM:<a@remote.test>", "RCPT TO:<alice@example.test>",
                                   "DATA")
        self.assertEqual(replies[1:], [b"250 ok", b"250 ok", b"354 go ahead"])
        client.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
        (queued,) = await client.wait(1)
        self.assertTrue(queued.startswith(b"250 ok "), queued)
        self.assertEqual(len(self.rig.queued), 1)
        import base64
        (reply,) = await client.ask("AUTH PLAIN " + base64.b64encode(f"\0alice@example.test\0{PASSWORD}".encode()).decode())
        self.assertEqual(reply, b"235 ok, go ahead (#2.0.0)")
        (reply,) = await client.ask("QUIT")
        self.assertTrue(client.closed)
