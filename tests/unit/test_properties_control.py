"""Properties of the admin's files: control/ (control.py), tcp.smtp (rules.py)
and the address spelling every table keys on (login.normal_ip).

Whatever a file holds, reading it never raises: a problem is a message that
names the file and the line, and never repeats a value that may be a secret.
"""

from __future__ import annotations

import ipaddress
import re
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtwist.control import CONTROLS, Route, Settings, load
from qtwist.login import normal_ip
from qtwist.numbers import MOST_DIGITS
from qtwist.rules import Rules

SECRET = "S3cr3tV4lue"  # in env values and relay text; no message may repeat it

# -- normal_ip ---------------------------------------------------------------------------------------


@settings(max_examples=150)
@given(st.text(max_size=50) | st.ip_addresses().map(str).flatmap(
    lambda ip: st.sampled_from([ip, ip + "%eth0", ip.upper(), " " + ip, "::ffff:" + ip])))
def test_normal_ip_gives_one_spelling_or_value_error(text: str) -> None:
    try:
        normal = normal_ip(text)
    except ValueError:
        return
    assert normal_ip(normal) == normal
    assert str(ipaddress.ip_address(normal)) == normal


@settings(max_examples=100)
@given(st.ip_addresses())
def test_normal_ip_is_the_compressed_form_and_mapped_addresses_are_ipv4(ip) -> None:
    mapped = getattr(ip, "ipv4_mapped", None)
    assert normal_ip(str(ip)) == str(mapped or ip)
    assert normal_ip(ip.exploded) == str(mapped or ip)


# -- tcp.smtp ------------------------------------------------------------------------------------------

ERROR = re.compile(r"tcp\.smtp:([0-9]+): .+", re.DOTALL)
key_text = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["", "=", "=mail.example.test", "=.example.test", "1.2.3.", "1.2.3.4-20", "10.", "1.2.3-5.",
                     "2001:db8:", "::1", "::ffff:1.2.3.4", "1.2.3", "300.1.2.3", "1.2.3.4-2", "a@1.2.3.4",
                     "2001:db8::1-5", "fe80::1%eth0", "1.2.3.4.5"]),
    st.text(st.sampled_from("0123456789.:-=abcdef"), max_size=12),
    st.text(max_size=10),
)
env_value = st.text(st.sampled_from(string.ascii_letters + string.digits + ' ,:"\'=\t'), max_size=10).map(
    lambda tail: SECRET + tail) | st.sampled_from([f"{SECRET}:deny", f"{SECRET}:allow,x", f'"{SECRET}'])
env_item = st.builds(lambda name, quote, value: f",{name}={quote}{value}{quote}",
                     st.sampled_from(["RELAYCLIENT", "DATABYTES", "SMTPAUTHPASS", "X", " Y ", "BAD NAME", ""]),
                     st.sampled_from(["", '"', "'"]), env_value)
rule_line = st.builds(lambda key, colon, word, items, junk: f"{key}{colon}{word}{''.join(items)}{junk}",
                      key_text, st.sampled_from([":", ": ", "", "::"]),
                      st.sampled_from(["allow", "deny", "ALLOW", " deny ", "alow", "", "permit"]),
                      st.lists(env_item, max_size=3), st.sampled_from(["", ",", "#x", " "]))


@settings(max_examples=150)
@given(st.text(max_size=200))
def test_rules_parse_never_raises_and_names_the_line(text: str) -> None:
    rules, errors = Rules.parse(text)
    for error in errors:
        match = ERROR.fullmatch(error)
        assert match, error
        assert 1 <= int(match.group(1)) <= len(text.split("\n"))
    assert isinstance(rules, Rules)


@settings(max_examples=100)
@given(st.lists(rule_line, max_size=6))
def test_rules_messages_never_repeat_an_environment_value(lines: list[str]) -> None:
    _, errors = Rules.parse("\n".join(lines))
    for error in errors:
        assert SECRET.lower() not in error.lower(), error


