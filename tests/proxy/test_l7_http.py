"""proxy.l7.http: HTTP/1.1 framing around httptools, without sockets."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from dataclasses import dataclass, field

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import RemoteProtocolError
from proxy.l7.http import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    chunk,
    error_response,
    request_bytes,
    response_bytes,
    rewrite_target,
)


@dataclass
class Message:
    head: RequestHead | ResponseHead
    body: bytes = b""
    complete: bool = False


class Requests(RequestReader):
    """Collects what the reader hands over."""

    __slots__ = ("messages",)

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Message] = []

    def head_received(self, head: RequestHead) -> None:
        self.messages.append(Message(head))

    def on_body(self, data: bytes) -> None:
        self.messages[-1].body += data

    def message_complete(self) -> None:
        self.messages[-1].complete = True


class Responses(ResponseReader):
    __slots__ = ("messages",)

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Message] = []

    def head_received(self, head: ResponseHead) -> None:
        self.messages.append(Message(head))

    def on_body(self, data: bytes) -> None:
        self.messages[-1].body += data

    def message_complete(self) -> None:
        self.messages[-1].complete = True


def parse_requests(*pieces: bytes) -> list[Message]:
    reader = Requests()
    for piece in pieces:
        reader.feed(piece)
    return reader.messages


def test_a_get_keeps_end_to_end_headers_and_drops_hop_by_hop_ones() -> None:
    [message] = parse_requests(
        b"GET /a/b?x=1&x=2&y= HTTP/1.1\r\nHost: api\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade-Insecure-Requests: 1\r\n"
        b"X-Meshnode-Source: forged\r\nAccept: */*\r\n\r\n"
    )
    head = message.head
    assert isinstance(head, RequestHead)
    assert message.complete and head.framing == NO_BODY and head.keep_alive
    assert head.method == "GET" and head.target == b"/a/b?x=1&x=2&y="
    assert head.names == [b"host", b"upgrade-insecure-requests", b"accept"]
    request = head.request()
    assert request.path == "/a/b" and request.query == {"x": "1", "y": ""}
    assert request.headers == {"host": "api", "upgrade-insecure-requests": "1", "accept": "*/*"}
    assert request_bytes(head, b"/v2/b", b"x-meshnode-source: web\r\n") == (
        b"GET /v2/b HTTP/1.1\r\nHost: api\r\nUpgrade-Insecure-Requests: 1\r\nAccept: */*\r\n"
        b"x-meshnode-source: web\r\n\r\n"
    )


def test_connection_close_and_other_droppable_lines_keep_a_head_verbatim() -> None:
    [message] = parse_requests(
        b"GET /v HTTP/1.1\r\nHost: api\r\nConnection: close\r\nKeep-Alive: 5\r\n"
        b"X-Meshnode-Source: forged\r\nTE: trailers\r\nTest: kept\r\n\r\n"
    )
    head = message.head
    assert isinstance(head, RequestHead) and message.complete
    assert head.raw == b"GET /v HTTP/1.1\r\nHost: api\r\nTest: kept\r\n\r\n"
    assert not head.keep_alive and head.framing == NO_BODY
    assert head.request().headers == {"host": "api", "test": "kept"}
    assert request_bytes(head, head.target, b"x-meshnode-source: web\r\n") == (
        b"GET /v HTTP/1.1\r\nHost: api\r\nTest: kept\r\nx-meshnode-source: web\r\n\r\n"
    )
    [old] = parse_requests(b"GET /o HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: a\r\n\r\n")
    assert old.head.raw is not None and old.head.keep_alive
    assert request_bytes(old.head, old.head.target) == b"GET /o HTTP/1.1\r\nHost: a\r\n\r\n"  # type: ignore[arg-type]
    reader = parse_responses(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    )
    response = reader.messages[0].head
    assert response.raw == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    assert response.framing == LENGTH and reader.messages[0].body == b"ok"


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nA: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_heads_with_more_to_drop_take_the_per_header_path(head: bytes) -> None:
    [message] = parse_requests(head)
    assert message.head.raw is None
    assert b"x-hop" not in request_bytes(message.head, b"/").lower()  # type: ignore[arg-type]
    assert b"connection" not in request_bytes(message.head, b"/").lower()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "wire",
    [
        b"GET /a?x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a?x=1 HTTP/1.1\r\nHost: a\r\nConnection: x-b\r\nX-B: 1\r\n\r\n",
    ],
)
def test_a_parsed_request_and_a_released_reader_leave_no_garbage_cycle(wire: bytes) -> None:
    """Cycles would leave every request and connection to the cycle collector."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        reader = Requests()
        reader.feed(wire)
        head = reader.messages[0].head
        assert isinstance(head, RequestHead) and head.request().headers["host"] == "a"
        reader.release()
        del reader, head
        gc.collect()
        ours = (Requests, RequestHead, Message, type(httptools.HttpRequestParser(None)))
        assert not [o for o in gc.garbage if isinstance(o, ours)]  # (others' garbage: ok)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize(
    ("request_line", "connection", "keep_alive"),
    [
        (b"GET / HTTP/1.1", b"", True),
        (b"GET / HTTP/1.1", b"Connection: close\r\n", False),
        (b"GET / HTTP/1.0", b"", False),
        (b"GET / HTTP/1.0", b"Connection: keep-alive\r\n", True),
    ],
)
def test_keep_alive_rules(request_line: bytes, connection: bytes, keep_alive: bool) -> None:
    [message] = parse_requests(request_line + b"\r\nHost: a\r\n" + connection + b"\r\n")
    assert message.head.keep_alive is keep_alive
    assert message.head.version == (b"1.0" if request_line.endswith(b"1.0") else b"1.1")


