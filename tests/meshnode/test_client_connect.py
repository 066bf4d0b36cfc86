"""The ``intention``, ``config`` and ``ca`` commands, and the HCL they read.

The commands run through ``meshnode.cli.main`` against a real HTTP server (aiohttp on
127.0.0.1, a free port, its own loop in a daemon thread: the CLI's client blocks)
that answers with fixed Consul-shaped bodies and records every request, so each test
states the exact requests sent and the output printed. The HCL conversion is tested
on Consul's documented examples against their JSON twins, and with hypothesis.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode import cli
from meshnode.client import ClientError
from meshnode.client_connect import intention_body
from meshnode.hclconv import (
    LIST_FIELDS,
    NAMED_MAPS,
    OPAQUE_MAPS,
    HclError,
    loads,
    normalize_key,
    parse_document,
)
from meshnode.procs import free_port

# --------------------------------------------------------------------------- a real API


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """The raw (still percent-encoded) path, without the query."""
    query: dict[str, str]
    body: Any
    token: str | None


class FakeAgentApi:
    """An HTTP server answering ``(method, raw path)`` with set JSON; 404 otherwise."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {}
        self.requests: list[Request] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.address = ""

    def answer(self, method: str, path: str, body: Any, status: int = 200) -> None:
        self.answers[(method, path)] = (status, body)

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append(
            Request(
                request.method,
                request.rel_url.raw_path,
                dict(request.query),
                json.loads(raw) if raw else None,
                request.headers.get("X-Consul-Token"),
            )
        )
        status, body = self.answers.get(
            (request.method, request.rel_url.raw_path), (404, "no such endpoint")
        )
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return f"{host}:{port}"

    def __enter__(self) -> FakeAgentApi:
        self.thread.start()
        self.address = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


Meshnode = Callable[..., Result]


@pytest.fixture
def api() -> Iterator[FakeAgentApi]:
    with FakeAgentApi() as server:
        yield server


@pytest.fixture
def meshnode(api: FakeAgentApi, capsys: pytest.CaptureFixture[str]) -> Meshnode:
    """``meshnode ARGS... -http-addr <the fake API>``, in process."""

    def run(*argv: str) -> Result:
        code = cli.main([*argv, "-http-addr", api.address])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def assert_failed(result: Result, *fragments: str) -> None:
    """Exit 1, nothing on stdout, one line on stderr (no traceback) holding each fragment."""
    assert result.code == 1, result
    assert result.out == ""
    assert result.err.endswith("\n") and result.err.count("\n") == 1, result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err, (fragment, result.err)


# --------------------------------------------------------------------------- Consul's HCL

SPLITTER_HCL = """
Kind = "service-splitter"
Name = "web"
Splits = [
  {
    Weight        = 80
    ServiceSubset = "v1"
  },
  {
    Weight        = 20
    ServiceSubset = "v2"
  },
]
"""
SPLITTER_JSON = """{
  "Kind": "service-splitter",
  "Name": "web",
  "Splits": [
    {"Weight": 80, "ServiceSubset": "v1"},
    {"Weight": 20, "ServiceSubset": "v2"}
  ]
}"""

RESOLVER_HCL = r"""
Kind           = "service-resolver"
Name           = "web"
DefaultSubset  = "v1"
ConnectTimeout = "15s"
Subsets = {
  v1 = {
    Filter = "Service.Meta.version == v1"
  }
  v2 = {
    Filter      = "Service.Meta.version == v2 and \"canary\" in Service.Tags"
    OnlyPassing = true
  }
}
"""
RESOLVER_JSON = r"""{
  "Kind": "service-resolver",
  "Name": "web",
  "DefaultSubset": "v1",
  "ConnectTimeout": "15s",
  "Subsets": {
    "v1": {"Filter": "Service.Meta.version == v1"},
    "v2": {
      "Filter": "Service.Meta.version == v2 and \"canary\" in Service.Tags",
      "OnlyPassing": true
    }
  }
}"""

# Consul's service-router examples write nested blocks inside the route objects
# (valid HCL 1, not HCL 2), and a comment inside the list.
ROUTER_HCL = """
Kind = "service-router"
Name = "web"
Routes = [
  {
    Match {
      HTTP {
        PathPrefix = "/admin"
      }
    }

    Destination {
      Service = "admin"
    }
  },
  {
    Match {
      HTTP {
        Header = [
          {
            Name  = "x-debug"
            Exact = "1"
          },
        ]
        QueryParam = [{ Name = "canary", Present = true }]
        Methods    = ["GET", "HEAD"]
      }
    }
    Destination {
      Service       = "web"
      ServiceSubset = "canary"
      NumRetries    = 3
      RetryOnStatusCodes = [503, 504]
    }
  },
  # NOTE: a default catch-all will send unmatched traffic to "web"
]
"""
ROUTER_JSON = """{
  "Kind": "service-router",
  "Name": "web",
  "Routes": [
    {
      "Match": {"HTTP": {"PathPrefix": "/admin"}},
      "Destination": {"Service": "admin"}
    },
    {
      "Match": {"HTTP": {
        "Header": [{"Name": "x-debug", "Exact": "1"}],
        "QueryParam": [{"Name": "canary", "Present": true}],
        "Methods": ["GET", "HEAD"]
      }},
      "Destination": {
        "Service": "web", "ServiceSubset": "canary",
        "NumRetries": 3, "RetryOnStatusCodes": [503, 504]
      }
    }
  ]
}"""

