"""`twistd qmail`: options and the MultiService they build.

Data flows one way: smtpd → queue → send → local/remote; pop3d → grants → smtpd.
Listeners come from the command line, else control/listeners, else the
built-in defaults; `none` turns one off.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from qtwist.control import LISTENER_NAMES, ControlWatcher
from qtwist.descriptors import RESERVE, DescriptorBudget, check_limits, raise_soft_limit, with_backlog
from qtwist.grants import Grants, GrantsCleaner, SQLGrants, database_down
from qtwist.hooks import Hooks, PluginContext, installed_plugins
from qtwist.limits import Admission
from qtwist.lspawn import LocalSpawn
from qtwist.numbers import decimal
from qtwist.pop3d import POP3Factory
from qtwist.queue import Queue
from qtwist.remote import RemoteDelivery, opportunistic_tls
from qtwist.resolver import Lookups
from qtwist.send import Scheduler
from qtwist.smtpd import SMTPFactory
from qtwist.login import FailureThrottle, Logins, mail_portal
from qtwist.tls import ImplicitTLSFactory, ServerTLS, make_self_signed
from qtwist.periodic import Periodic
from qtwist.sqldb import UserDBError
from qtwist.sqlusers import SQLUserStore
from qtwist.users import IUserStore, open_store

log = Logger(namespace="qtwist.service")

BUILTIN_LISTENERS = {"smtp": ["tcp:25"], "submission": ["tcp:587"], "smtps": ["none"],
                     "pop3": ["tcp:110"], "pop3s": ["none"]}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("qmail-compatible mail server: SMTP, submission, POP3, a durable queue, "
                "Maildir and remote delivery, configured by qmail control files in --home.")
    optParameters = [
        ["home", None, "/var/qtwist", "The home directory (control/, domains/, queue/, ...)."],
        ["nameserver", None, None, "DNS server HOST[:PORT] for MX/A/TXT look-ups (default: system resolver)."],
        ["remote-port", None, 25, "Port used when delivering to MX hosts.", int],
    ]

    def __init__(self):
        super().__init__()
        self["listeners"] = {}

    def _listener(self, name: str, endpoint: str) -> None:
        self["listeners"].setdefault(name, []).append(endpoint)

    def opt_smtp(self, endpoint: str) -> None:
        """MX/relay listener endpoint (default tcp:25; 'none' disables; repeat to add)."""
        self._listener("smtp", endpoint)

    def opt_submission(self, endpoint: str) -> None:
        """Submission listener: AUTH required (default tcp:587)."""
        self._listener("submission", endpoint)

    def opt_smtps(self, endpoint: str) -> None:
        """Implicit-TLS SMTP listener (default none)."""
        self._listener("smtps", endpoint)

    def opt_pop3(self, endpoint: str) -> None:
        """POP3 listener (default tcp:110)."""
        self._listener("pop3", endpoint)

    def opt_pop3s(self, endpoint: str) -> None:
        """Implicit-TLS POP3 listener (default none)."""
        self._listener("pop3s", endpoint)

    def postOptions(self) -> None:
        nameserver = self["nameserver"]
        if nameserver:
            host, _, port_text = nameserver.rpartition(":") if nameserver.count(":") == 1 else (nameserver, "", "")
            port = decimal(port_text)
            if port is None:
                host, port = nameserver, 53
            self["nameserver"] = (host.strip("[]"), port)
        if not Path(self["home"]).is_dir():
            raise usage.UsageError(f"--home {self['home']}: no such directory")


def listener_endpoints(cli: dict[str, list[str]], configured: tuple[tuple[str, str], ...]) -> dict[str, list[str]]:
    """Command line over control/listeners over the built-in defaults; 'none' entries dropped."""
    from_file: dict[str, list[str]] = {}
    for name, endpoint in configured:
        from_file.setdefault(name, []).append(endpoint)
    chosen = {}
    for name in LISTENER_NAMES:
        endpoints = cli.get(name) or from_file.get(name) or BUILTIN_LISTENERS[name]
        chosen[name] = [e for e in endpoints if e.strip().lower() != "none"]
    return chosen


# Worker threads (the queue's writer, password checks, DNS) hold the GIL between
# system calls; the reactor thread gives it up at every socket call and would
# otherwise wait up to the default 5 ms to get it back, for every client.
GIL_SWITCH_INTERVAL = 0.0005


def user_store(home: Path, reactor, control: ControlWatcher,
               top: MultiService) -> tuple[IUserStore, Grants | SQLGrants]:
    """The users and relay grants control/userdb names: the vpasswd files and
    open-smtp/, or vpopmail's database (its own threads, and each node's copy
    of the relay table kept fresh)."""
    try:
        users = open_store(home)
    except UserDBError as error:
        raise SystemExit(f"qtwist: {error}") from None
    if not isinstance(users, SQLUserStore):
        return users, Grants(home)
    database = users.database
    database.start(reactor)
    grants = SQLGrants(database, reactor)
    Periodic("grants: reading the relay table", lambda: grants.refresh(control.settings.relaygrantlifetime),
             SQLGrants.REFRESH, reactor, now=True).setServiceParent(top)
    checked = database.defer(users.check)
    checked.addCallback(_checked, database)
    checked.addErrback(database_down)  # the database said why in its own line
    return users, grants


def _checked(found: tuple[bool, str], database) -> None:
    usable, line = found
    (log.info if usable else log.warn)("userdb: {db}: {line}", db=str(database.address), line=line)


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    home = Path(options["home"]).resolve()
    top = MultiService()
    control = ControlWatcher(home)
    control.setServiceParent(top)
    soft, hard = raise_soft_limit()
    threads = reactor.getThreadPool().max
    budget = DescriptorBudget(soft, lambda: RESERVE + control.settings.concurrencyremote + threads, reactor)
    check_limits(budget, control.settings.concurrencyincoming, control.settings.pop3concurrencyincoming, hard)
    users, grants = user_store(home, reactor, control, top)
    GrantsCleaner(grants, lambda: control.settings).setServiceParent(top)
    queue = Queue(home, reactor)
    if not queue.free():
        raise SystemExit(f"qtwist: {home / 'queue'} is in use by another qtwist server")
    lookups = Lookups(reactor, options["nameserver"])
    remote = RemoteDelivery(reactor, lookups=lookups, remote_port=options["remote-port"],
                            tls_context_factory=opportunistic_tls())
    hooks = Hooks(installed_plugins(), reactor)
    plugin_context = PluginContext(home, users, lookups, reactor)
    scheduler = Scheduler(queue, lambda: control.settings, LocalSpawn(reactor, home), remote, reactor,
                          hooks=hooks, plugin_context=plugin_context)
    scheduler.setServiceParent(top)

    certificate = home / "control" / "servercert.pem"
    if control.settings.selfsignedcert and not certificate.exists():
        make_self_signed(certificate, control.settings.me)
        control.reload()
        log.warn("tls: made a self-signed certificate for {me} in control/servercert.pem "
                 "(control/selfsignedcert asks for one; put a real certificate there for production)",
                 me=control.settings.me)
    endpoints = listener_endpoints(options["listeners"], control.settings.listeners)
    server_tls = ServerTLS(lambda: control.settings.servercert)
    throttle = FailureThrottle(reactor, lambda: (control.settings.authfaillimit,
                                                 control.settings.authfailwindow,
                                                 control.settings.authfailblock))
    smtp_logins = Logins("smtpd", mail_portal(users, "smtp"), throttle, reactor, users)

    smtp_admission = Admission()  # concurrencyincoming counts every SMTP listener together

    def smtp_factory(submission: bool) -> SMTPFactory:
        return SMTPFactory(settings=lambda: control.settings, rules=lambda: control.rules, queue=queue,
                           queued=scheduler.submit, clock=reactor, grants=grants, submission=submission,
                           tls=server_tls, logins=smtp_logins, hooks=hooks,
                           plugin_context=plugin_context, admission=smtp_admission, budget=budget,
                           users=users)

    submission = smtp_factory(submission=True)
    pop3 = POP3Factory(logins=Logins("pop3d", mail_portal(users, "pop3"), throttle, reactor, users), grants=grants,
                       settings=lambda: control.settings, tls_options=server_tls, clock=reactor, budget=budget)
    factories = {"smtp": smtp_factory(submission=False), "submission": submission, "pop3": pop3,
                 # Port 465 is submission with TLS from the first byte (RFC 8314).
                 "smtps": ImplicitTLSFactory(server_tls, submission, "smtps"),
                 "pop3s": ImplicitTLSFactory(server_tls, pop3, "pop3s")}
    for name, factory in factories.items():
        for endpoint in endpoints[name]:
            listening = budget.endpoint(serverFromString(reactor, with_backlog(endpoint)))
            service = StreamServerEndpointService(listening, factory)
            service.setName(f"{name} {endpoint}")
            service.setServiceParent(top)
    return top
