"""shards.storage: one code path for local files and object storage, checked against a real S3 server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from shards import storage
from shards.storage import StorageError


@pytest.mark.parametrize("url, why", [
    ("s3:/data/shards", "malformed URL"),  # what Path("s3://data/shards") makes of a URL
    ("http://example.com/shards", r"http\(s\) is not object storage"),
    ("ftp://host/x", "unsupported URL scheme ftp://"),
    ("s3:///shards", "no bucket name"),
])
def test_unsupported_or_mangled_urls_are_one_line_errors(url, why):
    with pytest.raises(StorageError, match=why) as info:
        storage.check_url(url)
    assert "\n" not in str(info.value)


def test_join_keeps_urls_intact_and_local_paths_as_paths(tmp_path):
    assert storage.join("s3://data/shards/", "train-000000.tar") == "s3://data/shards/train-000000.tar"
    assert storage.join(tmp_path, "a.tar") == tmp_path / "a.tar"
    assert storage.parent("s3://data/shards/manifest.json") == "s3://data/shards"
    assert storage.name("s3://data/shards/manifest.json") == "manifest.json"


def test_local_and_remote_files_behave_alike(s3_env, tmp_path):
    payload = bytes(range(256)) * 64
    local = tmp_path / "blob.bin"
    local.write_bytes(payload)
    for root in (str(tmp_path / "out"), "s3://data/storage-test"):
        if not storage.is_url(root):
            Path(root).mkdir()
        target = storage.join(root, "sub/blob.bin" if storage.is_url(root) else "blob.bin")
        assert not storage.exists(target)
        storage.put_file(local, target)
        assert storage.exists(target) and storage.size(target) == len(payload)
        assert storage.read_bytes(target) == payload
        with storage.open_file(target, readahead=1024) as fh:
            fh.seek(1000)
            assert fh.read(300) == payload[1000:1300]
            fh.seek(5)
            assert fh.read(10) == payload[5:15]
        storage.write_bytes(storage.join(root, "note.json"), b"{}")
        listed = dict((str(p), n) for p, n in storage.list_files(root))
        assert listed[str(target)] == len(payload) and listed[str(storage.join(root, "note.json"))] == 2
        copy = storage.local_copy(target)
        assert copy.read_bytes() == payload and storage.local_copy(target) == copy  # one download per process
        storage.remove(target)
        assert not storage.exists(target)


def test_missing_object_wrong_bucket_and_bad_credentials_are_one_line_errors(s3_env, monkeypatch):
    storage.write_bytes("s3://data/errors/present.bin", b"x")
    with pytest.raises(FileNotFoundError, match=r"^no such object: s3://data/errors/absent\.bin$"):
        storage.read_bytes("s3://data/errors/absent.bin")
    with pytest.raises(StorageError, match=r"no such bucket \(no-such-bucket\)") as info:
        storage.read_bytes("s3://no-such-bucket/x.bin")
    assert "\n" not in str(info.value)
    with pytest.raises(StorageError, match="no such bucket"):
        list(storage.list_files("s3://no-such-bucket/prefix"))  # a generator: the store is asked when iterated

    import s3fs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    for call in (lambda: storage.read_bytes("s3://data/errors/present.bin"), lambda: storage.exists("s3://data/x"),
                 lambda: list(storage.list_files("s3://data/errors")), lambda: storage.write_bytes("s3://data/y", b"1")):
        with pytest.raises(StorageError, match="access denied .*check the credentials") as info:
            call()
        assert "\n" not in str(info.value)


def test_a_store_without_its_fsspec_package_is_a_one_line_error(monkeypatch):
    import importlib
    import sys

    registered = importlib.import_module("fsspec.registry")._registry  # the classes fsspec has already loaded
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed: importing it raises ImportError
    for name in ("gs", "gcs"):
        monkeypatch.delitem(registered, name, raising=False)
    with pytest.raises(StorageError, match=r"gs:// needs the gcsfs package \(pip install gcsfs\)") as info:
        storage.read_bytes("gs://bucket/shards/manifest.json")
    assert "\n" not in str(info.value)


def test_map_ahead_yields_in_order_raises_at_its_turn_and_cancels_what_is_not_started():
    import threading
    import time

    started: list[int] = []
    lock = threading.Lock()

    def slow(k: int) -> int:
        with lock:
            started.append(k)
        time.sleep(0.02 * (3 - k % 3))  # later items end first
        if k == 7:
            raise ValueError("item 7")
        return k * k

    results = storage.map_ahead(slow, range(20), ahead=4)
    assert [next(results) for _ in range(7)] == [k * k for k in range(7)]
    with pytest.raises(ValueError, match="item 7"):
        next(results)
    results.close()
    assert len(started) <= 7 + 4 + 1  # submitted at most `ahead` past the one being consumed, never all 20

    lazy = storage.map_ahead(slow, range(20), ahead=2)
    assert next(lazy) == 0
    lazy.close()  # the calls not started are cancelled, those under way waited for
    assert not [t for t in threading.enumerate() if t.name.startswith("store")]