def test_a_chunked_request_is_dechunked_and_rechunked_without_trailers() -> None:
    [message] = parse_requests(
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    head = message.head
    assert isinstance(head, RequestHead)
    assert head.framing == CHUNKED and message.body == b"hello world" and message.complete
    assert b"x-trailer" not in head.names
    wire = request_bytes(head, head.target) + chunk(b"hello") + chunk(b" world") + b"0\r\n\r\n"
    [again] = parse_requests(wire)
    assert again.body == b"hello world" and again.head.framing == CHUNKED


def test_a_content_length_body() -> None:
    [message] = parse_requests(b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    assert message.head.framing == LENGTH
    assert message.body == b"abc"
    assert not isinstance(message.head, RequestHead) or message.head.idempotent


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ],
)
def test_malformed_requests_are_the_peers_fault(garbage: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_requests(garbage)


def test_a_huge_head_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="head_too_large"):
        parse_requests(b"GET / HTTP/1.1\r\n" + b"X-A: " + b"a" * 70_000 + b"\r\n\r\n")


def parse_responses(*pieces: bytes, head_request: bool = False) -> Responses:
    reader = Responses()
    reader.no_body = head_request
    for piece in pieces:
        reader.feed(piece)
    return reader


def test_a_response_without_length_lasts_until_close() -> None:
    reader = parse_responses(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nsome body")
    [message] = reader.messages
    assert message.head.framing == UNTIL_CLOSE and message.body == b"some body"
    assert not message.complete and not message.head.keep_alive


@pytest.mark.parametrize("status", [204, 304, 100])
def test_statuses_without_a_body(status: int) -> None:
    reader = parse_responses(b"HTTP/1.1 %d X\r\n\r\n" % status)
    assert reader.messages[0].head.framing == NO_BODY and reader.messages[0].complete


def test_the_response_to_a_head_request_ends_at_its_head() -> None:
    reader = parse_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", head_request=True)
    [message] = reader.messages
    assert message.complete and message.head.framing == NO_BODY
    reader.no_body = False
    reader.feed(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert [m.body for m in reader.messages] == [b"", b"ok"]
    assert isinstance(reader.messages[1].head, ResponseHead)
    assert reader.messages[1].head.status == 201


def test_informational_then_final() -> None:
    reader = parse_responses(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    )
    informational, final = (m.head for m in reader.messages)
    assert isinstance(informational, ResponseHead) and informational.informational
    assert isinstance(final, ResponseHead) and not final.informational
    assert reader.messages[1].body == b"hi"


def test_response_heads_are_rebuilt_with_the_proxys_framing() -> None:
    reader = parse_responses(
        b"HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"X-A: 1\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    )
    head = reader.messages[0].head
    assert isinstance(head, ResponseHead)
    assert response_bytes(head, chunked=True, close=False, http10_client=False) == (
        b"HTTP/1.1 200 Fine\r\nX-A: 1\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    assert response_bytes(head, chunked=False, close=True, http10_client=True) == (
        b"HTTP/1.1 200 Fine\r\nX-A: 1\r\nconnection: close\r\n\r\n"
    )


def test_error_responses_carry_the_debug_header() -> None:
    wire = error_response(429, "rate-limit: api\r\nx: y", retry_after=0, close=True)
    reader = parse_responses(wire)
    [message] = reader.messages
    head = message.head
    assert isinstance(head, ResponseHead) and head.status == 429 and message.complete
    assert head.header(b"x-meshnode-error") == b"rate-limit: api??x: y"
    assert head.header(b"retry-after") == b"1"
    assert not head.keep_alive
    assert message.body == b"rate-limit: api??x: y\n"


def test_rewrite_target() -> None:
    assert rewrite_target(b"/api/v1/x?q", "/api/", "/") == b"/v1/x?q"
    assert rewrite_target(b"/other", "/api/", "/") == b"/other"
    assert rewrite_target(b"/other", "", "/x") == b"/other"


# ------------------------------------------------------------------- any split


@dataclass
class Spec:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool
    pieces: list[int] = field(default_factory=list)
    hop: bool = False
    """Add hop-by-hop lines a verbatim head can lose (``Connection: keep-alive``...)."""

    def wire(self) -> bytes:
        lines = [b"%s %s HTTP/1.1\r\n" % (self.method.encode(), self.target)]
        lines += [b"%s: %s\r\n" % pair for pair in self.headers]
        if self.hop:
            lines.insert(1, b"Connection: Keep-Alive\r\nKeep-Alive: 5\r\n")
            lines.append(b"X-Meshnode-Source: forged\r\n")
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
            rest = self.body
            for size in self.pieces or [len(rest)]:
                part, rest = rest[:size], rest[size:]
                if part:
                    lines.append(chunk(part))
            if rest:
                lines.append(chunk(rest))
            lines.append(b"0\r\n\r\n")
        else:
            if self.body or self.method in ("POST", "PUT"):
                lines.append(b"Content-Length: %d\r\n" % len(self.body))
            lines.append(b"\r\n" + self.body)
        return b"".join(lines)


_token = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
_value = st.binary(max_size=20).map(lambda b: bytes(32 + x % 94 for x in b).strip())
_specs = st.builds(
    Spec,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    target=st.text("abc/?=&%0123", max_size=20).map(lambda t: b"/" + t.encode()),
    headers=st.lists(st.tuples(_token.filter(lambda t: t not in _RESERVED), _value), max_size=5),
    body=st.binary(max_size=300),
    chunked=st.booleans(),
    pieces=st.lists(st.integers(1, 100), max_size=4),
    hop=st.booleans(),
)
_RESERVED = {
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"upgrade",
    b"x-meshnode-source",
}


def _summary(messages: list[Message]) -> list[tuple[object, ...]]:
    out = []
    for message in messages:
        head = message.head
        assert isinstance(head, RequestHead)
        out.append((head.method, head.target, request_bytes(head, head.target), message.body))
    return out


@settings(max_examples=200, deadline=None)
@given(specs=st.lists(_specs, min_size=1, max_size=4), cuts=st.lists(st.integers(0, 2000)))
def test_any_split_of_a_request_stream_parses_to_the_same_messages(
    specs: list[Spec], cuts: list[int]
) -> None:
    stream = b"".join(spec.wire() for spec in specs)
    whole = parse_requests(stream)
    assert len(whole) == len(specs) and all(m.complete for m in whole)
    for spec, message in zip(specs, whole, strict=True):
        assert message.body == spec.body
        assert isinstance(message.head, RequestHead) and message.head.method == spec.method
        assert message.head.target == spec.target
        names = [n.decode() for n in dict.fromkeys(n.lower() for n, _ in spec.headers)]
        headers = message.head.request().headers
        assert isinstance(headers, Mapping) and list(headers)[: len(names)] == names
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert _summary(parse_requests(*pieces)) == _summary(whole)
    # And re-serialized (what goes upstream), it parses to the same again.
    again = b"".join(
        request_bytes(m.head, m.head.target)  # type: ignore[arg-type]
        + ((chunk(m.body) + b"0\r\n\r\n") if m.head.framing == CHUNKED and m.body else b"")
        + (b"0\r\n\r\n" if m.head.framing == CHUNKED and not m.body else b"")
        + (m.body if m.head.framing != CHUNKED else b"")
        for m in whole
    )
    assert _summary(parse_requests(again)) == _summary(whole)


@settings(max_examples=100, deadline=None)
@given(
    bodies=st.lists(st.tuples(st.binary(max_size=200), st.booleans()), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 2000)),
)
def test_any_split_of_a_response_stream_parses_to_the_same_messages(
    bodies: list[tuple[bytes, bool]], cuts: list[int]
) -> None:
    stream = b"".join(
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (chunk(body) if body else b"")
            + b"0\r\n\r\n"
        )
        if chunked
        else b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        for body, chunked in bodies
    )
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    reader = parse_responses(*pieces)
    assert [m.body for m in reader.messages] == [body for body, _ in bodies]
    assert all(m.complete for m in reader.messages)