DEFAULTS_HCL = """
Kind     = "service-defaults"
Name     = "web"
Protocol = "http"
MeshGateway {
  Mode = "local"
}
UpstreamConfig {
  Defaults {
    ConnectTimeoutMs = 5000
    Limits { MaxConnections = 512 }
  }
  Overrides {
    Name     = "db"
    Protocol = "tcp"
  }
}
"""
DEFAULTS_JSON = """{
  "Kind": "service-defaults",
  "Name": "web",
  "Protocol": "http",
  "MeshGateway": {"Mode": "local"},
  "UpstreamConfig": {
    "Defaults": {"ConnectTimeoutMs": 5000, "Limits": {"MaxConnections": 512}},
    "Overrides": [{"Name": "db", "Protocol": "tcp"}]
  }
}"""

INTENTION_HCL = """
# L7 rules: reads of /v2 from the web team, nothing else.
SourceName      = "frontend"
DestinationName = "api"
Description     = "frontend reads /v2"
Permissions = [
  {
    Action = "allow"
    HTTP {
      PathPrefix = "/v2"
      Methods    = ["GET", "HEAD"]
      Header = [
        { Name = "x-team", Exact = "web" },
      ]
    }
  },
  {
    Action = "deny"
    HTTP {
      PathPrefix = "/"
    }
  },
]
"""
INTENTION_JSON = """{
  "SourceName": "frontend",
  "DestinationName": "api",
  "Description": "frontend reads /v2",
  "Permissions": [
    {
      "Action": "allow",
      "HTTP": {
        "PathPrefix": "/v2",
        "Methods": ["GET", "HEAD"],
        "Header": [{"Name": "x-team", "Exact": "web"}]
      }
    },
    {"Action": "deny", "HTTP": {"PathPrefix": "/"}}
  ]
}"""

SERVICE_INTENTIONS_HCL = """
Kind = "service-intentions"
Name = "api"
Sources = [
  {
    Name = "frontend"
    Permissions = [
      {
        Action = "allow"
        HTTP {
          PathExact = "/update-score"
          Methods   = ["PUT"]
        }
      }
    ]
  },
  {
    Name   = "*"
    Action = "deny"
  }
]
"""
SERVICE_INTENTIONS_JSON = """{
  "Kind": "service-intentions",
  "Name": "api",
  "Sources": [
    {
      "Name": "frontend",
      "Permissions": [
        {"Action": "allow", "HTTP": {"PathExact": "/update-score", "Methods": ["PUT"]}}
      ]
    },
    {"Name": "*", "Action": "deny"}
  ]
}"""

CONSUL_EXAMPLES = {
    "service-splitter 80/20": (SPLITTER_HCL, SPLITTER_JSON),
    "service-resolver subsets": (RESOLVER_HCL, RESOLVER_JSON),
    "service-router routes": (ROUTER_HCL, ROUTER_JSON),
    "service-defaults protocol": (DEFAULTS_HCL, DEFAULTS_JSON),
    "intention with permissions": (INTENTION_HCL, INTENTION_JSON),
    "service-intentions": (SERVICE_INTENTIONS_HCL, SERVICE_INTENTIONS_JSON),
}


@pytest.mark.parametrize("example", CONSUL_EXAMPLES)
def test_consul_examples_in_hcl_equal_their_json(example: str) -> None:
    hcl, json_text = CONSUL_EXAMPLES[example]
    assert loads(hcl) == json.loads(json_text)
    assert parse_document(hcl, "entry.hcl") == parse_document(json_text, "entry.json")
    # Without a telling extension the JSON fails, so the HCL is tried.
    assert parse_document(hcl, "entry") == json.loads(json_text)


