"""The ``qtwist`` command: the admin's vadddomain, vadduser, qmail-showctl,
qmail-qstat and qmail-qread in one place (README: "The qtwist command").

Every failure an admin can cause (a missing home, an unknown domain, a bad
quota) ends as one line on stderr and exit status 1; usage errors exit 2, as
argparse does.  ``sendmail`` is qmail-inject behind sendmail's command line.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from qtwist.sqldb import Database, UserDBError, parse_userdb
from qtwist.sqlusers import SQLUserStore
from qtwist.users import IUserStore, UserDB, UsersError, UserStoreUnavailable, open_store

DEFAULT_HOME = Path("/var/qtwist")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class CommandError(Exception):
    """A failure to report as one line on stderr."""


# -- domains and users -------------------------------------------------------

def _store(args: argparse.Namespace) -> IUserStore:
    """The store control/userdb names (vpasswd files or vpopmail's database)."""
    try:
        return open_store(args.home)
    except UserDBError as error:
        raise CommandError(str(error)) from None


def _domain(args: argparse.Namespace) -> None:
    db = _store(args)
    if args.action == "list":
        for domain in db.domains():
            print(domain)
    elif args.action == "add":
        db.add_domain(args.domain)
    else:
        db.delete_domain(args.domain)


def _read_password(args: argparse.Namespace) -> str:
    """The new password from --password, one line of stdin, or a prompt that does not echo."""
    if args.password is not None:
        return args.password
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise CommandError("no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise CommandError("give the password with --password or --password-stdin")
    try:
        first = getpass.getpass(f"new password for {args.address}: ")
        again = getpass.getpass("the same password again: ")
    except EOFError:
        raise CommandError("no password given") from None
    if again != first:
        raise CommandError("the two passwords differ")
    return first


def _user(args: argparse.Namespace) -> None:
    db = _store(args)
    if args.action == "list":
        domains = [args.target] if args.target else db.domains()
        for domain in domains:
            for user in db.users(domain):
                print(user.address)
    elif args.action == "add":
        db.add_user(args.address, _read_password(args), quota=args.quota,
                    cleartext=args.cleartext)
    elif args.action == "passwd":
        db.set_password(args.address, _read_password(args), cleartext=args.cleartext)
    else:
        db.delete_user(args.address)


# -- control settings --------------------------------------------------------

def _showctl(args: argparse.Namespace) -> int:
    """Each setting in force, one per line, as qmail-showctl lists them;
    with --explain, each after a comment line saying what it is for."""
    from qtwist import control

    settings, errors = control.load(args.home)
    for name, shown, is_default in settings.describe():
        if args.explain:
            print(f"# {control.about(name)}")
        # A list (rcpthosts...) goes on following lines, indented, so each line stays one fact.
        first, *more = str(shown).split("\n")
        print(f"{name}: {first}{' (default)' if is_default else ''}")
        for line in more:
            print(f"    {line}")
    for error in errors:
        print(f"qtwist: {error}", file=sys.stderr)
    return 1 if errors else 0


def _plugins(args: argparse.Namespace) -> int:
    """Every installed plugin, and whether control/plugins enables it (and where)."""
    from qtwist import control
    from qtwist.hooks import installed_plugins

    settings, errors = control.load(args.home)
    installed = installed_plugins()
    for name in sorted(installed):
        place = settings.plugins.index(name) + 1 if name in settings.plugins else 0
        state = f"enabled {place}" if place else "-"
        print(f"{name}\t{state}\t{installed[name].description}")
    for name in settings.plugins:
        if name not in installed:
            print(f"qtwist: control/plugins names {name!r}, which is not installed", file=sys.stderr)
            errors.append(name)
    return 1 if errors else 0


# -- the queue -----------------------------------------------------------------

@contextmanager
def _queue_errors() -> Iterator[None]:
    from qtwist.queue import QueueError

    try:
        yield
    except QueueError as error:
        raise CommandError(str(error)) from None


def _printable(text: str) -> str:
    """What qmail-qread shows of a string: anything outside ASCII 32..126 becomes '_'."""
    return "".join(char if " " <= char <= "~" else "_" for char in text)


def _qread_date(born: float) -> str:
    """qmail's date822fmt without the zone, e.g. '3 Dec 2026 09:05:07'."""
    tm = time.gmtime(born)
    return (f"{tm.tm_mday} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}")


def _qstat(args: argparse.Namespace) -> None:
    from qtwist.queue.admin import queue_stat

    with _queue_errors():
        total, todo = queue_stat(args.home)
    print(f"messages in queue: {total}")
    print(f"messages in queue but not yet preprocessed: {todo}")


def _qread(args: argparse.Namespace) -> None:
    """qmail-qread's listing: a line per message, then local and remote
    recipients (routed as the server routes them, by the control files in force)."""
    from qtwist import control
    from qtwist.policy import channel_for
    from qtwist.queue import PENDING
    from qtwist.queue.admin import queue_read

    settings, _ = control.load(args.home)
    with _queue_errors():
        messages = queue_read(args.home)
    for message in messages:
        print(_printable(f"{_qread_date(message.born)} GMT  #{message.id}  {message.size}  "
                         f"<{message.sender}> "))
        for channel in ("local", "remote"):
            for recipient in message.recipients:
                if channel_for(recipient.address, settings) == channel:
                    # qmail marks a recipient done once it is delivered or bounced.
                    done = "  done" if recipient.state != PENDING else ""
                    print(f"{done}\t{channel}\t{_printable(recipient.address)}")


def _queue(args: argparse.Namespace) -> None:
    from qtwist.queue.admin import queue_flush, queue_remove

    with _queue_errors():
        if args.action == "flush":
            queue_flush(args.home)
            return
        removed = queue_remove(args.home, args.ids, args.match)
    print(f"removed {removed} message(s)")


def _relay(args: argparse.Namespace) -> None:
    """POP-before-SMTP grants: who may relay now, and for how long already."""
    from qtwist.grants import Grants, SQLGrants

    store = _store(args)
    grants = SQLGrants(store.database) if isinstance(store, SQLUserStore) else Grants(args.home)
    if args.action == "list":
        for ip, age in grants.list():
            print(f"{ip}\t{int(age)}")
        return
    print(f"cleared {grants.clear(args.older)} grant(s)")


def _userdb(args: argparse.Namespace) -> None:
    """Copy users between the vpasswd files and a database, both ways; running
    it again changes nothing."""
    files = UserDB(args.home)
    if args.action == "export":
        target: IUserStore = _database_store(args.home, args.url)
        source: IUserStore = files
    else:
        source, target = (_database_store(args.home, args.url) if args.url else _store(args)), files
        if not isinstance(source, SQLUserStore):
            raise CommandError("control/userdb names no database: give its URL")
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    for domain in files.domains():
        for user in source.users(domain):
            counts[target.store(user)] += 1
    where = target.database.address if isinstance(target, SQLUserStore) else "the vpasswd files"
    print(f"{args.action}: {counts['added']} added, {counts['updated']} updated, "
          f"{counts['unchanged']} unchanged in {where}")


def _database_store(home: Path, url: str) -> SQLUserStore:
    try:
        address = parse_userdb(url)
    except UserDBError as error:
        raise CommandError(str(error)) from None
    if address is None:
        raise CommandError(f"{url!r} names no database")
    return SQLUserStore(home, Database(address))


def _sendmail(args: argparse.Namespace) -> None:
    """sendmail's interface for scripts (PHP's mail(), cron): the message on stdin."""
    from qtwist.inject import InjectError, sendmail

    try:
        sendmail(args.home, args.arguments, sys.stdin.buffer, os.environ, time.time())
    except InjectError as error:
        raise CommandError(f"sendmail: {error}") from None


# -- the parser ------------------------------------------------------------------

def _quota(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of bytes")
    return value


def _password_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--password", metavar="P", help="the password (visible to ps; "
                        "prefer --password-stdin)")
    source.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtwist", description="Manage a qtwist home.")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, metavar="DIR",
                        help=f"the qtwist home (default {DEFAULT_HOME})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    domain = commands.add_parser("domain", help="add, delete or list virtual domains")
    domain_actions = domain.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("add", "create domains/DOMAIN and list it in rcpthosts"),
                         ("del", "delete the domain, its users and mailboxes")):
        domain_actions.add_parser(action, help=text).add_argument("domain", metavar="DOMAIN")
    domain_actions.add_parser("list", help="list the domains")
    domain.set_defaults(run=_domain)

    user = commands.add_parser("user", help="add, delete, list users or change passwords")
    user_actions = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = user_actions.add_parser("add", help="add a mailbox")
    add.add_argument("address", metavar="ADDRESS")
    _password_options(add)
    add.add_argument("--quota", type=_quota, metavar="BYTES", help="mailbox size limit")
    add.add_argument("--cleartext", action="store_true",
                     help="also store the clear text, which CRAM-MD5 and APOP need")
    delete = user_actions.add_parser("del", help="delete a user and the mailbox")
    delete.add_argument("address", metavar="ADDRESS")
    passwd = user_actions.add_parser("passwd", help="set a new password")
    passwd.add_argument("address", metavar="ADDRESS")
    _password_options(passwd)
    passwd.add_argument("--cleartext", action=argparse.BooleanOptionalAction, default=None,
                        help="store (or with --no-cleartext drop) the clear text; "
                             "by default keep doing what was done before")
    listing = user_actions.add_parser("list", help="list the users of DOMAIN, or of all domains")
    listing.add_argument("target", nargs="?", metavar="DOMAIN")
    user.set_defaults(run=_user)

    showctl = commands.add_parser("showctl", help="show every control setting in force")
    showctl.add_argument("--explain", action="store_true", help="say what each setting is for")
    showctl.set_defaults(run=_showctl)
    commands.add_parser("plugins", help="list the installed plugins and which are enabled").set_defaults(
        run=_plugins)
    commands.add_parser("qstat", help="count the queued messages").set_defaults(run=_qstat)
    commands.add_parser("qread", help="list the queued messages").set_defaults(run=_qread)

    queue = commands.add_parser("queue", help="remove queued messages, or retry now")
    queue_actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True)
    remove = queue_actions.add_parser("rm", help="remove messages by id, or by a substring")
    remove.add_argument("ids", nargs="*", metavar="ID")
    remove.add_argument("--match", metavar="SUBSTRING",
                        help="remove every message whose sender or a recipient contains this")
    queue_actions.add_parser("flush", help="retry every deferred delivery now")
    queue.set_defaults(run=_queue)

    relay = commands.add_parser("relay", help="list or clear POP-before-SMTP relay grants")
    relay_actions = relay.add_subparsers(dest="action", metavar="ACTION", required=True)
    relay_actions.add_parser("list", help="each client IP with a grant, and its age in seconds")
    clear = relay_actions.add_parser("clear", help="remove grants")
    clear.add_argument("--older", type=float, metavar="SECONDS",
                       help="only grants at least this old")
    relay.set_defaults(run=_relay)

    userdb = commands.add_parser("userdb", help="copy users between the vpasswd files and a database")
    userdb_actions = userdb.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = userdb_actions.add_parser("export", help="copy the vpasswd users into the database at URL")
    export.add_argument("url", metavar="URL", help="mysql://user:pass@host:port/db or postgresql://...")
    imports = userdb_actions.add_parser("import", help="copy the database's users into the vpasswd files")
    imports.add_argument("url", nargs="?", metavar="URL", help="the database (default: control/userdb's)")
    userdb.set_defaults(run=_userdb)

    # sendmail's own option syntax (-t, -oi, -fSENDER, options among recipients)
    # is parsed by qtwist.inject, so argparse sees only words here.
    sendmail = commands.add_parser(
        "sendmail", prefix_chars="+", add_help=False,
        help="inject a message from standard input (sendmail's options: -t -i -f -F ...)")
    sendmail.add_argument("arguments", nargs=argparse.REMAINDER)
    sendmail.set_defaults(run=_sendmail)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "queue" and args.action == "rm" and bool(args.ids) == bool(args.match):
        parser.error("queue rm takes message ids or --match SUBSTRING, not both or neither")
    if not args.home.is_dir():
        print(f"qtwist: the home directory {args.home} does not exist", file=sys.stderr)
        return 1
    run: Callable[[argparse.Namespace], int | None] = args.run
    try:
        return run(args) or 0
    except (CommandError, UsersError) as error:
        print(f"qtwist: {error}", file=sys.stderr)
    except UserStoreUnavailable as error:
        print(f"qtwist: the user database cannot be used: {error}", file=sys.stderr)
    except OSError as error:
        where = f" {error.filename}:" if error.filename else ""
        print(f"qtwist:{where} {error.strerror or error}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
