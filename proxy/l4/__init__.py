"""The L4 (TCP) mTLS data path. The code lives in ``proxy/l4/transport.py``: the
layering rule (tests/test_layering.py) lets only adapter files (``transport.py``,
``server.py``...) import ``asyncio``; this package re-exports it as ``proxy.l4``."""

from proxy.l4.transport import (
    Counters,
    HttpHandoff,
    InboundListener,
    OutboundListener,
    WrongIdentity,
)

__all__ = [
    "Counters",
    "HttpHandoff",
    "InboundListener",
    "OutboundListener",
    "WrongIdentity",
]
