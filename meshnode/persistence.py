"""The agent's ``data_dir``: node id, local registrations and checks, last known members.

Theory of operation
-------------------
Everything here exists so that an agent killed with ``kill -9`` comes back as the *same*
node, serving the *same* registrations, and finds its cluster again without being told
a join address (DESIGN.md, Agent: Persistence).

* **One owner.** ``lock()`` takes an exclusive ``fcntl.flock`` on ``meshnode.lock``
  inside the directory. Two agents sharing one data dir would overwrite each other's
  files and claim one node id; the second gets ``DataDirLockedError`` naming the dir.
  The kernel drops a flock when its process dies, so a crash never leaves a stale lock
  behind (unlike a pid file).
* **Atomic writes.** ``atomic_write_json`` writes a temp file in the same directory,
  flushes and fsyncs it, renames it over the target, then fsyncs the directory. rename(2)
  within one file system is atomic, so a reader sees either the old or the new file,
  never half of one; the directory fsync makes the rename itself durable (without it
  ext4/xfs may forget the rename after a power cut even though the data reached disk).
  A crash before the rename leaves the old file intact plus an orphan ``.<name>.*.tmp``
  that readers never look at and ``lock()`` sweeps away.
* **Corruption is not fatal.** A file that does not parse (a disk error, an operator's
  editor) is renamed to ``<name>.corrupt-<n>``, logged, recorded in ``corrupted``, and
  treated as absent. The agent starts with less state instead of not starting; the bad
  bytes stay on disk for a human to look at.
* **Private.** The directory is 0700 and every file 0600: it will also hold keys and
  certificates (DESIGN.md), and registrations can name internal services.

Every method does blocking file I/O (fsync can take milliseconds on a busy disk). The
agent calls them before its event loop starts or through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import structlog

from meshnode.errors import MeshError

log = structlog.get_logger()

#: Permissions of the data directory: only the agent's user may list or enter it.
DIR_MODE: Final = 0o700
#: Permissions of every file in it (keys and certificates live here too).
FILE_MODE: Final = 0o600

#: File names, fixed so an operator (and a newer agent) knows where to look.
LOCK_FILE: Final = "meshnode.lock"
#: Plain text, one UUID, like Consul's ``node-id`` file.
NODE_ID_FILE: Final = "node-id"
MEMBERS_FILE: Final = "members.json"
LOCAL_STATE_FILE: Final = "local-state.json"

#: Version of the JSON envelopes this module writes. A file with a higher version was
#: written by a newer agent: it is left alone and treated as absent.
FORMAT_VERSION: Final = 1

#: Files read back are bounded: a data file is at most a few members and
#: registrations, and reading a runaway file whole would take the agent's memory.
MAX_FILE_SIZE: Final = 64 * 1024 * 1024

#: Suffix of temp files; readers never look at names that end with it.
_TEMP_SUFFIX: Final = ".tmp"
#: A name we accept for a data file: no path separators, no leading dot (temp files
#: and the lock are hidden or reserved), nothing that looks like a moved-aside file.
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: How many ``<name>.corrupt-<n>`` files we keep numbering before reusing the last one;
#: a file that keeps going bad must not fill the disk with copies.
_MAX_CORRUPT_COPIES: Final = 100


class DataDirError(MeshError):
    """The data dir cannot be used (wrong type, permissions, I/O error); names the path."""


class DataDirLockedError(DataDirError):
    """Another process (normally another agent) holds the data dir's lock."""

    def __init__(self, path: Path, holder: str) -> None:
        who = f" (pid {holder})" if holder else ""
        super().__init__(
            f"data dir {path} is in use by another meshnode agent{who}; "
            "two agents cannot share one data_dir"
        )
        self.path = path
        """The data directory."""
        self.holder = holder
        """The pid the holder wrote into the lock file, or "" if unknown."""


class SavedMember(NamedTuple):
    """A member as remembered for rejoining: gossip name and address."""

    name: str
    host: str
    port: int

    @property
    def join_address(self) -> str:
        """``host:port`` (``[v6]:port``), as ``GossipTransport.join`` accepts it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CorruptFile:
    """A data file that did not parse and was moved aside."""

    name: str
    """The file's name in the data dir (``members.json``)."""
    moved_to: Path
    """Where its bytes are now (``members.json.corrupt-1``)."""
    reason: str
    """Why it was rejected (the parser's message)."""


class _Corrupt(Exception):
    """Internal: a file's content is unusable; the message says why."""


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or name == LOCK_FILE or ".corrupt-" in name:
        raise ValueError(f"not a data file name: {name!r}")
    if name.endswith(_TEMP_SUFFIX):
        raise ValueError(f"data file names must not end with {_TEMP_SUFFIX!r}: {name!r}")


