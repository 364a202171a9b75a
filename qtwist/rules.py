"""tcp.smtp: tcprules syntax, matched the way tcpserver looks a client up.

tcprules compiles the file into a cdb keyed by address text and tcpserver tries a
fixed list of keys per connection.  We keep that model: parsing expands every
line into plain keys of one dict, so matching a connection is a handful of dict
look-ups and never a pattern scan.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from qtwist.login import normal_ip
from qtwist.numbers import decimal

_NO_ENV: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Rule:
    """What tcpserver does with a connection: allow or deny it, and the
    environment (RELAYCLIENT, RBLSMTPD, ...) the session starts with.  ``key`` is
    the tcp.smtp key that matched, as written, so a log line can name it."""

    allow: bool
    env: Mapping[str, str] = field(hash=False)
    key: str


_UNMATCHED = Rule(True, _NO_ENV, "")


class Rules:
    """An immutable tcp.smtp; build it with ``parse`` or ``allow_all``."""

    __slots__ = ("_table",)

    def __init__(self, table: Mapping[str, Rule]) -> None:
        self._table: Mapping[str, Rule] = MappingProxyType(dict(table))

    @classmethod
    def allow_all(cls) -> Rules:
        """No rules file: tcpserver then accepts everyone with no extra environment."""
        return cls({})

    @classmethod
    def parse(cls, text: str, source: str = "tcp.smtp") -> tuple[Rules, list[str]]:
        """Rules from tcprules source text, plus ``source:LINE: problem`` messages.

        A bad line is skipped and the rest kept.  When two lines produce the same
        key the first one wins, as in the cdb tcprules writes.  Messages never
        repeat environment values: tcp.smtp may carry secrets in them."""
        table: dict[str, Rule] = {}
        errors: list[str] = []
        for number, raw in enumerate(text.split("\n"), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                keys, rule = _parse_line(line)
            except ValueError as problem:
                errors.append(f"{source}:{number}: {problem}")
                continue
            for key in keys:
                table.setdefault(key, rule)
        return cls(table), errors

    def match(self, ip: str, hostname: str | None = None) -> Rule:
        """The rule tcpserver would apply to a client at ``ip`` (with the name its
        PTR look-up gave, if any): exact address, then ``=host`` keys from the full
        name down to ``=``, then address prefixes longest first, then the default.
        ``ip`` is normalised as ``login.client_address`` gives it, so an
        IPv4-mapped client matches the IPv4 rules."""
        table = self._table
        if not table:
            return _UNMATCHED
        address = ip
        rule = table.get(address)
        if rule is not None:
            return rule
        if hostname:
            rule = _match_hostname(table, hostname)
            if rule is not None:
                return rule
        prefixes = _ipv6_prefixes(address) if ":" in address else _ipv4_prefixes(address)
        for prefix in prefixes:
            rule = table.get(prefix)
            if rule is not None:
                return rule
        return table.get("", _UNMATCHED)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rules):
            return NotImplemented
        return self._table == other._table

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Rules with {len(self._table)} keys>"


def _parse_line(line: str) -> tuple[list[str], Rule]:
    """One ``key:instruction`` line → (dict keys, rule)."""
    separator = _instruction_colon(line)
    key = line[:separator].strip()
    instruction = line[separator + 1:].strip()
    word = instruction.split(",", 1)[0]
    allow = word.strip().lower() == "allow"
    env = _parse_env(instruction[len(word):])
    rule = Rule(allow, MappingProxyType(env) if env else _NO_ENV, key)
    return _table_keys(key), rule


def _instruction_colon(line: str) -> int:
    """Where the key ends.  IPv6 keys hold colons themselves, so the separator is
    the first colon that is followed by ``allow`` or ``deny``; keys hold no
    comma, so it comes before the environment values (which may hold colons)."""
    rule = line.split(",", 1)[0]
    if ":" not in rule:
        raise ValueError("missing ':' between the key and allow/deny")
    position = rule.find(":")
    while position >= 0:
        if rule[position + 1:].strip().lower() in ("allow", "deny"):
            return position
        position = rule.find(":", position + 1)
    raise ValueError("expected allow or deny after the key")


def _parse_env(items: str) -> dict[str, str]:
    """``,VAR=value,VAR="a,b"`` → {VAR: value}; quotes let a value hold commas."""
    env: dict[str, str] = {}
    position = 0
    while position < len(items):
        if items[position] != ",":
            raise ValueError("expected ',' between environment items")
        equals = items.find("=", position + 1)
        if equals < 0:
            raise ValueError("environment item without '='")
        name = items[position + 1:equals].strip()
        if not name or any(char.isspace() or char in "\"'," for char in name):
            raise ValueError("bad environment variable name")
        position = equals + 1
        while position < len(items) and items[position] in " \t":
            position += 1
        if position < len(items) and items[position] in "\"'":
            quote = items[position]
            closing = items.find(quote, position + 1)
            if closing < 0:
                raise ValueError(f"unterminated quote in the value of {name}")
            value = items[position + 1:closing]
            position = closing + 1
            while position < len(items) and items[position] in " \t":
                position += 1
        else:
            comma = items.find(",", position)
            end = len(items) if comma < 0 else comma
            value = items[position:end].strip()
            position = end
        env[name] = value
    return env


def _table_keys(key: str) -> list[str]:
    """The dict keys one tcp.smtp key stands for (several for a range)."""
    if key == "":
        return [""]
    if key.startswith("="):
        host = key[1:].lower()
        if len(host) > 1 and host.endswith("."):
            host = host[:-1]
        return ["=" + host]
    if "@" in key:
        raise ValueError("user@ keys (TCPREMOTEINFO) are not supported")
    if ":" in key:
        return [_ipv6_key(key)]
    return _ipv4_keys(key)


def _ipv4_keys(key: str) -> list[str]:
    """Exact ``1.2.3.4``, prefix ``1.2.``, or a range in the last part
    (``1.2.3.4-20``, ``1.2.3-5.``), expanded as tcprules expands it."""
    is_prefix = key.endswith(".")
    parts = (key[:-1] if is_prefix else key).split(".")
    if len(parts) > (3 if is_prefix else 4) or (not is_prefix and len(parts) < 4):
        if not is_prefix and len(parts) < 4 and all(decimal(part) is not None for part in parts):
            raise ValueError(f"incomplete IPv4 address {key!r} (a prefix ends with '.')")
        raise ValueError(f"not an address, prefix or =hostname: {key!r}")
    *leading, last = parts
    head = [_octet(part, key) for part in leading]
    if "-" in last:
        low_text, _, high_text = last.partition("-")
        low, high = int(_octet(low_text, key)), int(_octet(high_text, key))
        if low > high:
            raise ValueError(f"empty range in {key!r}")
        tails = [str(value) for value in range(low, high + 1)]
    else:
        tails = [_octet(last, key)]
    tail_suffix = "." if is_prefix else ""
    return [".".join([*head, tail]) + tail_suffix for tail in tails]


def _octet(text: str, key: str) -> str:
    """A decimal address part in the form tcpserver prints (no leading zeros)."""
    if "-" in text:
        raise ValueError(f"a range is allowed only in the last part: {key!r}")
    value = decimal(text)
    if value is None or value > 255:
        raise ValueError(f"not an address, prefix or =hostname: {key!r}")
    return str(value)


def _ipv6_key(key: str) -> str:
    """An IPv6 key in the client's written form: exact addresses compressed (a
    mapped ``::ffff:1.2.3.4`` becomes the IPv4 key), prefixes ending in ':' with
    each group lowercased and stripped of leading zeros."""
    if "-" in key:
        raise ValueError(f"ranges are supported for IPv4 only: {key!r}")
    if key.endswith(":"):
        groups = key.split(":")
        for group in groups:
            if group and (len(group) > 4 or any(char not in "0123456789abcdefABCDEF" for char in group)):
                raise ValueError(f"not an IPv6 prefix: {key!r}")
        return ":".join(format(int(group, 16), "x") if group else "" for group in groups)
    try:
        return normal_ip(key)
    except ValueError:
        raise ValueError(f"not an IPv6 address: {key!r}") from None


def _match_hostname(table: Mapping[str, Rule], hostname: str) -> Rule | None:
    """``=name``, then ``=.suffix`` from the longest suffix, then ``=``."""
    host = hostname.lower()
    if host.endswith("."):
        host = host[:-1]
    rule = table.get("=" + host)
    if rule is not None:
        return rule
    dot = host.find(".")
    while dot >= 0:
        rule = table.get("=" + host[dot:])
        if rule is not None:
            return rule
        dot = host.find(".", dot + 1)
    return table.get("=")


def _ipv4_prefixes(address: str) -> list[str]:
    """``1.2.3.`` ``1.2.`` ``1.`` for ``1.2.3.4``: each text prefix ending in a dot."""
    prefixes = []
    end = address.rfind(".")
    while end >= 0:
        prefixes.append(address[:end + 1])
        end = address.rfind(".", 0, end)
    return prefixes


def _ipv6_prefixes(address: str) -> list[str]:
    """Prefixes ending in ':' of the compressed form (what the IPv6 tcpserver
    matches) and of the full form, so ``2001:db8:0:`` works even where the
    compressed text says ``2001:db8::``; longest first."""
    try:
        full = ":".join(format(int(group, 16), "x") for group in ipaddress.IPv6Address(address).exploded.split(":"))
    except ValueError:
        full = address
    candidates = {
        text[:position + 1]
        for text in (address, full)
        for position, char in enumerate(text)
        if char == ":" and position + 1 < len(text)
    }
    return sorted(candidates, key=len, reverse=True)
