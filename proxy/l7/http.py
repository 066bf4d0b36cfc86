"""HTTP/1.1 message framing for the L7 data path, around httptools (llhttp). Pure:
bytes in, heads and body pieces out through callbacks; no I/O, no clock.

Theory of operation
-------------------
A proxy must re-frame every message it forwards: hop-by-hop headers (RFC 9110 §7.6.1:
``Connection`` and the headers it names, ``Keep-Alive``, ``Proxy-Connection``, ``TE``,
``Trailer``, ``Transfer-Encoding``, ``Upgrade``) belong to one connection and are not
passed on, and each side of the proxy has its own keep-alive. So a message is parsed
into a *head* (:class:`RequestHead` / :class:`ResponseHead`: start line, the headers to
forward, already serialized, and the facts that decide framing) and body pieces, and
written out again with :func:`request_bytes` / :func:`response_bytes`:

* The forwarded headers are kept as the list of byte strings of their serialized form
  (``name``, ``b": "``, ``value``, ``b"\\r\\n"``), so writing a head is one
  ``bytes.join`` — no per-header formatting on the way out.
* Framing (:data:`NO_BODY`, :data:`LENGTH`, :data:`CHUNKED`, :data:`UNTIL_CLOSE`): a
  ``Content-Length`` body is forwarded as it comes, with its header; a chunked body is
  de-chunked by llhttp and re-chunked on the way out (:func:`chunk`), one chunk per
  piece read, so nothing is buffered; a response delimited by the connection's close
  (HTTP/1.0 style) goes out chunked to an HTTP/1.1 client, or close-delimited to an
  HTTP/1.0 one. Requests are never close-delimited (RFC 9112 §6.3). Trailers are
  dropped (a re-chunked body ends with ``0\\r\\n\\r\\n``).
* Keep-alive follows llhttp's ``should_keep_alive`` (HTTP/1.1 unless
  ``Connection: close``; HTTP/1.0 only with ``Connection: keep-alive``).
* ``HEAD`` responses: llhttp cannot be told that a response has no body (httptools does
  not expose it), so :class:`ResponseReader` ends such a message itself at its head and
  starts a fresh parser for the next one.
* ``x-meshnode-source`` from a peer is dropped: only the inbound proxy sets it, from the
  verified SPIFFE ID.
* Protocol upgrades (``Upgrade`` with ``Connection: upgrade``: WebSocket, h2c): the
  head keeps the ``Upgrade`` value (``Head.upgrade``) and is written out with
  ``connection: upgrade`` and it again; llhttp stops after such a request and after a
  101 response, and the reader hands what followed in the read to ``upgraded(rest)``,
  where the transport splices the two connections. ``CONNECT`` is refused.

The readers are httptools "protocol" objects: llhttp calls their ``on_*`` methods. A
subclass (the connection in ``transport.py``) provides ``head_received(head)``,
``message_complete()`` and ``on_body(data)`` — the last called by llhttp directly, so
a body piece costs one Python call.

Verbatim heads: most heads have nothing to drop. When a read starts a message and
holds its whole head, and a scan of the head finds no header the proxy drops (or only
lines that can simply be cut out: ``Connection: close``/``keep-alive``, ``Keep-Alive``,
``Proxy-Connection``, ``TE``, ``Trailer``, ``x-meshnode-source``; see
``_cut_dropped``), the head is kept as received (``Head.raw``) and forwarded as it is
(or with a header inserted before its end): no per-header Python work at all — llhttp
still parses and validates everything, and the body's framing is still its. Headers are
then decoded only if a route or an intention looks at them. Parse errors become
``proxy.errors.RemoteProtocolError``.

Proxy-generated responses (:func:`error_response`) carry ``x-meshnode-error: <kind>:
<detail>`` (the kinds of the #5 conventions), ``content-length`` and a one-line text
body, and ``connection: close`` when the connection will be closed after them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import parse_qsl

import httptools

from proxy.errors import RemoteProtocolError
from proxy.match import HttpRequest

NO_BODY: Final = 0
LENGTH: Final = 1
"""A ``Content-Length`` body, forwarded with its header."""
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3
"""Responses only: the body ends when the server closes the connection."""

#: Largest request or response head accepted. llhttp has no limit of its own; 64 KiB is
#: Envoy's ``max_request_headers_kb`` default ceiling... and ample for real clients.
MAX_HEAD_BYTES: Final = 64 * 1024
#: Hop-by-hop headers (RFC 9110 §7.6.1) and the headers the proxy sets itself.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
SOURCE_HEADER: Final = b"x-meshnode-source"
ERROR_HEADER: Final = "x-meshnode-error"
#: Methods a request may be retried for without a policy saying so (RFC 9110 §9.2.2).
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_DROPPED: Final = HOP_BY_HOP | {SOURCE_HEADER}
#: A head with none of these is forwarded verbatim (module docstring). Case-blind
#: patterns: no lowered copy of the head per message.
_SPECIAL_HEADER: Final = re.compile(
    rb"\n(?:" + b"|".join(sorted(_DROPPED)).replace(b"-", rb"\-") + rb")[ \t]*:", re.IGNORECASE
)
_CONTENT_LENGTH: Final = re.compile(rb"\ncontent-length[ \t]*:", re.IGNORECASE)
#: Lines of dropped headers that can be cut out of a head kept as received (not
#: ``Transfer-Encoding`` or ``Upgrade``: they change the framing or are refused).
_CUTTABLE_LINE: Final = re.compile(
    rb"\n(connection|keep-alive|proxy-connection|te|trailer|x-meshnode-source)"
    rb"[ \t]*:([^\r\n]*)\r(?=\n)",
    re.IGNORECASE,
)
_CONNECTION_ONLY: Final = frozenset({b"", b"close", b"keep-alive"})
#: Verbatim heads are looked for in the first this many bytes of a read.
MAX_VERBATIM_HEAD: Final = 8 * 1024
_METHODS: Final = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
}
_LAST_CHUNK: Final = b"0\r\n\r\n"
_CRLF: Final = b"\r\n"
_SEPARATOR: Final = b": "


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: an empty chunk would end the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = _LAST_CHUNK


_UNFILLED: Final[list[bytes]] = []
"""Never appended to (see ``Head.__init__``)."""


class Head:
    """What both heads share. Either ``raw`` is the head as received (verbatim: it
    has no header the proxy must drop), or ``fields`` is the forwarded headers
    serialized (see the module docstring), ``names`` their lowercased names and
    ``values`` their values."""

    __slots__ = (
        "fields",
        "framing",
        "keep_alive",
        "line_end",
        "names",
        "raw",
        "upgrade",
        "values",
        "version",
    )

    def __init__(self) -> None:
        # Verbatim heads never fill these: they share one empty list until
        # _unpack() or the per-header path gives them their own.
        self.fields = self.names = self.values = _UNFILLED
        self.raw: bytes | None = None
        self.line_end = 0
        self.version = b"1.1"
        self.keep_alive = True
        self.framing = NO_BODY
        self.upgrade: bytes | None = None
        """The ``Upgrade`` header's value (a hop-by-hop header: not in ``fields``)."""

    def header(self, name: bytes) -> bytes | None:
        """The first value of a forwarded header (``name`` lowercase)."""
        if self.raw is not None:
            self._unpack()
        try:
            return self.values[self.names.index(name)]
        except ValueError:
            return None

    def _unpack(self) -> None:
        """Fill ``names``/``values`` from a verbatim head (when asked: most requests
        are routed and authorized without looking at a header)."""
        raw = self.raw
        if raw is None or self.names is not _UNFILLED:
            return
        self.names, self.values = _split_head(raw, self.line_end)


