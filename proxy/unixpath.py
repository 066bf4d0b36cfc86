"""Unix socket paths longer than a socket address allows (the control socket of a
proxy worker lives in its agent's data dir, which may be deep). Imported by the agent
and by the worker: nothing but the standard library."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Final

#: sockaddr_un.sun_path is 108 bytes on Linux, with the terminating NUL.
MAX_UNIX_PATH: Final = 107


@contextlib.contextmanager
def reachable_unix_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """``path`` spelled so that ``bind``/``connect`` accept it: as it is, or, when it
    is longer than a unix socket address can be (a deep data dir: Nomad's alloc dirs
    easily are), as ``/proc/self/fd/<its directory>/<name>`` — the same file, reached
    through a descriptor of its directory, held open while the caller binds or
    connects."""
    text = os.fspath(path)
    if len(os.fsencode(text)) <= MAX_UNIX_PATH:
        yield text
        return
    directory, name = os.path.split(text)
    descriptor = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{descriptor}/{name}"
        if len(os.fsencode(short)) > MAX_UNIX_PATH:
            raise ValueError(f"{text}: its file name is too long for a unix socket")
        yield short
    finally:
        os.close(descriptor)
