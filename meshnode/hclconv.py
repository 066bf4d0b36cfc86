"""Consul's HCL files as the JSON documents Consul's HTTP API takes (pure: no I/O).

Theory of operation
-------------------
``consul config write`` and ``consul intention create -file`` read HCL with HashiCorp's
HCL 1 decoder and send JSON. We parse with python-hcl2, an HCL 2 grammar, in three
steps:

1. ``_blocks_in_objects_as_attributes``: HCL 1 lets an object literal hold nested blocks,
   and Consul's own examples rely on it (the service-router docs write
   ``Routes = [{ Match { HTTP { PathPrefix = "/admin" } } }]``); HCL 2 does not. A small
   scanner finds each ``KEY {`` inside an object literal and inserts ``=``. Blocks
   outside object literals are valid HCL 2 and pass unchanged. A key given twice in one
   object (HCL 1's repeated block) is refused here: python-hcl2 would keep the last.
2. python-hcl2 parses, keeping strings in their source form and marking blocks, so a
   string can be told from an expression, and a block from a list.
3. ``_plain`` rebuilds the JSON shape. Strings are unescaped; expressions and templates
   (``Weight = 40 + 40``, ``Name = web``, ``"${x}"``) are refused, since a config entry
   is data and HCL 1 has no expressions. A block written once becomes an object, as
   Consul's decoder turns a one-element list into a struct (``HookWeakDecodeFromSlice``),
   except for fields Consul declares as lists (``LIST_FIELDS``: ``Splits { ... }``
   written once is still a list of one); repeated blocks are a list; labelled blocks
   (``Subsets "v1" { ... }``) are a map by label. Field names are matched as the agent
   matches them (case, ``_`` and ``-`` ignored) and passed on as written.

python-hcl2 is imported inside ``loads`` so that a CLI which never reads HCL does not
pay for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from meshnode.errors import MeshError

#: Fields Consul's config entries and intentions declare as lists of objects, in the
#: agent's key normalisation (lower case, no ``_`` or ``-``). A block written once under
#: one of these names stays a list, and so does an object given where a list belongs.
#: From Consul's ``api`` package (config_entry_*.go) and the config-entry reference.
LIST_FIELDS: Final = frozenset(
    {
        "splits",  # service-splitter
        "routes",  # service-router
        "header",  # service-router Match.HTTP, intention Permissions[].HTTP
        "queryparam",  # service-router Match.HTTP
        "sources",  # service-intentions
        "permissions",  # service-intentions Sources[], intention bodies
        "hashpolicies",  # service-resolver LoadBalancer
        "targets",  # service-resolver Failover
        "overrides",  # service-defaults UpstreamConfig
        "paths",  # Expose
        "envoyextensions",
        "listeners",  # gateways
        "services",  # gateways, exported-services, routes
        "consumers",  # exported-services
        "rules",  # http-route
        "matches",  # http-route
        "headers",  # http-route
        "query",  # http-route
        "parents",  # http-route, tcp-route
        "certificates",  # api-gateway
        "providers",  # intention JWT
        "verifyclaims",  # intention JWT
        "locations",  # jwt-provider
    }
)

#: Maps whose keys are names the user chose (a subset called "routes" is not the Routes
#: field); the values under them are objects with Consul's fields again.
NAMED_MAPS: Final = frozenset({"subsets", "failover"})

#: Maps Consul passes through uninterpreted (``Meta``, proxy ``Config``, extension
#: ``Arguments``, header ``Add``/``Set``): nothing under them is a Consul field.
OPAQUE_MAPS: Final = frozenset({"meta", "config", "arguments", "add", "set"})

#: python-hcl2's marker on the body of a block (SerializationOptions.explicit_blocks).
_BLOCK_MARKER: Final = "__is_block__"

_SIMPLE_ESCAPES: Final = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
_UNICODE_ESCAPE_DIGITS: Final = {"u": 4, "U": 8}
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_NUMBER: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_HEREDOC_START: Final = re.compile(r"<<-?([A-Za-z_][A-Za-z0-9_-]*)[ \t]*\r?\n")

Schema = Literal["fields", "names", "opaque"]


class HclError(MeshError):
    """A JSON or HCL document that is not a config entry we can send; ``str()`` is one
    line naming the file and, when known, the line and the field."""


def normalize_key(key: str) -> str:
    """The agent's key matching (meshnode.model): ``service_subset`` is ServiceSubset."""
    return key.replace("_", "").replace("-", "").lower()