def _split_head(raw: bytes, line_end: int) -> tuple[list[bytes], list[bytes]]:
    """The (lowercased) names and the values of a verbatim head's header lines."""
    names: list[bytes] = []
    values: list[bytes] = []
    for line in raw[line_end + 2 : -4].split(b"\r\n"):
        name, _, value = line.partition(b":")
        names.append(name.strip().lower())
        values.append(value.strip(b" \t"))
    return names, values


class RequestHead(Head):
    __slots__ = ("_request", "method", "target")

    def __init__(self) -> None:
        # Head.__init__'s fields set here too: one call less per request.
        self.fields = self.names = self.values = _UNFILLED
        self.raw: bytes | None = None
        self.line_end = 0
        self.version = b"1.1"
        self.keep_alive = True
        self.framing = NO_BODY
        self.upgrade: bytes | None = None
        self.method = "GET"
        self.target = b"/"
        self._request: HttpRequest | None = None

    def request(self) -> HttpRequest:
        """What routes and intentions look at (built once, on first use)."""
        request = self._request
        if request is None:
            path, _, query_text = self.target.decode("latin-1").partition("?")
            query: Mapping[str, str] = _NO_QUERY
            if query_text:
                query = {}
                for key, value in parse_qsl(query_text, keep_blank_values=True):
                    query.setdefault(key, value)
            request = self._request = HttpRequest(self.method, path, _Headers(self), query)
        return request

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS


_NO_QUERY: Final[Mapping[str, str]] = MappingProxyType({})


class _Headers(Mapping[str, str]):
    """A request's headers for ``HttpRequest`` (lowercased names, first value wins),
    decoded on first use. It keeps what it decodes from, not the head: the head keeps
    the request, and a reference back would make a garbage cycle per request."""

    __slots__ = ("_decoded", "_line_end", "_names", "_raw", "_values")

    def __init__(self, head: Head) -> None:
        self._raw = head.raw if head.names is _UNFILLED else None
        self._line_end = head.line_end
        self._names = head.names
        self._values = head.values
        self._decoded: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        decoded = self._decoded
        if decoded is None:
            names, values = self._names, self._values
            if self._raw is not None:
                names, values = _split_head(self._raw, self._line_end)
            decoded = self._decoded = {}
            for name, value in zip(names, values, strict=True):
                decoded.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        return decoded

    def __getitem__(self, name: str) -> str:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


class ResponseHead(Head):
    __slots__ = ("informational", "reason", "status")

    def __init__(self) -> None:
        self.fields = self.names = self.values = _UNFILLED
        self.raw: bytes | None = None
        self.line_end = 0
        self.version = b"1.1"
        self.keep_alive = True
        self.framing = NO_BODY
        self.upgrade: bytes | None = None
        self.status = 200
        self.reason = b""
        self.informational = False
        """1xx (but not 101): forwarded, and the final response follows."""


# ------------------------------------------------------------------------- readers


