"""ladle.store.storage and ladle.store.paths: the narrow file seam every run, reader and writer
goes through, on local paths and fsspec URLs alike (a real S3 server: tests/test_object_store.py)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from ladle.errors import MissingDependency
from ladle.store.paths import local_copy, open_ranged
from ladle.store.storage import LocalStorage, atomic_write, is_url, storage_for


@pytest.fixture
def memory_dir() -> str:
    # A fresh prefix per test: fsspec's memory file system is shared by the whole process.
    return f"memory://ladle-storage-{secrets.token_hex(4)}"


def test_a_plain_path_is_served_by_local_storage_as_an_absolute_path(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    storage, path = storage_for("runs/a")
    assert isinstance(storage, LocalStorage) and storage.atomic_rename
    assert path == str(tmp_path / "runs" / "a")


def test_a_url_keeps_its_protocol_and_is_not_a_local_path(memory_dir: str) -> None:
    storage, path = storage_for(memory_dir + "/run")
    assert is_url(path) and path.startswith("memory://")
    assert storage.local_path(path) is None
    assert not storage.atomic_rename


def test_a_missing_file_system_package_is_one_line_naming_the_url() -> None:
    with pytest.raises(MissingDependency, match=r"^gcs://bucket/run: the gcs:// file system needs a package"):
        storage_for("gcs://bucket/run")


def test_atomic_write_publishes_the_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    storage, path = storage_for(tmp_path / "index.json")
    with atomic_write(storage, path) as handle:
        handle.write(b"new")
    assert Path(path).read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["index.json"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_failed_atomic_write_keeps_the_old_content(tmp_path: Path, memory_dir: str, where: str) -> None:
    root = str(tmp_path) if where == "local" else memory_dir
    storage, path = storage_for(f"{root}/index.json")
    storage.makedirs(path.rsplit("/", 1)[0])
    storage.write_bytes(path, b"old")
    with pytest.raises(RuntimeError), atomic_write(storage, path) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("the writer failed")
    assert storage.read_bytes(path) == b"old"
    assert storage.listdir(path.rsplit("/", 1)[0]) == ["index.json"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_ranged_reads_return_the_bytes_at_those_offsets(tmp_path: Path, memory_dir: str, where: str) -> None:
    data = bytes(range(256)) * 64
    root = str(tmp_path) if where == "local" else memory_dir
    storage, path = storage_for(f"{root}/blob.bin")
    storage.makedirs(path.rsplit("/", 1)[0])
    storage.write_bytes(path, data)
    ranged = open_ranged(path)
    try:
        assert ranged.read(0, 10) == data[:10]
        assert ranged.read(5000, 300) == data[5000:5300]
        view = memoryview(bytearray(100))
        ranged.read_into(view, len(data) - 100)
        assert bytes(view) == data[-100:]
    finally:
        ranged.close()


def test_a_local_copy_of_a_url_is_deleted_on_exit_even_when_the_reader_fails(memory_dir: str) -> None:
    storage, path = storage_for(memory_dir + "/weights.bin")
    storage.makedirs(memory_dir)
    storage.write_bytes(path, b"tensor bytes")
    with pytest.raises(ValueError), local_copy(path) as local:
        assert Path(local).read_bytes() == b"tensor bytes"
        raise ValueError("the reader failed")
    assert not os.path.exists(local)


def test_a_local_copy_of_a_local_file_is_the_file_itself(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"x")
    with local_copy(target) as local:
        assert local == str(target)
    assert target.exists()