def _fsync_directory(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (see the module docstring)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DataDir:
    """The agent's data directory.

    Usage::

        data_dir = DataDir("/var/lib/meshnode")
        data_dir.ensure()
        data_dir.lock()          # DataDirLockedError if another agent runs on it
        node_id = data_dir.node_id()
        ...
        data_dir.unlock()

    or ``with DataDir(path) as data_dir:`` for ``ensure`` + ``lock`` ... ``unlock``.

    Args:
        path: The directory; created (with parents) by ``ensure``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path).absolute()
        self._lock_fd: int | None = None
        self.corrupted: list[CorruptFile] = []
        """Every file this object moved aside, oldest first (also logged)."""

    def __repr__(self) -> str:
        return f"DataDir({str(self._path)!r})"

    def __enter__(self) -> DataDir:
        self.ensure()
        self.lock()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unlock()

    @property
    def path(self) -> Path:
        """The directory (absolute)."""
        return self._path

    @property
    def locked(self) -> bool:
        """True while this object holds the lock."""
        return self._lock_fd is not None

    # ------------------------------------------------------------------ lifecycle

    def ensure(self) -> None:
        """Create the directory (mode 0700, parents as needed); tighten an existing one.

        Raises:
            DataDirError: the path exists and is not a directory, or cannot be created.
        """
        try:
            self._path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask and an existing dir keeps its own:
            # set it explicitly so the result does not depend on how we were started.
            mode = stat.S_IMODE(self._path.stat().st_mode)
            if mode != DIR_MODE:
                os.chmod(self._path, DIR_MODE)
                if mode & 0o077:
                    log.warning(
                        "data_dir_permissions_tightened", path=str(self._path), was=oct(mode)
                    )
        except FileExistsError as exc:
            raise DataDirError(f"data dir {self._path} exists and is not a directory") from exc
        except OSError as exc:
            raise DataDirError(f"data dir {self._path}: {exc.strerror or exc}") from exc

    def lock(self) -> None:
        """Become the only owner of the directory (non-blocking).

        Also removes temp files orphaned by a crash of the previous owner, which is
        only safe once nobody else can be writing.

        Raises:
            DataDirLockedError: another process holds the lock.
            DataDirError: the lock file cannot be opened.
        """
        if self._lock_fd is not None:
            return
        lock_path = self._path / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise DataDirError(
                f"data dir {self._path}: cannot open {lock_path}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise DataDirLockedError(self._path, holder) from None
            raise DataDirError(
                f"data dir {self._path}: cannot lock {lock_path}: {exc.strerror or exc}"
            ) from exc
        # The pid is only for the error message of a second agent; the flock is the lock.
        os.fchmod(fd, FILE_MODE)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._lock_fd = fd
        self._remove_orphaned_temp_files()

    def unlock(self) -> None:
        """Release the lock (closing the descriptor releases the flock)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    close = unlock

    def _remove_orphaned_temp_files(self) -> None:
        for leftover in self._path.glob(f".*{_TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                log.info("data_dir_temp_file_removed", path=str(leftover))

    # ------------------------------------------------------------------ generic files

    def atomic_write_json(self, name: str, obj: object) -> None:
        """Replace file ``name`` with ``obj`` as JSON, atomically and durably, mode 0600.

        Args:
            name: A plain file name inside the data dir (no separators, no leading dot).
            obj: Anything ``json.dumps`` accepts.

        Raises:
            ValueError: a bad name. TypeError: ``obj`` is not JSON-serializable (nothing
                is written). DataDirError: the write failed; the old file is intact.
        """
        _check_name(name)
        # Serialize first: a TypeError must not leave a temp file behind.
        data = (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
        self._atomic_write_bytes(name, data)

    def atomic_write_bytes(self, name: str, data: bytes) -> None:
        """Replace file ``name`` with ``data``, atomically and durably, mode 0600 (CA
        state, keys, policy). Raises as :meth:`atomic_write_json`."""
        _check_name(name)
        self._atomic_write_bytes(name, data)

    def read_bytes(self, name: str) -> bytes | None:
        """The bytes of file ``name`` (None if missing); the caller validates them."""
        _check_name(name)
        return self._read_bytes(name)

    def _atomic_write_bytes(self, name: str, data: bytes) -> None:
        target = self._path / name
        try:
            # mkstemp: same directory (so the rename never crosses file systems), an
            # unguessable name, O_EXCL, and mode 0600 from the start.
            fd, temp_name = tempfile.mkstemp(
                prefix=f".{name}.", suffix=_TEMP_SUFFIX, dir=self._path
            )
        except OSError as exc:
            raise DataDirError(f"cannot write {target}: {exc.strerror or exc}") from exc
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), FILE_MODE)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, target)
            _fsync_directory(self._path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            if isinstance(exc, OSError):
                raise DataDirError(f"cannot write {target}: {exc.strerror or exc}") from exc
            raise

    def read_json(self, name: str, default: Any = None) -> Any:
        """The JSON in file ``name``, or ``default`` if it is missing or corrupt.

        A file that is not valid UTF-8 JSON is moved aside (see ``CorruptFile``); temp
        files left by an interrupted write are never read.

        Raises:
            ValueError: a bad name. DataDirError: the file exists but cannot be read.
        """
        _check_name(name)
        data = self._read_bytes(name)
        if data is None:
            return default
        try:
            return self._parse(data)
        except _Corrupt as exc:
            self._move_aside(name, str(exc))
            return default

    def _read_bytes(self, name: str) -> bytes | None:
        path = self._path / name
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_FILE_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DataDirError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return data

    @staticmethod
    def _parse(data: bytes) -> Any:
        if len(data) > MAX_FILE_SIZE:
            raise _Corrupt(f"larger than {MAX_FILE_SIZE} bytes")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Corrupt(str(exc)) from None

    def _move_aside(self, name: str, reason: str) -> None:
        source = self._path / name
        for n in range(1, _MAX_CORRUPT_COPIES + 1):
            destination = self._path / f"{name}.corrupt-{n}"
            if not destination.exists():
                break
        try:
            os.replace(source, destination)
            _fsync_directory(self._path)
        except OSError as exc:
            # Leave it where it is: the next write replaces it anyway.
            log.error(
                "data_file_corrupt",
                path=str(source),
                reason=reason,
                move_failed=exc.strerror or str(exc),
            )
            destination = source
        else:
            log.warning(
                "data_file_corrupt", path=str(source), reason=reason, moved_to=str(destination)
            )
        self.corrupted.append(CorruptFile(name, destination, reason))

    def _read_envelope(self, name: str, key: str) -> Any:
        """``document[key]`` of a ``{"version": 1, key: ...}`` file, None if absent.

        A document of the wrong shape is corrupt; one from a newer agent is ignored.
        """
        document = self.read_json(name)
        if document is None:
            return None
        version = document.get("version") if isinstance(document, dict) else None
        if isinstance(version, int) and not isinstance(version, bool):
            if version > FORMAT_VERSION:
                log.warning(
                    "data_file_newer_version",
                    path=str(self._path / name),
                    version=version,
                    supported=FORMAT_VERSION,
                )
                return None
            if key in document:
                return document[key]
        self._move_aside(name, f'expected {{"version": {FORMAT_VERSION}, "{key}": ...}}')
        return None

    # ------------------------------------------------------------------ node id

    def node_id(self) -> str:
        """This node's id: a UUID made on first use and kept (Consul's ``node-id``).

        An unreadable id is moved aside and replaced (logged): a new identity beats an
        agent that cannot start.
        """
        data = self._read_bytes(NODE_ID_FILE)
        if data is not None:
            text = data.decode("utf-8", "replace").strip()
            try:
                return str(uuid.UUID(text))
            except ValueError:
                self._move_aside(NODE_ID_FILE, f"not a UUID: {text[:64]!r}")
        node_id = str(uuid.uuid4())
        self._atomic_write_bytes(NODE_ID_FILE, (node_id + "\n").encode("ascii"))
        log.info("node_id_created", node_id=node_id, path=str(self._path / NODE_ID_FILE))
        return node_id

    # ------------------------------------------------------------------ members

    def save_members(self, members: Iterable[tuple[str, str, int]]) -> None:
        """Remember the members to rejoin after a restart (replaces the previous list)."""
        entries = [
            {"name": str(name), "host": str(host), "port": int(port)}
            for name, host, port in members
        ]
        self.atomic_write_json(MEMBERS_FILE, {"version": FORMAT_VERSION, "members": entries})

    def load_members(self) -> list[SavedMember]:
        """The members saved last, or ``[]``. Malformed entries are skipped and logged."""
        entries = self._read_envelope(MEMBERS_FILE, "members")
        if entries is None:
            return []
        if not isinstance(entries, list):
            self._move_aside(MEMBERS_FILE, '"members" is not a list')
            return []
        members: list[SavedMember] = []
        for entry in entries:
            member = _saved_member(entry)
            if member is None:
                log.warning("saved_member_skipped", entry=repr(entry)[:200])
            else:
                members.append(member)
        return members

    # ------------------------------------------------------------------ local state

    def save_local_state(self, state: object) -> None:
        """Save the agent's local services and checks (opaque JSON to this module)."""
        self.atomic_write_json(LOCAL_STATE_FILE, {"version": FORMAT_VERSION, "state": state})

    def load_local_state(self) -> Any:
        """What ``save_local_state`` saved last, or None if nothing (usable) was saved."""
        return self._read_envelope(LOCAL_STATE_FILE, "state")


def _saved_member(entry: object) -> SavedMember | None:
    if not isinstance(entry, dict):
        return None
    name, host, port = entry.get("name"), entry.get("host"), entry.get("port")
    if not (isinstance(name, str) and name and isinstance(host, str) and host):
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return None
    return SavedMember(name, host, port)