@settings(max_examples=60)
@given(st.lists(rule_line, max_size=6), st.ip_addresses().map(str), st.none() | st.text(max_size=30))
def test_rules_match_any_normal_ip_and_host_name(lines: list[str], ip: str, hostname) -> None:
    rules, _ = Rules.parse("\n".join(lines))
    rule = rules.match(normal_ip(ip), hostname)
    assert rule.allow in (True, False)
    assert all(isinstance(name, str) and isinstance(value, str) for name, value in rule.env.items())


@settings(max_examples=100)
@given(st.ip_addresses(), st.ip_addresses())
def test_an_address_rule_wins_over_the_default(listed, other) -> None:
    rules, errors = Rules.parse(f"{listed}:deny,WHY=listed\n:allow\n")
    assert errors == []
    rule = rules.match(normal_ip(str(listed)))
    assert not rule.allow and rule.env == {"WHY": "listed"}
    assert rules.match(normal_ip(str(other))).allow == (normal_ip(str(other)) != normal_ip(str(listed)))


@settings(max_examples=100)
@given(st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None), st.integers(1, 7))
def test_an_ipv6_prefix_rule_matches_every_address_under_it(ip, groups: int) -> None:
    prefix = ":".join(part.lstrip("0") or "0" for part in ip.exploded.split(":")[:groups]) + ":"
    rules, errors = Rules.parse(f"{prefix}:allow,UNDER=1\n:deny\n")
    assert errors == []
    assert rules.match(normal_ip(str(ip))).env == {"UNDER": "1"}


@settings(max_examples=100)
@given(st.ip_addresses(v=4), st.integers(1, 3))
def test_an_ipv4_prefix_rule_matches_every_address_under_it(ip, parts: int) -> None:
    prefix = ".".join(str(ip).split(".")[:parts]) + "."
    rules, errors = Rules.parse(f"{prefix}:allow,UNDER=1\n:deny\n")
    assert errors == []
    assert rules.match(normal_ip(str(ip))).env == {"UNDER": "1"}
    assert rules.match(normal_ip(f"::ffff:{ip}")).env == {"UNDER": "1"}


# -- every control file's parser -----------------------------------------------------------------------

# What control._entries hands a parser: numbered, stripped, not blank, not a comment.
entry_text = st.one_of(
    st.text(min_size=1, max_size=40),
    st.integers(0, 10**20).map(str),
    st.sampled_from(["smtp tcp:25", "pop3", "bogus tcp:1", "example.test:relay.test:25", ":[10.0.0.1]:2525",
                     "a:[::1", "a:[nope]", "a:host:0", "a:host:99999", "a:host:x", "a:host: user pass", "x:",
                     ".example.test:", "no colon", "-3", "007"]),
).map(str.strip).filter(lambda text: text and not text.startswith("#") and "\n" not in text)
entries = st.lists(st.tuples(st.integers(1, 10_000), entry_text), min_size=1, max_size=5).map(
    lambda pairs: sorted(dict(pairs).items()))


# One control per parser: the twenty files read as a number share one parser.
PARSERS = list({control.parse: control for control in CONTROLS}.values())


@pytest.mark.parametrize("control", PARSERS, ids=[control.parse.__name__.strip("_") for control in PARSERS])
@settings(max_examples=60)
@given(entries=entries)
def test_each_control_parser_gives_a_value_or_line_messages(control, entries: list) -> None:
    where = f"control/{control.name}"
    value, errors = control.parse(where, entries)
    numbers = {number for number, _ in entries}
    for error in errors:
        match = re.fullmatch(re.escape(where) + r":([0-9]+): .+", error, re.DOTALL)
        assert match and int(match.group(1)) in numbers, error
    if not errors:
        Settings(**{"me": "mx.example.test", control.field: value})  # a usable value for its field


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(1, 100), st.sampled_from(["", "example.test", ".example.test"]),
                          st.text(string.ascii_letters + string.digits + " ,:[]=@", max_size=12)),
                min_size=1, max_size=4))