class _Reader(ABC):
    """What both readers share: the verbatim-head check and header collection
    (httptools callbacks)."""

    __slots__ = (
        "_connection_tokens",
        "_head",
        "_head_bytes",
        "_in_head",
        "_open",
        "_parser",
        "_verbatim",
    )

    _head: Head
    _parser: httptools.HttpRequestParser | httptools.HttpResponseParser

    def __init__(self) -> None:
        self._in_head = False
        self._open = False
        self._verbatim: bytes | None = None

    def feed(self, data: bytes | memoryview) -> None:
        """Parse ``data``; raises ``RemoteProtocolError`` (the connection is then
        unusable).

        Before llhttp sees a read: when it starts a message and holds its whole
        head, that head is kept (see ``_begin``). One method for both readers: a
        Python frame less per read."""
        if not self._open:
            probe = data if type(data) is bytes else bytes(data[:MAX_VERBATIM_HEAD])
            end = probe.find(b"\r\n\r\n", 0, MAX_VERBATIM_HEAD)
            self._verbatim = probe[: end + 4] if end >= 0 else None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # llhttp stops after the message that switches protocols; what follows
            # it in this read belongs to the new protocol.
            self.upgraded(bytes(data[upgrade.args[0] :]))
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _EndedAtHead):
                self._restart()
                return
            raise _translate(exc) from None

    def _restart(self) -> None:
        """A fresh parser of the same kind, after a message llhttp was stopped in
        (``_EndedAtHead``: a response to HEAD, whose announced body never comes)."""
        self._parser = type(self._parser)(self)
        self._open = False

    def upgraded(self, rest: bytes) -> None:
        """A message switched protocols (an ``Upgrade`` request, a 101 response):
        nothing more is parsed; ``rest`` is what followed it in the read. Readers that
        do not tunnel refuse it."""
        raise RemoteProtocolError("upgrade", "protocol upgrades are not proxied here")

    @abstractmethod
    def head_received(self, head: Any) -> None:
        """A message's head is complete (a ``RequestHead`` or ``ResponseHead``)."""

    @abstractmethod
    def message_complete(self) -> None:
        """The message (head and body) is complete."""

    def release(self) -> None:
        """The connection is over: drop the parser. It refers back to this reader (its
        callbacks), so without this every closed connection is a reference cycle
        that only the cycle collector frees (measured: ~3 µs per connection in
        collections, more with a big heap). Nothing is parsed after this."""
        self._parser = _RELEASED

    def _begin(self, head: Head) -> None:
        self._head = head
        self._open = True
        raw = self._verbatim
        if raw is not None:
            self._verbatim = None  # only the first message of a read starts at 0
            if _SPECIAL_HEADER.search(raw) is not None:
                raw = _cut_dropped(raw)
            if raw is not None:
                # Nothing (left) to drop: forward as received, skip the per-header work.
                head.raw = raw
                head.line_end = raw.find(b"\r\n")
                if _CONTENT_LENGTH.search(raw) is not None:
                    head.framing = LENGTH
                self._in_head = False
                return
        self._in_head = True
        self._head_bytes = 0
        self._connection_tokens: list[bytes] | None = None
        head.fields, head.names, head.values = [], [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a verbatim head, or a trailer (dropped: module docstring)
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise RemoteProtocolError("head_too_large")
        lower = name.lower()
        head = self._head
        if lower in _DROPPED:
            if lower == b"transfer-encoding":
                head.framing = CHUNKED  # llhttp refuses a last coding other than chunked
            elif lower == b"upgrade":
                head.upgrade = value
            elif lower == b"connection":
                tokens = self._connection_tokens
                if tokens is None:
                    tokens = self._connection_tokens = []
                tokens.extend(t.strip().lower() for t in value.split(b","))
            return
        if lower == b"content-length" and head.framing != CHUNKED:
            head.framing = LENGTH
        head.fields += (name, _SEPARATOR, value, _CRLF)
        head.names.append(lower)
        head.values.append(value)

    def _end_head(self) -> None:
        head = self._head
        parser = self._parser
        head.keep_alive = parser.should_keep_alive()
        if head.raw is not None:
            return
        self._in_head = False
        head.version = b"1.0" if parser.get_http_version() == "1.0" else b"1.1"
        tokens = self._connection_tokens
        if tokens:
            _drop_named(head, tokens)


def _cut_dropped(raw: bytes) -> bytes | None:
    """``raw`` without the lines of its hop-by-hop headers and ``x-meshnode-source``,
    when that is all it has to drop (a ``Connection`` naming only ``close`` or
    ``keep-alive``: no other header to drop): ``Connection: close`` and the like
    keep a head verbatim. None when the head needs the per-header path."""
    if b"\n " in raw or b"\n\t" in raw:
        return None  # folded lines: leave them to the per-header path
    pieces = []
    last = 0
    for line in _CUTTABLE_LINE.finditer(raw):
        if line.group(1).lower() == b"connection":
            tokens = {token.strip().lower() for token in line.group(2).split(b",")}
            if not tokens <= _CONNECTION_ONLY:
                return None
        pieces.append(raw[last : line.start() + 1])
        last = line.end() + 1  # past its \r\n (the \n starts the next match)
    pieces.append(raw[last:])
    cut = b"".join(pieces)
    return cut if _SPECIAL_HEADER.search(cut) is None else None


def _drop_named(head: Head, tokens: list[bytes]) -> None:
    """Remove the headers a ``Connection`` header names (hop-by-hop, RFC 9110 §7.6.1)."""
    named = {token for token in tokens if token and token not in (b"close", b"keep-alive")}
    if not named:
        return
    kept = [i for i, name in enumerate(head.names) if name not in named]
    head.fields = [part for i in kept for part in head.fields[4 * i : 4 * i + 4]]
    head.names = [head.names[i] for i in kept]
    head.values = [head.values[i] for i in kept]
    if b"content-length" not in head.names and head.framing == LENGTH:
        head.framing = NO_BODY  # a client that hides its length is not forwarded one


def _translate(exc: httptools.HttpParserError) -> RemoteProtocolError:
    cause = exc.__context__
    if isinstance(cause, RemoteProtocolError):
        return cause
    if isinstance(cause, ValueError):
        return RemoteProtocolError("malformed", str(cause))
    return RemoteProtocolError("malformed", str(exc))


class RequestReader(_Reader):
    """Parses requests from a downstream connection. Subclasses provide
    ``head_received(head)``, ``on_body(data)`` and ``message_complete()``."""

    __slots__ = ("_target",)

    def __init__(self) -> None:
        super().__init__()
        self._parser = httptools.HttpRequestParser(self)
        self._target = b""

    def on_message_begin(self) -> None:
        self._begin(RequestHead())
        self._target = b""

    def on_url(self, url: bytes) -> None:
        self._target += url  # almost always one piece: b"" + url is url

    def on_headers_complete(self) -> None:
        parser: httptools.HttpRequestParser = self._parser  # type: ignore[assignment]
        self._end_head()
        head: RequestHead = self._head  # type: ignore[assignment]
        if parser.should_upgrade():
            # Upgrade + Connection: upgrade (WebSocket, h2c...) is forwarded, and a 101
            # turns both connections into a tunnel (the transport). CONNECT is not.
            if head.upgrade is None or parser.get_method() == b"CONNECT":
                raise RemoteProtocolError("upgrade", "CONNECT is not proxied")
        else:
            head.upgrade = None  # an Upgrade header without Connection: upgrade
        head.target = self._target
        method = parser.get_method()
        head.method = _METHODS.get(method) or method.decode("ascii")
        raw = head.raw
        if raw is not None and raw[head.line_end - 3 : head.line_end] == b"1.0":
            head.version = b"1.0"
        self.head_received(head)

    def on_message_complete(self) -> None:
        self._open = False
        self.message_complete()


class ResponseReader(_Reader):
    """Parses responses from an upstream connection. Set ``no_body`` before a response
    to a ``HEAD`` request. Subclasses provide ``head_received(head)``,
    ``on_body(data)`` and ``message_complete()``."""

    __slots__ = ("no_body",)

    def __init__(self) -> None:
        super().__init__()
        self._parser = httptools.HttpResponseParser(self)
        self.no_body = False

    def on_message_begin(self) -> None:
        self._begin(ResponseHead())

    def on_status(self, reason: bytes) -> None:
        head: ResponseHead = self._head  # type: ignore[assignment]
        if head.raw is None:
            head.reason += reason

    def on_headers_complete(self) -> None:
        parser: httptools.HttpResponseParser = self._parser  # type: ignore[assignment]
        self._end_head()
        head: ResponseHead = self._head  # type: ignore[assignment]
        status = head.status = parser.get_status_code()
        head.informational = status < 200 and status != 101
        raw = head.raw
        if raw is not None and raw[5:8] == b"1.0":
            head.version = b"1.0"
        if head.framing == NO_BODY and status >= 200 and status not in (204, 304):
            head.framing = UNTIL_CLOSE
        if self.no_body and status >= 200:
            head.framing = NO_BODY
            self.head_received(head)
            self.message_complete()
            # Stop llhttp, which would wait for the announced body; feed() swaps in
            # a fresh parser (nothing follows a response before the next request).
            raise _EndedAtHead
        if status < 200 or status in (204, 304):
            head.framing = NO_BODY
        self.head_received(head)

    def on_message_complete(self) -> None:
        self._open = False
        self.message_complete()


class _NoCallbacks:
    __slots__ = ()


#: What a released reader parses with (see ``_Reader.release``): calls nothing back.
_RELEASED: Final = httptools.HttpRequestParser(_NoCallbacks())


class _EndedAtHead(Exception):
    """Raised through llhttp to stop it after the head of a body-less response."""


# ------------------------------------------------------------------------- writing


def request_bytes(head: RequestHead, target: bytes, extra: bytes = b"") -> bytes:
    """The head to send upstream: HTTP/1.1, keep-alive, ``extra`` (serialized header
    lines) added, chunked re-announced when the body is chunked. A verbatim head
    with the same target goes as received."""
    raw = head.raw
    if raw is not None:
        if target is head.target and head.version == b"1.1":
            return b"".join((raw[:-2], extra, _CRLF)) if extra else raw
        line = b"%b %b HTTP/1.1" % (head.method.encode("ascii"), target)
        return b"".join((line, raw[head.line_end : -2], extra, _CRLF))
    framing = b"transfer-encoding: chunked\r\n" if head.framing == CHUNKED else b""
    if head.upgrade is not None:
        framing += b"connection: upgrade\r\nupgrade: %b\r\n" % head.upgrade
    return b"".join(
        (
            head.method.encode("ascii"),
            b" ",
            target,
            b" HTTP/1.1\r\n",
            *head.fields,
            extra,
            framing,
            _CRLF,
        )
    )


def response_bytes(head: ResponseHead, *, chunked: bool, close: bool, http10_client: bool) -> bytes:
    """The head to send downstream. ``chunked``: the body is re-chunked; ``close``:
    the connection closes after this response."""
    if head.upgrade is not None and head.status == 101:
        connection = b"connection: upgrade\r\nupgrade: %b\r\n" % head.upgrade
    elif close:
        connection = b"connection: close\r\n"
    elif http10_client:
        connection = b"connection: keep-alive\r\n"
    else:
        connection = b""
    raw = head.raw
    if raw is not None:
        if head.version != b"1.1":
            raw = b"HTTP/1.1" + raw[8:]
        if not chunked and not connection:
            return raw
        framing = b"transfer-encoding: chunked\r\n" if chunked else b""
        return b"".join((raw[:-2], framing, connection, _CRLF))
    reason = head.reason or _reason(head.status)
    return b"".join(
        (
            b"HTTP/1.1 %d %b\r\n" % (head.status, reason),
            *head.fields,
            b"transfer-encoding: chunked\r\n" if chunked else b"",
            connection,
            _CRLF,
        )
    )


def informational_bytes(head: ResponseHead) -> bytes:
    """A 1xx response to forward as it is."""
    if head.raw is not None:
        return head.raw
    line = b"HTTP/1.1 %d %b\r\n" % (head.status, head.reason)
    return b"".join((line, *head.fields, _CRLF))


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def rewrite_target(target: bytes, matched: str, replacement: str) -> bytes:
    """``target`` with the route's matched path prefix replaced (Envoy
    ``prefix_rewrite``); unchanged when it does not start with ``matched``."""
    prefix = matched.encode("latin-1")
    if not matched or not target.startswith(prefix):
        return target
    return replacement.encode("latin-1") + target[len(prefix) :]


def error_response(
    status: int, error: str, *, close: bool = False, retry_after: int | None = None
) -> bytes:
    """A proxy-generated response: ``x-meshnode-error: <error>`` and a text body."""
    text = "".join(c if " " <= c <= "~" else "?" for c in error)  # one header line
    body = (text + "\n").encode("ascii")
    lines = [
        b"HTTP/1.1 %d %b\r\n" % (status, _reason(status)),
        b"content-type: text/plain\r\n",
        b"content-length: %d\r\n" % len(body),
        b"x-meshnode-error: %b\r\n" % text.encode("ascii"),
    ]
    if retry_after is not None:
        lines.append(b"retry-after: %d\r\n" % max(1, retry_after))
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(_CRLF)
    lines.append(body)
    return b"".join(lines)
