"""tcp.smtp parsing and tcpserver's matching order."""

from qtwist.login import normal_ip
from qtwist.rules import Rules


def rules_from(text: str) -> Rules:
    rules, errors = Rules.parse(text)
    assert errors == []
    return rules


def test_no_rules_file_allows_everyone_with_empty_env():
    rule = Rules.allow_all().match("192.0.2.1")
    assert rule.allow is True
    assert dict(rule.env) == {}


def test_exact_address_wins_over_prefix_and_default():
    rules = rules_from(":deny\n127.:allow,A=\"prefix\"\n127.0.0.1:allow,A=\"exact\"\n")
    assert rules.match("127.0.0.1").env["A"] == "exact"
    assert rules.match("127.0.0.1").key == "127.0.0.1"


def test_longest_prefix_wins_then_default():
    rules = rules_from("127.:allow,P=1\n127.0.:allow,P=2\n127.0.0.:allow,P=3\n:deny\n")
    assert rules.match("127.0.0.9").env["P"] == "3"
    assert rules.match("127.0.9.9").env["P"] == "2"
    assert rules.match("127.9.9.9").env["P"] == "1"
    default = rules.match("10.0.0.1")
    assert default.allow is False and default.key == ""


def test_no_matching_rule_and_no_default_allows():
    rule = rules_from("127.0.0.1:deny\n").match("127.0.0.2")
    assert rule.allow is True and dict(rule.env) == {}


def test_deny_rule():
    rules = rules_from("127.0.0.66:deny\n")
    assert rules.match("127.0.0.66").allow is False


def test_last_part_range_expands_to_each_address():
    rules = rules_from("127.0.0.4-20:allow,RELAYCLIENT=\"\"\n:deny\n")
    assert rules.match("127.0.0.4").allow
    assert rules.match("127.0.0.12").allow
    assert rules.match("127.0.0.20").allow
    assert not rules.match("127.0.0.3").allow
    assert not rules.match("127.0.0.21").allow
    assert rules.match("127.0.0.7").key == "127.0.0.4-20"


def test_range_before_trailing_dot_expands_to_prefixes():
    rules = rules_from("127.3-5.:allow,R=1\n:deny\n")
    assert rules.match("127.4.200.1").env["R"] == "1"
    assert rules.match("127.5.0.0").allow
    assert not rules.match("127.6.0.1").allow


def test_first_line_wins_for_a_repeated_key():
    rules = rules_from("127.0.0.1-9:deny\n127.0.0.5:allow\n")
    assert rules.match("127.0.0.5").allow is False


def test_env_values_quoted_unquoted_and_empty():
    rule = rules_from('127.0.0.1:allow,RELAYCLIENT="",RBLSMTPD="-no, not you: go away",X=plain,Y=\'a,b\'\n').match(
        "127.0.0.1")
    assert dict(rule.env) == {"RELAYCLIENT": "", "RBLSMTPD": "-no, not you: go away", "X": "plain", "Y": "a,b"}
    assert "RELAYCLIENT" in rule.env


def test_comments_blank_lines_and_surrounding_spaces():
    rules = rules_from("# relay for the office\n\n   127.0.0.1:allow,RELAYCLIENT=\"\"  \n  # :deny\n")
    assert "RELAYCLIENT" in rules.match("127.0.0.1").env
    assert rules.match("127.0.0.2").allow


def test_hostname_keys_exact_then_longest_suffix_then_prefixes():
    rules = rules_from(
        "=mx.example.test:allow,H=exact\n"
        "=.example.test:allow,H=domain\n"
        "=.deep.example.test:allow,H=deep\n"
        "127.0.0.:allow,H=prefix\n"
        "127.0.0.8:allow,H=ip\n"
    )
    assert rules.match("127.0.0.9", "MX.Example.Test").env["H"] == "exact"
    assert rules.match("127.0.0.9", "a.deep.example.test").env["H"] == "deep"
    assert rules.match("127.0.0.9", "other.example.test").env["H"] == "domain"
    assert rules.match("127.0.0.9", "elsewhere.test").env["H"] == "prefix"
    assert rules.match("127.0.0.9").env["H"] == "prefix"
    assert rules.match("127.0.0.8", "mx.example.test").env["H"] == "ip"


def test_suffix_key_does_not_match_the_bare_domain():
    rules = rules_from("=.example.test:deny\n")
    assert rules.match("127.0.0.1", "example.test").allow
    assert not rules.match("127.0.0.1", "a.example.test").allow


def test_ipv6_exact_and_prefix_keys():
    rules = rules_from("::1:allow,V=loopback\n2001:db8::allow,V=doc\nfe80::allow,V=link\n:deny\n")
    assert rules.match("::1").env["V"] == "loopback"
    # Clients come normalised (login.client_address), however the peer spelled them.
    assert rules.match(normal_ip("0:0:0:0:0:0:0:1")).env["V"] == "loopback"
    assert rules.match(normal_ip("2001:DB8::25")).env["V"] == "doc"
    assert rules.match(normal_ip("fe80::1%eth0")).env["V"] == "link"
    assert rules.match("2001:db9::1").allow is False


def test_ipv6_prefix_matches_the_full_form_too():
    rules = rules_from("2001:db8:0:0::allow,V=long\n2001:db8::allow,V=short\n")
    assert rules.match("2001:db8::1").env["V"] == "long"
    assert rules.match("2001:db8:1::1").env["V"] == "short"


def test_ipv4_mapped_client_matches_ipv4_rules():
    rules = rules_from("127.0.0.1:allow,RELAYCLIENT=\"\"\n127.:deny\n")
    assert "RELAYCLIENT" in rules.match(normal_ip("::ffff:127.0.0.1")).env
    assert rules.match(normal_ip("::ffff:127.0.0.2")).allow is False


def test_bad_lines_are_reported_and_skipped():
    text = (
        "127.0.0.1:allow,RELAYCLIENT=\"\"\n"
        "no colon here\n"
        "127.0.0.2:permit\n"
        "127.0.0:allow\n"
        "127.0.0.3:allow,SECRET=\"unterminated\n"
        "127.0.0.30-10:allow\n"
        "127.0.1-2.3:allow\n"
        "127.0.0.4:deny\n"
    )
    rules, errors = Rules.parse(text, "tcp.smtp")
    assert [error.split(": ", 1)[0] for error in errors] == [
        "tcp.smtp:2", "tcp.smtp:3", "tcp.smtp:4", "tcp.smtp:5", "tcp.smtp:6", "tcp.smtp:7"]
    assert not any("unterminated\"" in error or "SECRET=" in error for error in errors)
    assert "RELAYCLIENT" in rules.match("127.0.0.1").env
    assert rules.match("127.0.0.4").allow is False


def test_env_values_never_appear_in_errors():
    _, errors = Rules.parse('127.0.0.1:allow,PASSWORD="hunter2" trailing\n')
    assert len(errors) == 1
    assert "hunter2" not in errors[0]


def test_rules_compare_by_content():
    assert rules_from("127.0.0.1:deny\n") == rules_from("# same\n127.0.0.1:deny\n")
    assert rules_from("127.0.0.1:deny\n") != rules_from("127.0.0.1:allow\n")