def test_smtproutes_messages_never_repeat_the_relay(lines: list) -> None:
    """smtproutes may carry credentials after the domain: a message names the domain only."""
    parse = {control.name: control.parse for control in CONTROLS}["smtproutes"]
    entries = [(number, f"{domain}:{SECRET}{rest}") for number, domain, rest in lines]
    _, errors = parse("control/smtproutes", entries)
    assert not any(SECRET in error for error in errors), errors


hostname = st.lists(st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8), min_size=1,
                    max_size=4).map(".".join)
route_host = st.one_of(st.just(""), hostname, hostname.map(str.upper),
                       st.builds(lambda ip, tag: f"[{ip}]" if ip.version == 4 else f"[{tag}{ip}]",
                                 st.ip_addresses(), st.sampled_from(["IPv6:", "ipv6:", "IPV6:"])))
route_domain = st.one_of(st.just(""), hostname, hostname.map(lambda name: "." + name.upper()))


@settings(max_examples=60)
@given(st.lists(st.tuples(route_domain, route_host, st.none() | st.integers(1, 65535)), min_size=1, max_size=5))
def test_smtproutes_read_back_what_the_admin_wrote(routes: list) -> None:
    parse = {control.name: control.parse for control in CONTROLS}["smtproutes"]
    lines = [f"{domain}:{host}" + ("" if port is None else f":{port}") for domain, host, port in routes]
    parsed, errors = parse("control/smtproutes", list(enumerate(lines, 1)))
    assert errors == []
    assert parsed == tuple(Route(domain.lower(), host.lower(), port) for domain, host, port in routes)


@settings(max_examples=60)
@given(st.integers(0, 10**30))
def test_numbers_round_trip(number: int) -> None:
    parse = {control.name: control.parse for control in CONTROLS}["databytes"]
    if number < 10**MOST_DIGITS:
        assert parse("control/databytes", [(1, str(number))]) == (number, [])
    else:
        assert parse("control/databytes", [(1, str(number))]) == (
            None, [f"control/databytes:1: number too big (at most {MOST_DIGITS} digits)"])


# -- control.load on a home ----------------------------------------------------------------------------

NAMES = [control.name for control in CONTROLS]
LOAD_ERROR = re.compile(r"control/([a-z0-9]+)(:([0-9]+))?: .+", re.DOTALL)
file_content = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=120).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.lists(entry_text, max_size=4).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
)


@pytest.fixture(scope="module")
def control_home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("control-properties")
    (root / "control").mkdir()
    (root / "domains" / "example.test").mkdir(parents=True)
    return root


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), file_content, max_size=6),
       st.dictionaries(st.sampled_from(NAMES), file_content, max_size=6))
def test_load_never_raises_and_names_file_and_line(control_home: Path, first: dict, second: dict) -> None:
    """Two reloads in a row, the second over the first's snapshot (the last good value stays)."""
    previous = None
    for files in (first, second):
        for path in (control_home / "control").iterdir():
            path.unlink()
        for name, data in files.items():
            (control_home / "control" / name).write_bytes(data)
        loaded, errors = load(control_home, previous, reread=True)
        for error in errors:
            match = LOAD_ERROR.fullmatch(error)
            assert match and match.group(1) in files, error
            if match.group(3):
                text = files[match.group(1)].decode("utf-8", "replace")
                assert 1 <= int(match.group(3)) <= len(text.splitlines()), error
        assert isinstance(loaded, Settings) and loaded.local_domains == {"example.test"}
        for name, data in files.items():
            field = {control.name: control.field for control in CONTROLS}[name]
            if not any(error.startswith(f"control/{name}:") for error in errors) and loaded.origins[name] == "default":
                # No entries at all: the default (or the other file of the field) is in force.
                text = data.decode("utf-8", "replace")
                assert all(not line.strip() or line.strip().startswith("#") for line in text.splitlines()), \
                    (name, field)
        previous = loaded
