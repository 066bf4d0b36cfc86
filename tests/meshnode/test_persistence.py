"""The data dir: atomic writes, crash leftovers, corruption, permissions, the lock."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode import persistence
from meshnode.persistence import (
    LOCAL_STATE_FILE,
    MEMBERS_FILE,
    NODE_ID_FILE,
    DataDir,
    DataDirError,
    DataDirLockedError,
    SavedMember,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[DataDir]:
    with DataDir(tmp_path / "data") as opened:
        yield opened


def test_ensure_creates_private_directory_even_under_a_loose_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o000)
    try:
        directory = DataDir(tmp_path / "a" / "b")
        directory.ensure()
    finally:
        os.umask(old_umask)
    assert mode_of(directory.path) == 0o700


def test_ensure_tightens_an_existing_directory(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    DataDir(loose).ensure()
    assert mode_of(loose) == 0o700


def test_ensure_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataDirError, match="not a directory"):
        DataDir(tmp_path / "file").ensure()


def test_files_are_0600_and_round_trip(data_dir: DataDir) -> None:
    data_dir.atomic_write_json("thing.json", {"b": [1, 2.5, None], "a": "ü"})
    assert data_dir.read_json("thing.json") == {"b": [1, 2.5, None], "a": "ü"}
    assert mode_of(data_dir.path / "thing.json") == 0o600
    data_dir.node_id()
    assert mode_of(data_dir.path / NODE_ID_FILE) == 0o600
    assert mode_of(data_dir.path / persistence.LOCK_FILE) == 0o600
    assert data_dir.read_json("missing.json", default=[]) == []


def test_unserializable_object_writes_nothing(data_dir: DataDir) -> None:
    data_dir.atomic_write_json("x.json", [1])
    with pytest.raises(TypeError):
        data_dir.atomic_write_json("x.json", {"bad": object()})
    assert data_dir.read_json("x.json") == [1]
    assert sorted(p.name for p in data_dir.path.iterdir()) == [persistence.LOCK_FILE, "x.json"]


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "x.tmp", "", "m.corrupt-1"])
def test_bad_names_are_refused(data_dir: DataDir, name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        data_dir.atomic_write_json(name, 1)


def test_crash_between_write_and_rename_keeps_the_old_file(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir.save_members([("a", "10.0.0.1", 7946)])

    # A crash at the worst moment: the new content is written and fsynced to the temp
    # file, and the process dies before rename(2). Simulated by a BaseException (what
    # KeyboardInterrupt or SystemExit would be), then the temp file put back as a dead
    # process would have left it.
    leftovers: list[tuple[str, bytes]] = []

    def crash(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
        leftovers.append((os.fspath(source), Path(source).read_bytes()))
        raise SystemExit("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SystemExit):
        data_dir.save_members([("b", "10.0.0.2", 7946)])
    monkeypatch.undo()
    ((temp_name, content),) = leftovers
    assert b'"b"' in content, "the new content had reached the temp file"
    Path(temp_name).write_bytes(content)  # a killed process does not clean up
    data_dir.unlock()

    # Restart: the old list is read, the temp file is ignored and then swept away.
    restarted = DataDir(data_dir.path)
    assert restarted.load_members() == [SavedMember("a", "10.0.0.1", 7946)]
    assert Path(temp_name).exists(), "reading does not touch other files"
    restarted.lock()
    try:
        assert not Path(temp_name).exists(), "the new owner removes orphaned temp files"
        assert restarted.load_members() == [SavedMember("a", "10.0.0.1", 7946)]
    finally:
        restarted.unlock()


def test_kill_9_during_writes_never_leaves_a_torn_file(tmp_path: Path) -> None:
    """A real ``kill -9`` of a process rewriting a file in a loop: whatever instant it
    dies at, the file parses and holds one complete version."""
    directory = tmp_path / "data"
    script = textwrap.dedent(
        f"""
        import sys
        from meshnode.persistence import DataDir
        d = DataDir({str(directory)!r}); d.ensure(); d.lock()
        print("ready", flush=True)
        i = 0
        while True:
            i += 1
            d.atomic_write_json("counter.json", {{"i": i, "pad": "x" * 50000 * (i % 3)}})
        """
    )
    for delay in (0.0, 0.03, 0.1):
        process = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            # Lines before "ready" are the agent's logs (e.g. the temp file it swept).
            while (line := process.stdout.readline()) != b"ready\n":
                assert line, "the writer died before it was ready"
            while not (directory / "counter.json").exists():
                time.sleep(0.001)
            time.sleep(delay)  # land the kill at different points of the write loop
            process.kill()
        finally:
            process.kill()
            process.wait()
        document = json.loads((directory / "counter.json").read_text())
        assert len(document["pad"]) == 50000 * (document["i"] % 3)
    reopened = DataDir(directory)
    assert reopened.read_json("counter.json")["i"] >= 1
    assert reopened.corrupted == []


def test_corrupt_file_is_moved_aside_and_reported(data_dir: DataDir) -> None:
    target = data_dir.path / MEMBERS_FILE
    target.write_bytes(b'{"version": 1, "members": [')  # torn by a bad disk or an editor
    assert data_dir.load_members() == []
    assert not target.exists()
    moved = data_dir.path / f"{MEMBERS_FILE}.corrupt-1"
    assert moved.read_bytes() == b'{"version": 1, "members": ['
    (report,) = data_dir.corrupted
    assert report.name == MEMBERS_FILE and report.moved_to == moved and report.reason

    # A second corruption gets the next number; the first copy is kept.
    target.write_bytes(b"\xff\xfe not utf-8")
    assert data_dir.read_json(MEMBERS_FILE, default="fallback") == "fallback"
    assert (data_dir.path / f"{MEMBERS_FILE}.corrupt-2").exists() and moved.exists()

    # Saving works again afterwards.
    data_dir.save_members([("a", "10.0.0.1", 1)])
    assert data_dir.load_members() == [("a", "10.0.0.1", 1)]


def test_wrong_shape_is_corrupt_but_a_newer_version_is_left_alone(data_dir: DataDir) -> None:
    (data_dir.path / LOCAL_STATE_FILE).write_text('["not", "an", "envelope"]')
    assert data_dir.load_local_state() is None
    assert (data_dir.path / f"{LOCAL_STATE_FILE}.corrupt-1").exists()

    newer = '{"version": 99, "state": {"from": "the future"}}'
    (data_dir.path / LOCAL_STATE_FILE).write_text(newer)
    assert data_dir.load_local_state() is None
    assert (data_dir.path / LOCAL_STATE_FILE).read_text() == newer, "not ours to move"


def test_members_round_trip_and_bad_entries_are_skipped(data_dir: DataDir) -> None:
    members = [("n1", "10.0.0.1", 7946), ("n2", "fd00::2", 8301)]
    data_dir.save_members(members)
    loaded = data_dir.load_members()
    assert loaded == members and all(isinstance(m, SavedMember) for m in loaded)
    assert loaded[1].port == 8301
    assert [m.join_address for m in loaded] == ["10.0.0.1:7946", "[fd00::2]:8301"]

    document = json.loads((data_dir.path / MEMBERS_FILE).read_text())
    document["members"] += [{"name": "x"}, {"name": "y", "host": "h", "port": 70000}, 5]
    (data_dir.path / MEMBERS_FILE).write_text(json.dumps(document))
    assert data_dir.load_members() == members


def test_local_state_round_trip(data_dir: DataDir) -> None:
    assert data_dir.load_local_state() is None
    state = {"services": [{"ID": "web-1", "Port": 8080}], "checks": []}
    data_dir.save_local_state(state)
    assert DataDir(data_dir.path).load_local_state() == state


def test_node_id_is_created_once_and_kept(tmp_path: Path) -> None:
    with DataDir(tmp_path / "d") as first:
        node_id = first.node_id()
        assert uuid.UUID(node_id).version == 4
        assert first.node_id() == node_id
    with DataDir(tmp_path / "d") as reopened:
        assert reopened.node_id() == node_id
    assert (tmp_path / "d" / NODE_ID_FILE).read_text().strip() == node_id


def test_unreadable_node_id_is_replaced_and_reported(data_dir: DataDir) -> None:
    (data_dir.path / NODE_ID_FILE).write_text("garbage")
    node_id = data_dir.node_id()
    uuid.UUID(node_id)
    assert (data_dir.path / f"{NODE_ID_FILE}.corrupt-1").read_text() == "garbage"
    assert [c.name for c in data_dir.corrupted] == [NODE_ID_FILE]


def test_lock_refuses_a_second_owner_and_names_the_dir(tmp_path: Path) -> None:
    first = DataDir(tmp_path / "d")
    first.ensure()
    first.lock()
    second = DataDir(tmp_path / "d")
    with pytest.raises(DataDirLockedError) as raised:
        second.lock()
    message = str(raised.value)
    assert str(tmp_path / "d") in message and f"pid {os.getpid()}" in message
    assert not second.locked
    first.unlock()
    second.lock()  # free again once released
    second.unlock()


def test_lock_held_by_another_process_and_released_when_it_dies(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from meshnode.persistence import DataDir; "
            f"d = DataDir({str(directory)!r}); d.ensure(); d.lock(); "
            "print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(DataDirLockedError, match=f"pid {holder.pid}"):
            DataDir(directory).lock()
    finally:
        holder.kill()  # kill -9: no chance to unlock, the kernel drops the flock
        holder.wait()
    with DataDir(directory) as taken_over:
        assert taken_over.locked
