"""The L7 (HTTP/1.1) mTLS data path. Framing is in ``proxy/l7/http.py`` (pure); the
protocols, pools and listeners in ``proxy/l7/transport.py`` (the layering rule lets
only adapter files import ``asyncio``); this package re-exports the listeners."""

from proxy.l7.forward import HttpForwardListener
from proxy.l7.transport import HttpInbound, HttpOutboundListener

__all__ = ["HttpForwardListener", "HttpInbound", "HttpOutboundListener"]
