"""Request and response between agents, over gossip's reliable user messages.

Theory of operation
-------------------
CSRs, policy writes, root rotations and CA state travel to the CA leader as gossip
*user* messages sent over a stream (``GossipTransport.send_user(..., reliable=True)``):
TCP, sealed with the cluster's gossip key like every other gossip byte, up to 64 KiB.
A request is ``Q`` + msgpack ``[id, method, node, body]``; the answer is ``A`` +
msgpack ``[id, error, body]`` where ``error`` is ``""`` on success, else a short code
and ``body`` the message.

The answer goes to the gossip address that *membership* has for ``node`` - never to
an address the request names. A member holding the gossip key could claim to be
another node, but the answer (a certificate for that node's service, say) still goes
to the real node, which drops what it did not ask for.

Bounded everywhere: at most :data:`MAX_INFLIGHT_HANDLERS` requests are served at
once (more get ``busy``), at most :data:`MAX_PENDING_CALLS` calls wait, every call has
a timeout, and unknown or malformed messages are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgpack
import structlog

from meshnode.errors import MeshError

log = structlog.get_logger()

Address = tuple[str, int]
Handler = Callable[[str, Any], Awaitable[Any]]
"""``handler(node, body) -> body``; raise :class:`RpcError` to answer with an error."""

REQUEST_TAG: Final = b"Q"
RESPONSE_TAG: Final = b"A"
#: Largest message we decode: the gossip layer's user message limit.
MAX_MESSAGE_BYTES: Final = 64 * 1024
MAX_INFLIGHT_HANDLERS: Final = 256
MAX_PENDING_CALLS: Final = 1024
DEFAULT_TIMEOUT: Final = 5.0


class RpcError(MeshError):
    """The remote side answered with an error (or we could not reach it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Rpc:
    """Calls to, and handlers for, other agents."""

    def __init__(
        self,
        node: str,
        send: Callable[[Address, bytes], None],
        resolve: Callable[[str], Address | None],
        rng: random.Random,
    ) -> None:
        self.node = node
        self._send = send
        self._resolve = resolve
        self._rng = rng
        self._handlers: dict[str, Handler] = {}
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped: dict[str, int] = {}
        """Messages dropped, by reason (for metrics)."""
        self.served: dict[str, int] = {}
        """Requests answered, by method."""

    def register(self, method: str, handler: Handler) -> None:
        self._handlers[method] = handler

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    # ------------------------------------------------------------------ calls

    async def call(
        self, address: Address, method: str, body: Any, within: float = DEFAULT_TIMEOUT
    ) -> Any:
        """Send a request to the member at ``address`` and wait for its answer.

        Raises :class:`RpcError` with the remote error code, or with ``timeout`` /
        ``overloaded`` when nothing came back."""
        if len(self._pending) >= MAX_PENDING_CALLS:
            raise RpcError("overloaded", "too many requests in flight")
        request_id = self._rng.getrandbits(62)
        while request_id in self._pending:
            request_id = self._rng.getrandbits(62)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            payload = REQUEST_TAG + msgpack.packb(
                [request_id, method, self.node, body], use_bin_type=True
            )
            if len(payload) > MAX_MESSAGE_BYTES:
                raise RpcError("too_large", f"{method} request of {len(payload)} bytes")
            self._send(address, payload)
            try:
                async with asyncio.timeout(within):
                    return await future
            except TimeoutError:
                raise RpcError(
                    "timeout", f"{method}: no answer from {address[0]}:{address[1]}"
                ) from None
        finally:
            self._pending.pop(request_id, None)

    # ------------------------------------------------------------------ inbound

    def receive(self, message: bytes) -> None:
        """A user message tagged ``Q`` or ``A`` (called from the gossip delegate)."""
        if len(message) > MAX_MESSAGE_BYTES:
            self._drop("oversize")
            return
        try:
            fields = msgpack.unpackb(
                message[1:], raw=False, max_array_len=4, max_map_len=64, strict_map_key=True
            )
        except (ValueError, TypeError, msgpack.UnpackException):
            self._drop("malformed")
            return
        if not isinstance(fields, list) or len(fields) not in (3, 4):
            self._drop("malformed")
            return
        if message[:1] == RESPONSE_TAG and len(fields) == 3:
            self._on_response(*fields)
        elif message[:1] == REQUEST_TAG and len(fields) == 4:
            self._on_request(*fields)
        else:
            self._drop("malformed")

    def _on_response(self, request_id: object, error: object, body: object) -> None:
        if not isinstance(request_id, int) or not isinstance(error, str):
            self._drop("malformed")
            return
        future = self._pending.get(request_id)
        if future is None or future.done():
            self._drop("unsolicited")
            return
        if error:
            future.set_exception(RpcError(error, str(body)))
        else:
            future.set_result(body)

    def _on_request(self, request_id: object, method: object, node: object, body: object) -> None:
        if not isinstance(request_id, int) or not isinstance(method, str):
            self._drop("malformed")
            return
        if not isinstance(node, str) or not node:
            self._drop("malformed")
            return
        address = self._resolve(node)
        if address is None:
            self._drop("unknown_node")
            return
        handler = self._handlers.get(method)
        loop = asyncio.get_running_loop()
        # Called from inside the gossip core: answer on the next loop turn, never
        # re-entering the core while it is handling a message.
        if handler is None:
            self._drop("unknown_method")
            error = ("unknown_method", f"no method {method!r}")
            loop.call_soon(self._answer, address, request_id, *error)
            return
        if len(self._tasks) >= MAX_INFLIGHT_HANDLERS:
            self._drop("busy")
            loop.call_soon(self._answer, address, request_id, "busy", "too many requests")
            return
        task = loop.create_task(self._serve(handler, method, node, body, address, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self,
        handler: Handler,
        method: str,
        node: str,
        body: object,
        address: Address,
        request_id: int,
    ) -> None:
        try:
            result = await handler(node, body)
        except RpcError as exc:
            self._answer(address, request_id, exc.code, exc.message)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler bug must not kill the agent
            log.exception("rpc_handler_failed", method=method, node=node)
            self._answer(address, request_id, "internal", f"{type(exc).__name__}: {exc}")
            return
        self.served[method] = self.served.get(method, 0) + 1
        self._answer(address, request_id, "", result)

    def _answer(self, address: Address, request_id: int, error: str, body: Any) -> None:
        payload = RESPONSE_TAG + msgpack.packb([request_id, error, body], use_bin_type=True)
        if len(payload) > MAX_MESSAGE_BYTES:
            payload = RESPONSE_TAG + msgpack.packb(
                [request_id, "too_large", "answer too large"], use_bin_type=True
            )
        with contextlib.suppress(Exception):
            self._send(address, payload)

    async def aclose(self) -> None:
        """Cancel the handlers still running and fail the pending calls."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RpcError("closed", "agent stopping"))