# ------------------------------------------------------------------- upgrades


class Upgrading(Requests):
    __slots__ = ("rest",)

    def __init__(self) -> None:
        super().__init__()
        self.rest: bytes | None = None

    def upgraded(self, rest: bytes) -> None:
        self.rest = rest


@pytest.mark.parametrize("split", [0, 30, 96, 98])
def test_an_upgrade_request_keeps_its_upgrade_and_hands_over_what_follows(split: int) -> None:
    wire = (
        b"GET /chat HTTP/1.1\r\nHost: api\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: k\r\n\r\n"
    )
    reader = Upgrading()
    for piece in (wire + b"frame")[:split], (wire + b"frame")[split:]:
        if piece and reader.rest is None:
            reader.feed(piece)
    [message] = reader.messages
    head = message.head
    assert isinstance(head, RequestHead) and message.complete
    assert head.upgrade == b"websocket" and head.names == [b"host", b"sec-websocket-key"]
    # A split inside "frame" hands over its first part; the rest would go to the tunnel.
    assert len(wire) == 96
    assert reader.rest == (b"frame" if split < len(wire) else b"frame"[: split - len(wire)])
    assert request_bytes(head, head.target) == (
        b"GET /chat HTTP/1.1\r\nHost: api\r\nSec-WebSocket-Key: k\r\n"
        b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )


def test_an_upgrade_header_without_connection_upgrade_is_dropped() -> None:
    [message] = parse_requests(b"GET / HTTP/1.1\r\nHost: api\r\nUpgrade: h2c\r\n\r\n")
    assert isinstance(message.head, RequestHead) and message.head.upgrade is None
    assert b"upgrade" not in request_bytes(message.head, b"/").lower()


def test_connect_and_upgrades_on_a_reader_that_does_not_tunnel_are_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="CONNECT"):
        parse_requests(b"CONNECT api:443 HTTP/1.1\r\nHost: api\r\n\r\n")
    with pytest.raises(RemoteProtocolError, match="upgrade"):
        parse_requests(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\n")


def test_a_101_response_is_rebuilt_with_its_upgrade() -> None:
    class Switching(Responses):
        __slots__ = ("rest",)

        def upgraded(self, rest: bytes) -> None:
            self.rest = rest

    reader = Switching()
    reader.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: a\r\n\r\n\x81\x02hi"
    )
    head = reader.messages[0].head
    assert isinstance(head, ResponseHead) and head.status == 101 and head.framing == NO_BODY
    assert reader.rest == b"\x81\x02hi"
    assert response_bytes(head, chunked=False, close=False, http10_client=False) == (
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: a\r\n"
        b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )
