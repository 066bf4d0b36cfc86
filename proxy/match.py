"""HTTP request matching: the conditions of L7 intentions and service-router routes.

Theory of operation
-------------------
An L7 decision looks at one request through ``HttpRequest``: the method, the path
without the query string, the headers (names lowercased once, in ``from_target``; the
first value of a repeated header wins) and the query parameters (first value wins). An
``HttpMatch`` holds if *all* of its conditions hold:

* at most one path condition — exact, prefix, or a regex that must match the *whole*
  path (Envoy ``RouteMatch`` ``path`` / ``prefix`` / ``safe_regex``, whose regexes are
  full matches);
* methods: any of them (Consul's ``Methods``, which Consul turns into an Envoy header
  match on ``:method``);
* every ``HeaderMatch``: present, exact, prefix, suffix or full regex on the header's
  value, optionally inverted. A *missing* header matches only an inverted "present"
  condition — an inverted exact/prefix/... does not match a request that lacks the
  header (Envoy ``HeaderUtility::matchHeaders``);
* every ``QueryParamMatch`` (routes only): present, exact or full regex; a missing
  parameter never matches (Envoy ``QueryParameterMatcher``).

An empty ``HttpMatch`` matches every request. The first intention permission or route
whose match holds decides; that ordering lives with the caller.

Regexes are RE2 in Consul/Envoy; the agent refuses the constructs RE2 lacks when it
parses an entry, so Python's engine gives the same answers here. Each match compiles its
pattern once, when it is built (through ``compiled_regex``, a bounded cache keyed by the
pattern text, so equal patterns share one compiled object and a snapshot rebuild does
not recompile), and the per-request path only calls ``fullmatch``. The compiled pattern
is not part of a match's value: equality, hashing and ``repr`` see only the fields the
match was built from.

Why this lives in ``proxy/``: the proxy is the enforcement point and evaluates these
conditions on every request; ``proxy`` may not import ``meshnode`` (DESIGN.md "Packages
and who may import whom"), so the one definition of the semantics is here, and the
agent's policy module (``meshnode.policy``) imports these types to parse Consul's JSON
shapes into them and to render them back. Nothing here knows those JSON shapes.

References: Envoy ``config.route.v3.RouteMatch``, ``HeaderMatcher``,
``QueryParameterMatcher``; Envoy ``source/common/http/header_utility.cc``; Consul docs
config-entries/service-router (``Match.HTTP``) and service-intentions
(``Permissions[].HTTP``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final, Literal, TypeAlias
from urllib.parse import parse_qsl

#: Distinct patterns kept compiled. Bounded because the agent also compiles patterns
#: that arrive with API queries (catalog filters' ``matches``), which must not grow
#: memory without limit; a policy set's own patterns are far fewer.
REGEX_CACHE_SIZE: Final = 4096


@lru_cache(maxsize=REGEX_CACHE_SIZE)
def compiled_regex(pattern: str) -> re.Pattern[str]:
    """``re.compile(pattern)``, cached by the pattern text; raises ``re.error``."""
    return re.compile(pattern)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What L7 decisions look at. ``headers`` names must be lowercase (HTTP header
    names are case-insensitive; ``from_target`` lowers them once per request)."""

    method: str
    path: str
    """The path without the query string (Envoy matches ``path``/``safe_regex`` on it)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    """First value of each query parameter."""

    @staticmethod
    def from_target(
        method: str, target: str, headers: Iterable[tuple[str, str]] = ()
    ) -> HttpRequest:
        """Build from a request line's target (``/a/b?x=1``) and raw header pairs."""
        path, _, query_text = target.partition("?")
        query: dict[str, str] = {}
        for key, value in parse_qsl(query_text, keep_blank_values=True):
            query.setdefault(key, value)
        lowered: dict[str, str] = {}
        for name, value in headers:
            lowered.setdefault(name.lower(), value)
        return HttpRequest(method.upper(), path, lowered, query)


HeaderMatchKind: TypeAlias = Literal["present", "exact", "prefix", "suffix", "regex"]


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One ``Header`` condition (Consul ServiceRouteHTTPMatchHeader /
    IntentionHTTPHeaderPermission): exactly one of Present, Exact, Prefix, Suffix, Regex."""

    name: str
    kind: HeaderMatchKind
    value: str = ""
    invert: bool = False
    _lowered_name: str = field(default="", init=False, repr=False, compare=False)
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lowered_name", self.name.lower())
        if self.kind == "regex":
            object.__setattr__(self, "_pattern", compiled_regex(self.value))

    def matches(self, headers: Mapping[str, str]) -> bool:
        found = headers.get(self._lowered_name)
        if found is None:
            # Envoy (HeaderUtility::matchHeaders): a missing header matches only an
            # inverted "present" condition.
            return self.invert and self.kind == "present"
        if self.kind == "present":
            result = True
        elif self.kind == "exact":
            result = found == self.value
        elif self.kind == "prefix":
            result = found.startswith(self.value)
        elif self.kind == "suffix":
            result = found.endswith(self.value)
        else:
            assert self._pattern is not None
            result = self._pattern.fullmatch(found) is not None
        return result != self.invert


@dataclass(frozen=True, slots=True)
class QueryParamMatch:
    """One ``QueryParam`` condition of a route: one of Present, Exact, Regex."""

    name: str
    kind: Literal["present", "exact", "regex"]
    value: str = ""
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "regex":
            object.__setattr__(self, "_pattern", compiled_regex(self.value))

    def matches(self, query: Mapping[str, str]) -> bool:
        found = query.get(self.name)
        if found is None:
            return False
        if self.kind == "present":
            return True
        if self.kind == "exact":
            return found == self.value
        assert self._pattern is not None
        return self._pattern.fullmatch(found) is not None


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """HTTP conditions, all of which must hold: at most one path condition, headers,
    query parameters (routes only) and methods (any of)."""

    path_exact: str = ""
    path_prefix: str = ""
    path_regex: str = ""
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryParamMatch, ...] = ()
    methods: tuple[str, ...] = ()
    _path_pattern: re.Pattern[str] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.path_regex:
            object.__setattr__(self, "_path_pattern", compiled_regex(self.path_regex))

    def matches(self, request: HttpRequest) -> bool:
        path = request.path
        if self.path_exact and path != self.path_exact:
            return False
        if self.path_prefix and not path.startswith(self.path_prefix):
            return False
        if self._path_pattern is not None and self._path_pattern.fullmatch(path) is None:
            return False
        if self.methods and request.method.upper() not in self.methods:
            return False
        if not all(h.matches(request.headers) for h in self.headers):
            return False
        return all(q.matches(request.query) for q in self.query_params)

    @property
    def empty(self) -> bool:
        """No conditions at all: matches every request."""
        return self == HttpMatch()
