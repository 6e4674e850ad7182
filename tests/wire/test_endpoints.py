"""distill_base.endpoints: one parser for host:port, [v6]:port, lists and comma separated strings."""
import pytest

from distill_base.endpoints import Endpoint, format_endpoints, parse_endpoint, parse_endpoints


@pytest.mark.parametrize("text,host,port,canonical", [
    ("127.0.0.1:9292", "127.0.0.1", 9292, "127.0.0.1:9292"),
    ("  teacher-3.example.com:80 ", "teacher-3.example.com", 80, "teacher-3.example.com:80"),
    ("[::1]:9393", "::1", 9393, "[::1]:9393"),
    ("[fe80::1:2]:1", "fe80::1:2", 1, "[fe80::1:2]:1"),
    ("localhost:65535", "localhost", 65535, "localhost:65535"),
])
def test_good_endpoints_parse_and_print_canonically(text, host, port, canonical):
    endpoint = parse_endpoint(text)
    assert endpoint == Endpoint(host, port)
    assert str(endpoint) == canonical


@pytest.mark.parametrize("text,message", [
    ("nohost", "teacher endpoint 'nohost' is not 'host:port' or '[ipv6]:port'"),
    ("h:0", "port '0' is not a number in 1-65535"),
    ("h:65536", "port '65536' is not a number in 1-65535"),
    ("h:port", "port 'port' is not a number in 1-65535"),
    ("::1:80", "is not 'host:port' or '[ipv6]:port'"),          # an IPv6 address needs brackets
    ("[::1:80", "is not 'host:port' or '[ipv6]:port'"),
    ("[::1]80", "is not 'host:port' or '[ipv6]:port'"),
    ("bad host:1", "'bad host' is not a host name, IPv4 or IPv6 address"),
    (":9292", "'' is not a host name"),
    ("a..b:1", "'a..b' is not a host name"),
    ("[example.com]:1", "only an IPv6 address goes in brackets, not 'example.com'"),
    (42, "teacher endpoint 42 is not a string"),
])
def test_bad_endpoints_name_the_item_and_the_problem(text, message):
    with pytest.raises(ValueError, match="teacher endpoint") as info:
        parse_endpoint(text, what="teacher endpoint")
    assert message in str(info.value)


def test_wildcards_are_refused_only_where_they_must_be_dialed():
    assert parse_endpoint("0.0.0.0:9292").is_wildcard
    assert parse_endpoint("[::]:9292").is_wildcard
    for text in ("0.0.0.0:9292", "[::]:9292"):
        with pytest.raises(ValueError, match="a wildcard address cannot be dialed"):
            parse_endpoint(text, allow_wildcard=False)


def test_lists_and_comma_strings():
    expected = [Endpoint("a", 1), Endpoint("::1", 2), Endpoint("c", 3)]
    assert parse_endpoints("a:1, [::1]:2,c:3") == expected
    assert parse_endpoints(["a:1", "[::1]:2,c:3"]) == expected
    assert parse_endpoints("a:1,,") == [Endpoint("a", 1)]
    assert format_endpoints(["a:1", " [::1]:2"]) == "a:1,[::1]:2"
    assert parse_endpoints("zk1,[::1]", default_port=2181) == [Endpoint("zk1", 2181), Endpoint("::1", 2181)]
    with pytest.raises(ValueError, match="ZooKeeper host 'b:x': port 'x'"):
        parse_endpoints("a:1,b:x", what="ZooKeeper host")
    with pytest.raises(ValueError, match="no ZooKeeper host given"):
        parse_endpoints(" , ", what="ZooKeeper host")
    with pytest.raises(ValueError, match="expected 'host:port"):
        parse_endpoints([1, 2])
    assert parse_endpoints("", allow_empty=True) == []
