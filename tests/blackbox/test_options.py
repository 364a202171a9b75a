"""twistd's options that only a real process shows: --nameserver and --remote-port."""

from __future__ import annotations

from pathlib import Path

from tests.support.dns import ZoneServer
from tests.support.fakesmtp import FakeSMTP
from tests.support.home import make_home
from tests.support.server import Server


def test_twistd_uses_nameserver_and_remote_port(tmp_path: Path) -> None:
    with FakeSMTP(host="127.0.0.3") as mx:
        dns = ZoneServer({"remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": ["127.0.0.3"]}})
        try:
            home = make_home(tmp_path, tcp_smtp='127.0.0.1:allow,RELAYCLIENT=""\n')
            with Server(home, dns_port=dns.address[1], options=("--remote-port", str(mx.port))) as server:
                with server.smtp() as client:
                    client.sendmail("alice@example.test", ["b@remote.test"], "Subject: options\r\n\r\nhi\r\n")
                sent = mx.wait_for(b"Subject: options\r\n")
                assert sent.accepted == ["b@remote.test"]
        finally:
            dns.stop()
