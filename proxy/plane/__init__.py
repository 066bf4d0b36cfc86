"""The worker's data plane: the listeners of the current snapshot and how a new one
replaces them. The code is in ``proxy/plane/transport.py`` (only adapter files may
import ``asyncio``, tests/test_layering.py); the pure decisions it carries out are in
``proxy/dataplane.py``."""

from proxy.dataplane import SnapshotRejected
from proxy.plane.transport import DataPlane, SwitchableAccessLog, load_l7

__all__ = ["DataPlane", "SnapshotRejected", "SwitchableAccessLog", "load_l7"]
