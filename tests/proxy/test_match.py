"""``proxy.match``: the HTTP conditions of L7 intentions and routes, as properties.

These test the matching semantics where they live, on the types directly. The same
semantics reached through Consul's JSON shapes (parsing, ``authorize``, first matching
permission or route decides) are tested in tests/meshnode/test_policy.py
(``test_header_conditions``, ``test_path_regex_matches_the_whole_path_without_query``,
``test_l7_permissions_first_match_decides_then_default``, the service-router tests).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Literal, get_args
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.match import (
    HeaderMatch,
    HeaderMatchKind,
    HttpMatch,
    HttpRequest,
    QueryParamMatch,
    compiled_regex,
)

HEADER_KINDS: tuple[HeaderMatchKind, ...] = get_args(HeaderMatchKind)
QueryKind = Literal["present", "exact", "regex"]
QUERY_KINDS: tuple[QueryKind, ...] = ("present", "exact", "regex")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

# Header values and paths: printable text without line breaks (a request cannot carry
# them) so that ``.`` in a regex means "any character" here.
text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
header_names = st.text(st.sampled_from("abcXYZ-_"), min_size=1, max_size=8)
paths = st.builds(lambda rest: "/" + rest, text.filter(lambda t: "?" not in t))


def random_case(name: str, flips: list[bool]) -> str:
    return "".join(c.swapcase() if i < len(flips) and flips[i] else c for i, c in enumerate(name))


@st.composite
def header_matches(draw: st.DrawFn, name: str = "h") -> HeaderMatch:
    kind = draw(st.sampled_from(HEADER_KINDS))
    value = (
        ""
        if kind == "present"
        else draw(
            st.one_of(st.sampled_from(["a", "ab", "[a-z]+", "v[0-9]", "x.*"]), text)
            if kind == "regex"
            else text
        )
    )
    if kind == "regex" and not _compiles(value):
        value = re.escape(value)
    return HeaderMatch(name, kind, value, draw(st.booleans()))


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


# ------------------------------------------------------------------------- headers


@given(header_matches(), text)
def test_inverting_a_condition_negates_it_when_the_header_is_present(
    match: HeaderMatch, value: str
) -> None:
    headers = {"h": value}
    assert replace(match, invert=not match.invert).matches(headers) is not match.matches(headers)


@given(header_matches())
def test_a_missing_header_matches_only_an_inverted_present_condition(match: HeaderMatch) -> None:
    # Envoy HeaderUtility::matchHeaders: an inverted exact/prefix/suffix/regex does not
    # match a request without the header.
    assert match.matches({}) is (match.invert and match.kind == "present")
    assert match.matches({"other": "x"}) is (match.invert and match.kind == "present")


@given(text, text)
def test_each_kind_against_its_definition(expected: str, found: str) -> None:
    headers = {"h": found}
    assert HeaderMatch("h", "present").matches(headers)
    assert HeaderMatch("h", "exact", expected).matches(headers) is (found == expected)
    assert HeaderMatch("h", "prefix", expected).matches(headers) is found.startswith(expected)
    assert HeaderMatch("h", "suffix", expected).matches(headers) is found.endswith(expected)
    # A regex must match the whole value (Envoy safe_regex), not a part of it.
    literal = HeaderMatch("h", "regex", re.escape(expected))
    assert literal.matches(headers) is (found == expected)
    starts = HeaderMatch("h", "regex", re.escape(expected) + ".*")
    assert starts.matches(headers) is found.startswith(expected)


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [("v[0-9]", "v1", True), ("v[0-9]", "v10", False), ("v[0-9]", "xv1", False)],
)
def test_header_regex_is_a_full_match(pattern: str, value: str, matches: bool) -> None:
    assert HeaderMatch("h", "regex", pattern).matches({"h": value}) is matches


@given(header_names, st.lists(st.booleans()), st.lists(st.booleans()), text)
def test_header_names_are_case_insensitive_through_from_target(
    name: str, condition_case: list[bool], request_case: list[bool], value: str
) -> None:
    match = HeaderMatch(random_case(name, condition_case), "exact", value)
    request = HttpRequest.from_target("GET", "/", [(random_case(name, request_case), value)])
    assert match.matches(request.headers)
    assert HttpMatch(headers=(match,)).matches(request)


@given(header_names, text, text)
def test_the_first_of_repeated_headers_is_the_one_matched(
    name: str, first: str, second: str
) -> None:
    request = HttpRequest.from_target("GET", "/", [(name, first), (name.swapcase(), second)])
    assert HeaderMatch(name, "exact", first).matches(request.headers)
    assert HeaderMatch(name, "exact", second).matches(request.headers) is (second == first)


# ------------------------------------------------------------------------- paths


@given(paths, paths, text)
def test_path_conditions(expected: str, path: str, query: str) -> None:
    request = HttpRequest.from_target("GET", f"{path}?{query}")
    assert request.path == path  # the query string is never part of the path
    assert HttpMatch(path_exact=expected).matches(request) is (path == expected)
    assert HttpMatch(path_prefix=expected).matches(request) is path.startswith(expected)
    assert HttpMatch(path_regex=re.escape(expected)).matches(request) is (path == expected)
    prefix_regex = HttpMatch(path_regex=re.escape(expected) + ".*")
    assert prefix_regex.matches(request) is path.startswith(expected)


def test_path_regex_matches_the_whole_path_without_the_query() -> None:
    match = HttpMatch(path_regex="/items/[0-9]+")
    assert match.matches(HttpRequest.from_target("GET", "/items/12?x=1"))
    assert not match.matches(HttpRequest.from_target("GET", "/items/12/x"))
    assert not match.matches(HttpRequest.from_target("GET", "/x/items/1"))


# ------------------------------------------------------------------------- methods


@given(st.sets(st.sampled_from(METHODS)), st.sampled_from(METHODS), st.booleans())
def test_methods_are_any_of(methods: set[str], method: str, lower: bool) -> None:
    match = HttpMatch(methods=tuple(sorted(methods)))
    request = HttpRequest.from_target(method.lower() if lower else method, "/")
    assert match.matches(request) is (not methods or method in methods)
    # A request built by hand with a lowercase method is matched the same way.
    assert match.matches(HttpRequest(method.lower(), "/")) is (not methods or method in methods)


# ------------------------------------------------------------------------- query


@given(st.sampled_from(["a", "b", "page"]), text, text)
def test_the_first_value_of_a_query_parameter_wins(name: str, first: str, second: str) -> None:
    target = f"/?{name}={quote(first, safe='')}&{name}={quote(second, safe='')}"
    request = HttpRequest.from_target("GET", target)
    assert request.query == {name: first}
    assert QueryParamMatch(name, "present").matches(request.query)
    assert QueryParamMatch(name, "exact", first).matches(request.query)
    assert QueryParamMatch(name, "exact", second).matches(request.query) is (second == first)
    only_first = HttpMatch(query_params=(QueryParamMatch(name, "regex", re.escape(first)),))
    assert only_first.matches(request)


def test_the_first_value_of_a_query_parameter_wins_literally() -> None:
    request = HttpRequest.from_target("GET", "/?a=1&a=2&b=&c")
    assert request.query == {"a": "1", "b": "", "c": ""}
    assert QueryParamMatch("a", "exact", "1").matches(request.query)
    assert not QueryParamMatch("a", "exact", "2").matches(request.query)
    assert QueryParamMatch("b", "present").matches(request.query)
    assert QueryParamMatch("c", "regex", "").matches(request.query)


@given(st.sampled_from(QUERY_KINDS), text)
def test_a_missing_query_parameter_never_matches(kind: QueryKind, value: str) -> None:
    match = QueryParamMatch("q", kind, re.escape(value) if kind == "regex" else value)
    assert not match.matches({})
    assert not match.matches({"Q": value})  # parameter names are case-sensitive


@given(text, text)
def test_query_kinds_against_their_definition(expected: str, found: str) -> None:
    query = {"q": found}
    assert QueryParamMatch("q", "present").matches(query)
    assert QueryParamMatch("q", "exact", expected).matches(query) is (found == expected)
    assert QueryParamMatch("q", "regex", re.escape(expected)).matches(query) is (found == expected)


# ------------------------------------------------------------------------- combined


@given(
    st.lists(header_matches(), max_size=3),
    st.sets(st.sampled_from(METHODS), max_size=2),
    paths,
    text,
    st.sampled_from(METHODS),
    text,
)
def test_a_match_is_the_conjunction_of_its_conditions(
    headers: list[HeaderMatch],
    methods: set[str],
    prefix: str,
    path: str,
    method: str,
    value: str,
) -> None:
    match = HttpMatch(path_prefix=prefix, headers=tuple(headers), methods=tuple(sorted(methods)))
    request = HttpRequest.from_target(method, "/" + path.replace("?", ""), [("H", value)])
    expected = (
        request.path.startswith(prefix)
        and (not methods or method in methods)
        and all(h.matches(request.headers) for h in headers)
    )
    assert match.matches(request) is expected


@given(paths, st.sampled_from(METHODS), text)
def test_an_empty_match_matches_every_request(path: str, method: str, value: str) -> None:
    assert HttpMatch().empty
    assert HttpMatch().matches(HttpRequest.from_target(method, path, [("h", value)]))
    assert not HttpMatch(path_prefix="/").empty


# ------------------------------------------------------------------------- values


def test_precompiled_patterns_are_not_part_of_the_value() -> None:
    a, b = HttpMatch(path_regex="/v[0-9]"), HttpMatch(path_regex="/v[0-9]")
    assert a == b and hash(a) == hash(b)
    assert "pattern" not in repr(a) and "re.compile" not in repr(a)
    assert HeaderMatch("H", "regex", "x+") == HeaderMatch("H", "regex", "x+")
    assert HeaderMatch("H", "regex", "x+") != HeaderMatch("h", "regex", "x+")
    assert hash(QueryParamMatch("q", "regex", "x")) == hash(QueryParamMatch("q", "regex", "x"))
    # replace() builds a new value whose pattern is the new one.
    moved = replace(a, path_regex="/w")
    assert moved.matches(HttpRequest("GET", "/w")) and not moved.matches(HttpRequest("GET", "/v1"))


def test_compiled_regex_caches_by_pattern_text() -> None:
    assert compiled_regex("a+b") is compiled_regex("a+b")
    with pytest.raises(re.error):
        compiled_regex("(")