def test_blocks_repeated_or_once_as_consul_decodes_them() -> None:
    # Splits is a list in Consul: one block is a list of one; a field that is an
    # object (MeshGateway) takes one block as that object; repeats are a list.
    assert loads('Splits {\n  Weight = 100\n}\nMeshGateway { Mode = "local" }\n') == {
        "Splits": [{"Weight": 100}],
        "MeshGateway": {"Mode": "local"},
    }
    two = 'Splits {\n Weight = 90\n ServiceSubset = "v1"\n}\nSplits {\n Weight = 10\n}\n'
    assert loads(two) == {"Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10}]}
    # The agent matches keys without case or underscores; so does the list rule.
    assert loads("splits {\n weight = 100\n}\n") == {"splits": [{"weight": 100}]}
    # An object where a list belongs is a list of one (Consul's weak decoding).
    assert loads("Splits = { Weight = 100 }\n") == {"Splits": [{"Weight": 100}]}


def test_labelled_blocks_are_a_map_by_label() -> None:
    text = (
        'Subsets "v1" {\n  Filter = "Service.Meta.version == v1"\n}\n'
        'Subsets "v2" {\n  OnlyPassing = true\n}\n'
    )
    assert loads(text) == {
        "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"OnlyPassing": True}}
    }


def test_names_and_opaque_maps_are_not_fields() -> None:
    # A subset named "routes" is not the Routes list; Meta and Config pass through.
    text = """
Kind = "proxy-defaults"
Name = "global"
Config {
  local_connect_timeout_ms = 1000
  routes { a = 1 }
}
Meta = { splits = "x", "team.name" = "web" }
"""
    assert loads(text) == {
        "Kind": "proxy-defaults",
        "Name": "global",
        "Config": {"local_connect_timeout_ms": 1000, "routes": {"a": 1}},
        "Meta": {"splits": "x", "team.name": "web"},
    }
    assert loads('Subsets = { routes = { Filter = "x" } }') == {
        "Subsets": {"routes": {"Filter": "x"}}
    }


def test_strings_numbers_and_heredocs() -> None:
    text = r"""
A = "tab\there \"quoted\" back\\slash \u00e9 \U0001F600"
B = "$${not a template} %%{nor this}"
C = <<EOF
line one
  "two"
EOF
D = <<-EOT
    indented
      more
    EOT
E = -1.5
F = 1e3
G = null
H = false
"""
    assert loads(text) == {
        "A": 'tab\there "quoted" back\\slash é 😀',
        "B": "${not a template} %{nor this}",
        "C": 'line one\n  "two"',
        "D": "indented\n  more",
        "E": -1.5,
        "F": 1000.0,
        "G": None,
        "H": False,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Weight = 40 + 40\n", "Weight: expressions are not supported"),
        ("Name = web\n", 'Name: web is not a value; quote a string ("web")'),
        ('Routes = [{ Match = { HTTP = { PathPrefix = upper("x") } } }]\n', "Routes[0].Match"),
        ('Name = "${var.name}"\n', "Name: templates (${...}) are not supported"),
        ('Name = "%{if x}y%{endif}"\n', "templates (%{...})"),
        ('Name = "a\\qb"\n', "Name: invalid escape sequence \\q"),
        ("Meta = { (k) = 1 }\n", "computed keys are not supported"),
        ('Subsets "v1" {}\nSubsets "v1" {}\n', "Subsets.v1: block given twice"),
        # HCL 1's repeated block inside an object: python-hcl2 would keep the last.
        (
            "Routes = [{\n  Match { }\n  Match { }\n}]\n",
            "line 3: Match is given twice in one object",
        ),
        ("A = 1\nA = 2\n", "line 2: A is given twice"),  # python-hcl2 keeps the last
        ("A = 1\nA { }\n", "Attribute A is already defined"),
        ('Kind = "x"\nName = \n', "invalid HCL at line 2"),
    ],
)
def test_hcl_errors_are_one_line_and_name_the_place(text: str, message: str) -> None:
    with pytest.raises(HclError) as raised:
        loads(text)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_syntax_error_position_is_in_the_original_text() -> None:
    # The scanner inserted "=" after Match and HTTP; errors after them on the same line
    # are reported at the column the user sees (the stray "=").
    text = 'Routes = [{ Match { HTTP { PathPrefix = "/a" = } } }]\n'
    with pytest.raises(HclError, match=r"line 1, column 46: unexpected '='$"):
        loads(text)
    text = 'Routes = [\n  {\n    Match { HTTP { PathPrefix = "/a", = 1 } }\n  },\n]\n'
    with pytest.raises(HclError, match=r"line 3, column 39: unexpected '= 1 } }'$"):
        loads(text)


def test_parse_document_picks_json_or_hcl() -> None:
    assert parse_document('{"Kind": "x"}', "-") == {"Kind": "x"}
    assert parse_document('Kind = "x"', "-") == {"Kind": "x"}
    assert parse_document('Kind = "x"', "entry.HCL") == {"Kind": "x"}
    with pytest.raises(HclError, match=r"^e\.json: invalid JSON: "):
        parse_document('Kind = "x"', "e.json")
    # Broken JSON is reported as JSON even without an extension.
    with pytest.raises(HclError, match=r"^entry: invalid JSON: Expecting"):
        parse_document('{"Kind": "x",}', "entry")
    with pytest.raises(HclError, match=r"^e\.hcl: invalid HCL at line 1"):
        parse_document('{"Kind": "x"}', "e.hcl")
    with pytest.raises(HclError, match=r"^e\.json: expected a JSON object, got list"):
        parse_document("[1]", "e.json")


# --------------------------------------------------------------------------- properties

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HCL_RESERVED = frozenset({"true", "false", "null", "for", "in", "if", "endif", "else", "endfor"})
SPECIAL_KEYS = LIST_FIELDS | NAMED_MAPS | OPAQUE_MAPS


def _plain_key(key: str) -> bool:
    # "__is_block__" is python-hcl2's block marker, which a document cannot use.
    return (
        normalize_key(key) not in SPECIAL_KEYS and key not in HCL_RESERVED and key != "__is_block__"
    )


identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(_plain_key)
# python-hcl2 reads "${" and "%{" as templates, and "$${" only when closed: keep those
# out of arbitrary text (test_strings_numbers_and_heredocs covers the escapes).
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=12).filter(
    lambda text: "${" not in text and "%{" not in text
)
object_keys = identifiers | texts.filter(_plain_key)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(object_keys, inner, max_size=3),
    max_leaves=12,
)
documents = st.dictionaries(identifiers, values, max_size=4)


def hcl_string(text: str, *, ascii_only: bool = False) -> str:
    escaped = []
    for char in text:
        if char in '\\"':
            escaped.append("\\" + char)
        elif char in "\n\r\t":
            escaped.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char])
        elif ord(char) < 0x20 or (ascii_only and ord(char) > 0x7E):
            code = ord(char)
            escaped.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _is_identifier(key: str) -> bool:
    return IDENTIFIER.fullmatch(key) is not None and key not in HCL_RESERVED


def hcl_value(value: Any, *, nested_blocks: bool, ascii_only: bool) -> str:
    """``value`` as an HCL expression; with ``nested_blocks``, an object's object
    members are written HCL 1 style, ``Key { ... }``, as Consul's examples do."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return hcl_string(value, ascii_only=ascii_only)
    if isinstance(value, list):
        items = [hcl_value(v, nested_blocks=nested_blocks, ascii_only=ascii_only) for v in value]
        return "[" + ", ".join(items) + "]"
    lines = []
    for key, item in value.items():
        name = key if _is_identifier(key) else hcl_string(key, ascii_only=ascii_only)
        written = hcl_value(item, nested_blocks=nested_blocks, ascii_only=ascii_only)
        separator = " " if nested_blocks and isinstance(item, dict) else " = "
        lines.append(f"{name}{separator}{written}")
    return "{\n" + "\n".join(lines) + "\n}"


def hcl_body(document: dict[str, Any], *, blocks: bool, ascii_only: bool = False) -> str:
    """A document as an HCL body; with ``blocks``, objects (with identifier keys) are
    written as blocks and lists of two or more such objects as repeated blocks."""

    def block_able(value: Any) -> bool:
        return isinstance(value, dict) and all(_is_identifier(key) for key in value)

    lines = []
    for key, value in document.items():
        if blocks and block_able(value):
            lines.append(f"{key} {{\n{hcl_body(value, blocks=True, ascii_only=ascii_only)}}}")
        elif blocks and isinstance(value, list) and len(value) > 1 and all(map(block_able, value)):
            for item in value:
                lines.append(f"{key} {{\n{hcl_body(item, blocks=True, ascii_only=ascii_only)}}}")
        else:
            written = hcl_value(value, nested_blocks=blocks, ascii_only=ascii_only)
            lines.append(f"{key} = {written}")
    return "".join(line + "\n" for line in lines)


def same_json(left: object, right: object) -> bool:
    """Equal as JSON: True is not 1, 1.0 is not 1."""
    return json.dumps(left, sort_keys=True) == json.dumps(right, sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_any_json_document_written_as_hcl_reads_back(document: dict[str, Any]) -> None:
    text = hcl_body(document, blocks=False)
    assert same_json(loads(text), document), text


@settings(max_examples=300, deadline=None)
@given(documents)
def test_blocks_and_hcl1_nested_blocks_read_as_their_json(document: dict[str, Any]) -> None:
    text = hcl_body(document, blocks=True)
    assert same_json(loads(text), document), text


@settings(max_examples=200, deadline=None)
@given(documents)
def test_unicode_escapes_read_back(document: dict[str, Any]) -> None:
    text = hcl_body(document, blocks=False, ascii_only=True)
    assert text.isascii()
    assert same_json(loads(text), document), text


splits = st.lists(
    st.fixed_dictionaries({"Weight": st.integers(0, 100), "ServiceSubset": texts}),
    min_size=1,
    max_size=4,
)


@given(splits)
def test_splits_as_blocks_list_or_json_are_one_entry(items: list[dict[str, Any]]) -> None:
    as_list = hcl_body({"Kind": "service-splitter", "Splits": items}, blocks=False)
    as_blocks = 'Kind = "service-splitter"\n' + "".join(
        f"Splits {{\n  Weight = {item['Weight']}\n"
        f"  ServiceSubset = {hcl_string(item['ServiceSubset'])}\n}}\n"
        for item in items
    )
    expected = {"Kind": "service-splitter", "Splits": items}
    assert loads(as_list) == loads(as_blocks) == expected
    assert parse_document(json.dumps(expected), "-") == expected


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='ab={}[]()",:#/*\n\\$%<-E 1.', max_size=40))
def test_any_text_reads_or_fails_with_an_hcl_error(text: str) -> None:
    try:
        loads(text)
    except HclError as exc:
        assert "\n" not in str(exc)


# --------------------------------------------------------------------------- intention body


def test_intention_body_from_flags() -> None:
    assert intention_body("web", "db", None) == {
        "SourceName": "web",
        "DestinationName": "db",
        "Action": "allow",
    }
    assert intention_body("web", "db", "deny")["Action"] == "deny"
    with pytest.raises(ClientError, match="SRC and DST are required"):
        intention_body("web", None, None)


def test_intention_body_from_a_file() -> None:
    document = json.loads(INTENTION_JSON)
    assert intention_body(None, None, None, document) == document
    assert intention_body("frontend", "api", None, document) == document
    partial = {"Action": "deny"}
    assert intention_body("web", "db", None, partial) == {
        "Action": "deny",
        "SourceName": "web",
        "DestinationName": "db",
    }
    with pytest.raises(ClientError, match="-deny cannot be combined with -file"):
        intention_body(None, None, "deny", document)
    with pytest.raises(ClientError, match="SourceName 'frontend' disagrees with 'web'"):
        intention_body("web", "api", None, document)
    with pytest.raises(ClientError, match="no DestinationName"):
        intention_body("web", None, None, partial)
    with pytest.raises(ClientError, match="exactly one of Action and Permissions"):
        intention_body(None, None, None, {**document, "Action": "allow"})
    with pytest.raises(ClientError, match="exactly one of Action and Permissions"):
        intention_body("a", "b", None, {})


# --------------------------------------------------------------------------- intention

EXACT = "/v1/connect/intentions/exact"
LISTED = [
    {
        "ID": "5e9fc9f0-0f5f-4b6b-8f4e-9c1f8c1f0a01",
        "SourceName": "web",
        "DestinationName": "db",
        "Action": "allow",
        "Precedence": 9,
    },
    {
        "ID": "",
        "SourceName": "frontend",
        "DestinationName": "api",
        "Permissions": json.loads(INTENTION_JSON)["Permissions"],
        "Precedence": 9,
    },
    {"SourceName": "*", "DestinationName": "*", "Action": "deny", "Precedence": 5},
]


def test_intention_create_allows_by_default(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("GET", "/v1/connect/intentions", [])
    api.answer("PUT", EXACT, True)
    result = meshnode("intention", "create", "web", "db", "-token", "s3cret")
    assert result == Result(0, "Created: web => db (allow)\n", "")
    assert api.requests == [
        Request("GET", "/v1/connect/intentions", {}, None, "s3cret"),
        Request(
            "PUT",
            EXACT,
            {"source": "web", "destination": "db"},
            {"SourceName": "web", "DestinationName": "db", "Action": "allow"},
            "s3cret",
        ),
    ]


def test_intention_create_deny(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("GET", "/v1/connect/intentions", [])
    api.answer("PUT", EXACT, True)
    assert meshnode("intention", "create", "--deny", "web", "db").out == (
        "Created: web => db (deny)\n"
    )
    assert api.requests[-1].body == {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    with pytest.raises(SystemExit) as exited:  # argparse: not both
        meshnode("intention", "create", "-allow", "-deny", "web", "db")
    assert exited.value.code == 2


def test_intention_create_refuses_an_existing_pair_without_replace(
    api: FakeAgentApi, meshnode: Meshnode
) -> None:
    api.answer("GET", "/v1/connect/intentions", LISTED)
    result = meshnode("intention", "create", "-deny", "web", "db")
    assert_failed(result, "meshnode intention create: error:", "already exists", "-replace")
    assert [request.method for request in api.requests] == ["GET"]

    api.answer("PUT", EXACT, True)
    result = meshnode("intention", "create", "-deny", "-replace", "web", "db")
    assert result == Result(0, "Created: web => db (deny)\n", "")
    assert [request.method for request in api.requests] == ["GET", "PUT"]  # no check


@pytest.mark.parametrize(("name", "text"), [("l7.hcl", INTENTION_HCL), ("l7.json", INTENTION_JSON)])
def test_intention_create_from_a_file_with_permissions(
    api: FakeAgentApi, meshnode: Meshnode, tmp_path: Path, name: str, text: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    api.answer("GET", "/v1/connect/intentions", [])
    api.answer("PUT", EXACT, True)
    result = meshnode("intention", "create", "-file", str(path))
    assert result == Result(0, "Created: frontend => api (L7: 2 permissions)\n", "")
    put = api.requests[-1]
    assert put.query == {"source": "frontend", "destination": "api"}
    assert put.body == json.loads(INTENTION_JSON)


def test_intention_create_from_stdin_with_src_and_dst(
    api: FakeAgentApi, meshnode: Meshnode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('Action = "deny"\nDescription = "no"\n'))
    api.answer("GET", "/v1/connect/intentions", [])
    api.answer("PUT", EXACT, True)
    assert meshnode("intention", "create", "-file", "-", "web", "db").code == 0
    assert api.requests[-1].body == {
        "Action": "deny",
        "Description": "no",
        "SourceName": "web",
        "DestinationName": "db",
    }


def test_intention_create_usage_errors(
    api: FakeAgentApi, meshnode: Meshnode, tmp_path: Path
) -> None:
    assert_failed(meshnode("intention", "create", "web"), "SRC and DST are required")
    path = tmp_path / "i.json"
    path.write_text(INTENTION_JSON)
    assert_failed(
        meshnode("intention", "create", "-deny", "-file", str(path)),
        "meshnode intention create: error: -deny cannot be combined with -file",
    )
    assert api.requests == []


def test_intention_delete(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("DELETE", EXACT, True)
    assert meshnode("intention", "delete", "web", "db") == Result(0, "Intention deleted.\n", "")
    assert api.requests == [
        Request("DELETE", EXACT, {"source": "web", "destination": "db"}, None, None)
    ]


def test_intention_list_table_and_json(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("GET", "/v1/connect/intentions", LISTED)
    uuid = LISTED[0]["ID"]
    assert meshnode("intention", "list").out.splitlines() == [
        "ID" + " " * 36 + "Source    Action             Destination  Precedence",
        f"{uuid}  web       allow              db           9",
        "-                                     frontend  L7: 2 permissions  api          9",
        "-                                     *         deny               *            5",
    ]
    assert json.loads(meshnode("intention", "list", "-format", "json").out) == LISTED
    # -format also works before the action, as for "services".
    assert json.loads(meshnode("intention", "-format=json", "list").out) == LISTED

    api.answer("GET", "/v1/connect/intentions", LISTED[2:])
    assert meshnode("intention", "list").out.splitlines() == [
        "Source  Action  Destination  Precedence",
        "*       deny    *            5",
    ]
    api.answer("GET", "/v1/connect/intentions", [])
    assert meshnode("intention", "list").out == "There are no intentions.\n"


def test_intention_get(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("GET", EXACT, LISTED[1])
    result = meshnode("intention", "get", "frontend", "api")
    assert result.code == 0
    assert result.out.splitlines() == [
        "Source:       frontend",
        "Destination:  api",
        "Action:       L7: 2 permissions",
        "Precedence:   9",
        "Permissions:",
        '  {"Action": "allow", "HTTP": {"Header": [{"Exact": "web", "Name": "x-team"}],'
        ' "Methods": ["GET", "HEAD"], "PathPrefix": "/v2"}}',
        '  {"Action": "deny", "HTTP": {"PathPrefix": "/"}}',
    ]
    assert api.requests[-1].query == {"source": "frontend", "destination": "api"}
    assert (
        json.loads(meshnode("intention", "get", "frontend", "api", "-format=json").out)
        == (LISTED[1])
    )


def test_intention_get_missing(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("GET", EXACT, "Intention not found\n", status=404)
    assert_failed(
        meshnode("intention", "get", "web", "db"),
        "meshnode intention get: error: GET /v1/connect/intentions/exact?source=web&destination=db:"
        " 404 Intention not found",
    )


@pytest.mark.parametrize(
    ("allowed", "printed", "code"), [(True, "Allowed", 0), (False, "Denied", 2)]
)
def test_intention_check_exit_codes(
    api: FakeAgentApi, meshnode: Meshnode, allowed: bool, printed: str, code: int
) -> None:
    api.answer("GET", "/v1/connect/intentions/check", {"Allowed": allowed})
    assert meshnode("intention", "check", "web", "db") == Result(code, printed + "\n", "")
    assert api.requests == [
        Request(
            "GET",
            "/v1/connect/intentions/check",
            {"source": "web", "destination": "db"},
            None,
            None,
        )
    ]


def test_names_are_encoded_in_queries_and_paths(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("GET", "/v1/connect/intentions/check", {"Allowed": True})
    meshnode("intention", "check", "a b&c", "*")
    assert api.requests[-1].query == {"source": "a b&c", "destination": "*"}
    api.answer("GET", "/v1/config/service-defaults/we%2Fb%3F", {"Kind": "service-defaults"})
    assert meshnode("config", "read", "-kind", "service-defaults", "-name", "we/b?").code == 0


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("router.hcl", ROUTER_HCL),
        ("router.json", ROUTER_JSON),
        ("router.conf", ROUTER_HCL),  # neither extension: not JSON, so HCL
        ("router.txt", ROUTER_JSON),
    ],
)
def test_config_write(
    api: FakeAgentApi, meshnode: Meshnode, tmp_path: Path, name: str, text: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    api.answer("PUT", "/v1/config", True)
    result = meshnode("config", "write", str(path), "-token", "t")
    assert result == Result(0, "Config entry written: service-router/web\n", "")
    assert api.requests == [Request("PUT", "/v1/config", {}, json.loads(ROUTER_JSON), "t")]


def test_config_write_from_stdin(
    api: FakeAgentApi, meshnode: Meshnode, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.answer("PUT", "/v1/config", True)
    for text in (SPLITTER_HCL, SPLITTER_JSON):
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))
        assert meshnode("config", "write", "-").out == (
            "Config entry written: service-splitter/web\n"
        )
        assert api.requests[-1].body == json.loads(SPLITTER_JSON)


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [
        (None, "", ("meshnode config write: error:", "missing.hcl: No such file or directory")),
        ("bad.json", '{"Kind": "service-defaults",', ("bad.json: invalid JSON:",)),
        ("bad.hcl", 'Kind = "service-defaults"\nName = ', ("bad.hcl: invalid HCL at line 2",)),
        ("expr.hcl", "Kind = service-defaults\n", ("expr.hcl: Kind: service-defaults is not",)),
        (
            "nokind.json",
            '{"Name": "web"}',
            ("nokind.json: a config entry needs a Kind and a Name",),
        ),
        ("list.json", "[]", ("list.json: expected a JSON object",)),
    ],
)
def test_config_write_file_errors(
    api: FakeAgentApi,
    meshnode: Meshnode,
    tmp_path: Path,
    name: str | None,
    text: str,
    fragments: tuple[str, ...],
) -> None:
    path = tmp_path / (name or "missing.hcl")
    if name is not None:
        path.write_text(text)
    assert_failed(meshnode("config", "write", str(path)), *fragments)
    assert api.requests == []


def test_config_write_api_errors(api: FakeAgentApi, meshnode: Meshnode, tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    path.write_text(SPLITTER_JSON)
    api.answer("PUT", "/v1/config", "Splits: weights add up to 100.5\n(not 100)\n", status=400)
    assert_failed(
        meshnode("config", "write", str(path)),
        "PUT /v1/config: 400 Splits: weights add up to 100.5 (not 100)",
    )
    api.answer("PUT", "/v1/config", False)
    assert_failed(
        meshnode("config", "write", str(path)), "config entry not updated: service-splitter/web"
    )


def test_config_read_delete_list(api: FakeAgentApi, meshnode: Meshnode) -> None:
    entry = json.loads(RESOLVER_JSON)
    api.answer("GET", "/v1/config/service-resolver/web", entry)
    result = meshnode("config", "read", "-kind", "service-resolver", "-name", "web")
    assert result.code == 0 and json.loads(result.out) == entry

    api.answer("DELETE", "/v1/config/service-resolver/web", True)
    result = meshnode("config", "delete", "--kind=service-resolver", "--name=web")
    assert result == Result(0, "Config entry deleted: service-resolver/web\n", "")

    api.answer("GET", "/v1/config/service-resolver", [entry, {**entry, "Name": "api"}])
    assert meshnode("config", "list", "-kind", "service-resolver").out == "web\napi\n"
    listed = meshnode("config", "list", "-kind", "service-resolver", "-format", "json")
    assert [e["Name"] for e in json.loads(listed.out)] == ["web", "api"]
    assert [(r.method, r.path) for r in api.requests] == [
        ("GET", "/v1/config/service-resolver/web"),
        ("DELETE", "/v1/config/service-resolver/web"),
        ("GET", "/v1/config/service-resolver"),
        ("GET", "/v1/config/service-resolver"),
    ]


def test_config_read_missing(api: FakeAgentApi, meshnode: Meshnode) -> None:
    result = meshnode("config", "read", "-kind", "service-router", "-name", "nope")
    assert_failed(result, "meshnode config read: error: GET /v1/config/service-router/nope: 404")
    with pytest.raises(SystemExit) as exited:
        meshnode("config", "read", "-kind", "service-router")  # -name is required
    assert exited.value.code == 2


# --------------------------------------------------------------------------- ca

ROOTS = {
    "ActiveRootID": "6b:2f:41",
    "TrustDomain": "11111111-2222.consul",
    "Roots": [
        {
            "ID": "6b:2f:41",
            "Name": "meshnode CA Primary Cert",
            "SerialNumber": 7,
            "SigningKeyID": "aa:bb",
            "NotBefore": "2025-01-01T00:00:00Z",
            "NotAfter": "2035-01-01T00:00:00Z",
            "RootCert": "-----BEGIN CERTIFICATE-----\n...",
            "IntermediateCerts": [],
            "Active": True,
        },
        {
            "ID": "01:aa:ff",
            "Name": "meshnode CA Primary Cert (old)",
            "SerialNumber": 3,
            "SigningKeyID": "cc:dd",
            "NotBefore": "2024-01-01T00:00:00Z",
            "NotAfter": "2034-01-01T00:00:00Z",
            "RootCert": "-----BEGIN CERTIFICATE-----\n...",
            "IntermediateCerts": None,
            "Active": False,
        },
    ],
}


def test_ca_roots(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("GET", "/v1/agent/connect/ca/roots", ROOTS)
    assert meshnode("ca", "roots").out.splitlines() == [
        "Trust domain: 11111111-2222.consul",
        "ID        Name                            Active  Not After",
        "6b:2f:41  meshnode CA Primary Cert        yes     2035-01-01T00:00:00Z",
        "01:aa:ff  meshnode CA Primary Cert (old)  no      2034-01-01T00:00:00Z",
    ]
    assert json.loads(meshnode("ca", "roots", "-format", "json").out) == ROOTS


def test_ca_rotate_prints_the_new_root(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("PUT", "/v1/mesh/ca/rotate", {"ActiveRootID": "9c:00:12"})
    assert meshnode("ca", "rotate", "-token", "root") == Result(0, "9c:00:12\n", "")
    assert api.requests == [Request("PUT", "/v1/mesh/ca/rotate", {}, None, "root")]
    api.answer("PUT", "/v1/mesh/ca/rotate", "only the leader rotates", status=500)
    assert_failed(meshnode("ca", "rotate"), "meshnode ca rotate: error:", "500 only the leader")


def _status(*agents: dict[str, Any]) -> dict[str, Any]:
    return {
        "BundleFingerprint": "sha256:0123456789abcdef0123",
        "Agents": list(agents),
        "Lagging": sum(agent["Lagging"] for agent in agents),
        "ExpiringSoon": sum(agent["ExpiringSoon"] for agent in agents),
    }


def _agent(node: str, **changes: Any) -> dict[str, Any]:
    agent = {
        "Node": node,
        "BundleFingerprint": "sha256:0123456789abcdef0123",
        "SoonestExpiry": "2025-06-01T12:00:00Z",
        "Lagging": False,
        "ExpiringSoon": False,
    }
    return agent | changes


def test_ca_status_healthy_exits_0(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("GET", "/v1/mesh/ca/status", _status(_agent("n1"), _agent("n2")))
    result = meshnode("ca", "status")
    assert result.code == 0
    assert result.out.splitlines() == [
        "Cluster bundle: sha256:012345678",
        "Node  Bundle            In Sync  Soonest Expiry        Flags",
        "n1    sha256:012345678  yes      2025-06-01T12:00:00Z  -",
        "n2    sha256:012345678  yes      2025-06-01T12:00:00Z  -",
        "2/2 agents in sync, 0 lagging, 0 expiring soon",
    ]


def test_ca_status_lagging_or_expiring_exits_2(api: FakeAgentApi, meshnode: Meshnode) -> None:
    status = _status(
        _agent("n1"),
        _agent("n2", BundleFingerprint="sha256:ffff000011112222", Lagging=True),
        _agent("n3", SoonestExpiry="2025-01-01T00:05:00Z", ExpiringSoon=True),
        _agent("n4", BundleFingerprint="", SoonestExpiry=None, Lagging=True, ExpiringSoon=True),
    )
    api.answer("GET", "/v1/mesh/ca/status", status)
    result = meshnode("ca", "status")
    assert result.code == 2
    assert result.out.splitlines() == [
        "Cluster bundle: sha256:012345678",
        "Node  Bundle            In Sync  Soonest Expiry        Flags",
        "n1    sha256:012345678  yes      2025-06-01T12:00:00Z  -",
        "n2    sha256:ffff00001  no       2025-06-01T12:00:00Z  lagging",
        "n3    sha256:012345678  yes      2025-01-01T00:05:00Z  expiring-soon",
        "n4    -                 no       -                     lagging,expiring-soon",
        "2/4 agents in sync, 2 lagging, 2 expiring soon",
    ]
    json_result = meshnode("ca", "status", "-format", "json")
    assert json_result.code == 2 and json.loads(json_result.out) == status

    # The summary counts alone (an agent the answer leaves out) also raise the alarm.
    api.answer("GET", "/v1/mesh/ca/status", _status(_agent("n1")) | {"Lagging": 1})
    assert meshnode("ca", "status").code == 2


def test_ca_status_unexpected_answer(api: FakeAgentApi, meshnode: Meshnode) -> None:
    api.answer("GET", "/v1/mesh/ca/status", ["not", "an", "object"])
    assert_failed(meshnode("ca", "status"), "CA status: expected a JSON object")
    api.answer("GET", "/v1/mesh/ca/status", {"Agents": "n1"})
    assert_failed(meshnode("ca", "status"), "CA status agents: expected a list of objects")


# --------------------------------------------------------------------------- the command line


def test_unreachable_agent_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (["intention", "list"], ["config", "list", "-kind", "x"], ["ca", "status"]):
        code = cli.main([*argv, "-http-addr", address])
        out, err = capsys.readouterr()
        assert_failed(Result(code, out, err), f"meshnode {argv[0]} {argv[1]}: error:", address)


def test_help_lists_the_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("intention", "config", "ca"):
        assert f"\n    {command}" in out
    for argv in (["intention", "create"], ["config", "write"], ["ca", "status"]):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        assert "-http-addr" in capsys.readouterr().out


def test_the_entry_point_exits_2_for_denied(api: FakeAgentApi) -> None:
    """The real process: exit status and streams as a shell script sees them."""
    api.answer("GET", "/v1/connect/intentions/check", {"Allowed": False})
    argv = [sys.executable, "-m", "meshnode.cli", "intention", "check", "web", "db"]
    done = subprocess.run(
        [*argv, "-http-addr", api.address], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (2, "Denied\n", "")
    # CLI startup stays light: neither the HCL parser nor aiohttp is imported to run it.
    probe = (
        "import sys; from meshnode import cli; cli.build_parser();"
        " from meshnode import client_connect;"
        " print(sorted(m for m in ('hcl2', 'lark', 'aiohttp') if m in sys.modules))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert imported.stdout == "[]\n"