def parse_document(text: str, filename: str) -> dict[str, Any]:
    """A file's JSON object, from JSON or HCL, as ``consul config write`` reads it.

    ``.hcl`` files are HCL and ``.json`` files JSON; anything else (stdin is ``-``) is
    JSON if it parses as JSON, else HCL. When both fail, the error reported is that of
    the syntax the text looks like (JSON if it starts with ``{``)."""
    lowered = filename.lower()
    if lowered.endswith(".hcl"):
        return _hcl_document(text, filename)
    if lowered.endswith(".json") or text.lstrip().startswith("{"):
        return _json_document(text, filename)
    try:
        return _json_document(text, filename)
    except HclError:
        return _hcl_document(text, filename)


def _json_document(text: str, filename: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise HclError(f"{filename}: invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise HclError(f"{filename}: expected a JSON object, got {type(document).__name__}")
    return document


def _hcl_document(text: str, filename: str) -> dict[str, Any]:
    try:
        return loads(text)
    except HclError as exc:
        raise HclError(f"{filename}: {exc}") from None


def loads(text: str) -> dict[str, Any]:
    """HCL text (Consul's config-entry dialect) as the JSON object Consul would send."""
    try:
        import hcl2
        from lark.exceptions import LarkError, UnexpectedEOF, UnexpectedInput
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise HclError("reading HCL needs python-hcl2 (pip install python-hcl2)") from None

    rewritten = _blocks_in_objects_as_attributes(text)
    options = hcl2.SerializationOptions(
        with_comments=False,
        preserve_heredocs=False,
        preserve_scientific_notation=False,
    )
    try:
        parsed = hcl2.loads(rewritten.text, serialization_options=options)
    except UnexpectedEOF:
        raise HclError("invalid HCL: unexpected end of file") from None
    except UnexpectedInput as exc:
        found = str(getattr(exc, "token", None) or getattr(exc, "char", None) or "")
        # python-hcl2's tokens carry the blanks before them; point past those.
        blanks = len(found) - len(found.lstrip(" \t"))
        line, column = rewritten.original_position(exc.line, exc.column + blanks)
        shown = found.strip().split("\n")[0][:40]
        unexpected = (
            f": unexpected {shown!r}" if shown else ": unexpected end of line" if found else ""
        )
        raise HclError(f"invalid HCL at line {line}, column {column}{unexpected}") from None
    except (LarkError, RuntimeError, ValueError) as exc:
        # python-hcl2 raises RuntimeError for "Attribute X is already defined."
        raise HclError(f"invalid HCL: {' '.join(str(exc).split())}") from None
    plain = _plain(parsed, "", "fields")
    assert isinstance(plain, dict)  # a body is an object
    return plain


# --------------------------------------------------------------------------- step 1


@dataclass
class _Frame:
    """One open bracket while scanning: a body (the file's or a block's), an object
    literal, a tuple or parentheses. In a body or an object: whether the next token
    starts an item, the key just read, and the attribute names seen."""

    kind: Literal["body", "object", "tuple", "paren"]
    at_key: bool = True
    key: str | None = None
    keys: set[str] = field(default_factory=set)

    def add(self, key: str, text: str, offset: int) -> None:
        """Refuse a name given twice: python-hcl2 would silently keep the last one."""
        if key in self.keys:
            line = text.count("\n", 0, offset) + 1
            hint = (
                f" in one object (for a list, write {key} = [{{...}}, {{...}}])"
                if self.kind == "object"
                else ""
            )
            raise HclError(f"line {line}: {key} is given twice{hint}")
        self.keys.add(key)


@dataclass(frozen=True)
class _Rewritten:
    text: str
    original: str
    inserted_at: tuple[int, ...]
    """Offsets in ``original`` before which ``=`` was inserted."""

    def original_position(self, line: int, column: int) -> tuple[int, int]:
        """A 1-based (line, column) in ``text`` as one in ``original`` (no insertion adds
        a line; the column moves back past the insertions before it)."""
        lines = self.text.split("\n")
        offset = sum(len(each) + 1 for each in lines[: line - 1]) + column - 1
        before = 0
        for inserted in self.inserted_at:
            if inserted + before < offset:
                before += 1
        original_offset = offset - before
        start = self.original.rfind("\n", 0, original_offset) + 1
        return self.original.count("\n", 0, original_offset) + 1, original_offset - start + 1


def _blocks_in_objects_as_attributes(text: str) -> _Rewritten:
    inserted: list[int] = []
    frames: list[_Frame] = [_Frame("body")]
    previous = ""  # the previous token, or its kind for an identifier or a string
    for kind, start, end in _tokens(text):
        frame = frames[-1]
        token = text[start:end]
        if kind == "newline" or (token == "," and frame.kind == "object"):
            frame.at_key, frame.key = True, None  # the next item starts
            previous = kind if kind == "newline" else token
            continue
        if frame.at_key and frame.kind in ("body", "object"):
            frame.at_key = False
            if kind in ("identifier", "string", "number"):
                frame.key = _key_text(token)
                if frame.kind == "object":
                    frame.add(frame.key, text, start)
                previous = kind
                continue
        key, frame.key = frame.key, None
        if token == "=" and frame.kind == "body" and key is not None:
            frame.add(key, text, start)  # an attribute; a block's name may repeat
        if token == "{":
            if frame.kind == "object" and key is not None:
                inserted.append(start)  # HCL 1's `KEY {` inside an object: `KEY = {`
                frames.append(_Frame("object"))
            elif frame.kind == "body" and previous in ("identifier", "string"):
                frames.append(_Frame("body"))  # a block
            else:
                frames.append(_Frame("object"))
        elif token in ("[", "("):
            frames.append(_Frame("tuple" if token == "[" else "paren", at_key=False))
        elif token in ("}", "]", ")") and len(frames) > 1:
            frames.pop()
        previous = kind if kind in ("identifier", "string") else token
    pieces: list[str] = []
    last = 0
    for offset in inserted:
        pieces += [text[last:offset], "="]
        last = offset
    pieces.append(text[last:])
    return _Rewritten("".join(pieces), text, tuple(inserted))


def _key_text(token: str) -> str:
    if token.startswith('"'):
        try:
            return _unescape(token[1:-1], "")
        except HclError:
            return token
    return token


def _tokens(text: str) -> Iterator[tuple[str, int, int]]:
    """(kind, start, end) of each token the scanner needs: identifier, string, number,
    newline (a comment to the end of a line counts as one), heredoc or punctuation."""
    index, size = 0, len(text)
    while index < size:
        char = text[index]
        if char in " \t\r":
            index += 1
        elif char == "\n":
            yield "newline", index, index + 1
            index += 1
        elif char == "#" or text.startswith("//", index):
            end = text.find("\n", index)
            index = size if end < 0 else end
        elif text.startswith("/*", index):
            end = text.find("*/", index + 2)
            end = size if end < 0 else end + 2
            if "\n" in text[index:end]:
                yield "newline", index, end
            index = end
        elif char == '"':
            end = _string_end(text, index)
            yield "string", index, end
            index = end
        elif (heredoc := _HEREDOC_START.match(text, index)) is not None:
            end = _heredoc_end(text, heredoc.end(), heredoc.group(1))
            yield "heredoc", index, end
            index = end
        elif (identifier := _IDENTIFIER.match(text, index)) is not None:
            yield "identifier", index, identifier.end()
            index = identifier.end()
        elif (number := _NUMBER.match(text, index)) is not None:
            yield "number", index, number.end()
            index = number.end()
        else:
            yield "punctuation", index, index + 1
            index += 1


def _string_end(text: str, start: int) -> int:
    """The offset after the quoted string opening at ``start`` (its end if unclosed);
    templates inside it (``${ "a" }``) may hold braces and strings of their own."""
    index, size = start + 1, len(text)
    while index < size:
        char = text[index]
        if char == "\\":
            index += 2
        elif char == '"':
            return index + 1
        elif text.startswith(("$${", "%%{"), index):
            index += 3
        elif text.startswith(("${", "%{"), index):
            index = _template_end(text, index + 2)
        else:
            index += 1
    return size


def _template_end(text: str, start: int) -> int:
    depth, index, size = 1, start, len(text)
    while index < size:
        char = text[index]
        if char == '"':
            index = _string_end(text, index)
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return size


def _heredoc_end(text: str, body_start: int, marker: str) -> int:
    """The offset of the newline ending a heredoc's closing marker line."""
    index = body_start
    while index < len(text):
        end = text.find("\n", index)
        end = len(text) if end < 0 else end
        if text[index:end].strip() == marker:
            return end
        index = end + 1
    return len(text)


# --------------------------------------------------------------------------- step 3


def _plain(value: object, path: str, schema: Schema) -> Any:
    """python-hcl2's serialisation (source-form strings, marked blocks) as plain JSON."""
    if isinstance(value, str):
        return _string_value(value, path)
    if isinstance(value, list):
        return [_plain(item, f"{path}[{index}]", schema) for index, item in enumerate(value)]
    if isinstance(value, dict):
        result: dict[str, Any] = {}
        for raw_key, item in value.items():
            if raw_key == _BLOCK_MARKER and item is True:
                continue
            key = _object_key(raw_key, path)
            where = f"{path}.{key}" if path else key
            normal = normalize_key(key)
            if schema == "fields":
                child: Schema = (
                    "opaque"
                    if normal in OPAQUE_MAPS
                    else "names"
                    if normal in NAMED_MAPS
                    else "fields"
                )
            else:
                child = "opaque" if schema == "opaque" else "fields"
            is_list = schema == "fields" and normal in LIST_FIELDS
            blocks = _blocks(item)
            if blocks is not None:
                converted: Any = _from_blocks(blocks, where, child)
                if isinstance(converted, list) and len(converted) == 1 and not is_list:
                    converted = converted[0]  # one unlabelled block: an object
            else:
                converted = _plain(item, where, child)
                if is_list and isinstance(converted, dict):
                    converted = [converted]  # Consul's weak decoding: one object for a list
            result[key] = converted
        return result
    return value  # int, float, bool, None


def _blocks(value: object) -> list[tuple[tuple[str, ...], dict[str, Any]]] | None:
    """``[(labels, body), ...]`` if ``value`` is python-hcl2's list of block bodies."""
    if not isinstance(value, list) or not value:
        return None
    blocks = []
    for item in value:
        labels: list[str] = []
        while isinstance(item, dict) and _BLOCK_MARKER not in item and len(item) == 1:
            ((label, item),) = item.items()
            labels.append(label)
        if not isinstance(item, dict) or _BLOCK_MARKER not in item:
            return None
        blocks.append((tuple(labels), item))
    return blocks


def _is_labelled(blocks: list[tuple[tuple[str, ...], dict[str, Any]]]) -> bool:
    return any(labels for labels, _ in blocks)


def _from_blocks(
    blocks: list[tuple[tuple[str, ...], dict[str, Any]]], path: str, schema: Schema
) -> Any:
    if not _is_labelled(blocks):
        return [_plain(body, f"{path}[{index}]", schema) for index, (_, body) in enumerate(blocks)]
    if not all(labels for labels, _ in blocks):
        raise HclError(f"{path}: blocks with and without labels")
    merged: dict[str, Any] = {}
    for raw_labels, body in blocks:
        labels = [_object_key(label, path) for label in raw_labels]
        where = ".".join([path, *labels])
        target = merged
        for label in labels[:-1]:
            inner = target.setdefault(label, {})
            if not isinstance(inner, dict):
                raise HclError(f"{where}: block given twice")
            target = inner
        if labels[-1] in target:
            raise HclError(f"{where}: block given twice")
        # A labelled block's body is the value under its label: a subset, a failover.
        target[labels[-1]] = _plain(body, where, "fields" if schema != "opaque" else schema)
    return merged


def _object_key(raw: str, path: str) -> str:
    if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
        return _unescape(raw[1:-1], path)
    if raw.startswith("${"):
        raise HclError(f"{path or 'top level'}: computed keys are not supported ({raw[2:-1]})")
    return raw


def _string_value(source: str, path: str) -> str:
    if len(source) >= 2 and source.startswith('"') and source.endswith('"'):
        return _unescape(source[1:-1], path)
    expression = source[2:-1] if source.startswith("${") and source.endswith("}") else source
    if _IDENTIFIER.fullmatch(expression):
        raise HclError(f'{path}: {expression} is not a value; quote a string ("{expression}")')
    raise HclError(f"{path}: expressions are not supported, only literal values (got {expression})")


def _unescape(raw: str, path: str) -> str:
    """A quoted HCL 2 string's value: ``\\n \\r \\t \\" \\\\ \\uNNNN \\UNNNNNNNN``, and
    ``$${``/``%%{`` for a literal ``${``/``%{``. Templates are refused (nothing to
    evaluate them against)."""
    if "\\" not in raw and "{" not in raw:
        return raw
    parts: list[str] = []
    index, size = 0, len(raw)
    while index < size:
        char = raw[index]
        if char == "\\" and index + 1 < size:
            marker = raw[index + 1]
            if marker in _SIMPLE_ESCAPES:
                parts.append(_SIMPLE_ESCAPES[marker])
                index += 2
                continue
            width = _UNICODE_ESCAPE_DIGITS.get(marker, 0)
            digits = raw[index + 2 : index + 2 + width]
            if width and len(digits) == width and set(digits) <= _HEX:
                codepoint = int(digits, 16)
                if codepoint <= 0x10FFFF and not 0xD800 <= codepoint < 0xE000:
                    parts.append(chr(codepoint))
                    index += 2 + width
                    continue
            escape = raw[index : index + 2 + width] if width else raw[index : index + 2]
            raise HclError(f"{path}: invalid escape sequence {escape}")
        if raw.startswith(("$${", "%%{"), index):
            parts.append(raw[index + 1 : index + 3])
            index += 3
        elif raw.startswith(("${", "%{"), index):
            opener = raw[index : index + 2]
            raise HclError(
                f"{path}: templates ({opener}...}}) are not supported;"
                f" write {opener[0]}{opener} for a literal {opener}"
            )
        else:
            parts.append(char)
            index += 1
    return "".join(parts)
