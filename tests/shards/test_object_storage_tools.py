"""`shards verify` / `shards stats` on object storage and the streamed prefix listing, against moto's S3 server.

Remote verify and stats must say exactly what they say of the same files on local disk (same damage reports,
same exit codes), reading each tar and index with one GET; a prefix listing is a generator that asks for one
page at a time, in key order.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import threading
import time
import zlib
from pathlib import Path

import pytest

from shards import storage
from shards.build import BuildOptions, build_shards
from shards.manifest import read_manifest
from shards.summary import format_summary, summarize
from shards.verify import verify_shards

PER_SHARD = 8


def _upload(folder: Path, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            storage.put_file(path, f"{prefix}/{path.name}")


def _get_counts(requests: list[tuple[str, str, str]]) -> dict[str, int]:
    """GET requests per object path (query strings dropped)."""
    counts: dict[str, int] = {}
    for method, path, _range in requests:
        if method == "GET":
            key = path.split("?", 1)[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.fixture(scope="module")
def local_shards(photo_dir, tmp_path_factory) -> Path:
    """48 photos in 6 shards of 8, built locally (uploaded by each test that needs them in the bucket)."""
    out = tmp_path_factory.mktemp("verify-shards")
    build_shards([str(photo_dir)], out, BuildOptions(samples_per_shard=PER_SHARD, workers=1, progress=False))
    return out


# ---------------------------------------------------------------------------------------------- listing
NAMES = [f"{i:03d}.bin" for i in range(7)] + ["a.jpg", "a/x.jpg", "a/y/z.jpg", "a0.jpg", "\u00e9 b.jpg", "Z.jpg"]


def test_a_prefix_is_listed_one_page_at_a_time_completely_and_in_key_order(s3_env):
    client = s3_env.client()
    for name in NAMES:
        client.put_object(Bucket="data", Key=f"listing/{name}", Body=name.encode())
    client.put_object(Bucket="data", Key="listing-sibling/not-mine.bin", Body=b"x")  # shares the text prefix only
    client.put_object(Bucket="data", Key="listing/empty-folder/", Body=b"")  # a folder marker is no file
    expected = sorted((f"s3://data/listing/{n}", len(n.encode())) for n in NAMES)  # bytewise: "a.jpg" < "a/x.jpg"

    with s3_env.recording() as requests:
        listing = storage.list_files("s3://data/listing", page_size=3)
        first = next(listing)
        assert len(requests()) == 1  # the first key arrives after one page, before the listing is over
        rest = list(listing)
        pages = [p for method, p, _ in requests() if method == "GET" and "list-type=2" in p]
    assert [first, *rest] == expected
    assert len(pages) == math.ceil(len(NAMES) / 3) and all("max-keys=3" in p for p in pages)

    with s3_env.recording() as requests:  # is anything there? one key asked for, not the prefix's every page
        assert storage.has_files("s3://data/listing") and not storage.has_files("s3://data/listing-none")
        assert [p for _m, p, _r in requests()] == [
            f"/data?list-type=2&prefix={name}%2F&max-keys=1&encoding-type=url" for name in ("listing", "listing-none")]


def test_a_local_folder_and_an_fsspec_store_are_walked_lazily_in_the_same_orders(tmp_path):
    from fsspec.implementations.memory import MemoryFileSystem

    for name in NAMES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    listing = storage.list_files(tmp_path)
    assert next(listing) == (tmp_path / NAMES[0], len(NAMES[0]))  # a generator, as for object storage
    assert [(tmp_path / NAMES[0], len(NAMES[0])), *listing] == sorted(
        (p, p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())

    memory = MemoryFileSystem()  # stands in for gcsfs (gs://): the walk any fsspec store gets
    for name in NAMES:
        memory.pipe_file(f"/walk/{name}", name.encode())
    walked = [(name.split("/walk/", 1)[1], size) for name, size in storage._walk_fsspec(memory, "/walk")]
    assert walked == sorted(((n, len(n.encode())) for n in NAMES), key=lambda pair: pair[0].encode())


def test_a_size_is_asked_of_the_store_after_a_listing(s3_env):
    """A shard replaced or cut after the manifest was listed shows its new size to the shard check (a size kept
    from the listing hid it from the DALI recovery's recheck, and held two URLs per shard for the whole run)."""
    storage.write_bytes("s3://data/sizes/one.bin", b"12345")
    assert dict(storage.list_files("s3://data/sizes")) == {"s3://data/sizes/one.bin": 5}
    s3_env.client().put_object(Bucket="data", Key="sizes/one.bin", Body=b"123")  # another writer cuts it
    assert storage.size("s3://data/sizes/one.bin") == 3


# ---------------------------------------------------------------------------------------------- verify, stats
def test_verify_and_stats_of_a_good_set_in_object_storage(s3_env, local_shards, capsys, monkeypatch):
    pytest.importorskip("nvidia.dali")
    from shards import summary, verify
    from shards.__main__ import main

    url = "s3://data/verify-good"
    _upload(local_shards, url)
    monkeypatch.setattr(verify, "DALI_GROUP_SHARDS", 4)  # DALI passes over shards 0-3, then 4-5
    with s3_env.recording() as requests:
        report = verify_shards(url)
        gets = _get_counts(requests())
    assert report.ok and (report.shards, report.samples, report.dali_samples) == (6, 48, 48), report.errors
    files = [p.name for p in local_shards.iterdir() if p.suffix in (".tar", ".idx")]
    # Each tar and index: one GET, the DALI pass included (it reads the local copies, not a GET per sample).
    assert {path: n for path, n in gets.items() if path.endswith((".tar", ".idx"))} == {
        f"/data/verify-good/{n}": 1 for n in files}
    assert verify_shards(local_shards).dali_samples == 48  # locally in groups too

    monkeypatch.setattr(summary, "FETCH_AHEAD", 4)  # 6 index files: 4 ahead of the one parsed, in order
    assert format_summary(summarize(url)) == format_summary(summarize(local_shards))
    capsys.readouterr()
    assert main(["verify", url]) == 0  # with the DALI pass: its webdataset reader opens the s3:// tars itself
    assert "OK: 6 shards, 48 samples, 48 read by DALI, 0 problems" in capsys.readouterr().out
    assert main(["stats", url]) == 0
    assert "samples           48" in capsys.readouterr().out


def test_verify_names_a_truncated_tar_and_a_missing_index_in_object_storage_as_locally(s3_env, local_shards,
                                                                                     tmp_path, capsys):
    from shards.__main__ import main

    damaged = tmp_path / "damaged"
    shutil.copytree(local_shards, damaged)
    tar = damaged / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    url = "s3://data/verify-damaged"
    _upload(damaged, url)
    (damaged / "train-000003.idx").unlink()
    storage.remove(f"{url}/train-000003.idx")

    local, remote = verify_shards(damaged, dali=False), verify_shards(url, dali=False)
    assert remote.errors == local.errors and remote.samples == local.samples == 48 - 8 - 5
    assert [e.split(":", 1)[0] for e in remote.errors] == ["train-000001.tar", "train-000003.idx"]
    assert "truncated at" in remote.errors[0] and remote.errors[1].endswith("missing index file")
    capsys.readouterr()
    assert main(["verify", url, "--no-dali"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("FAILED: 6 shards, 35 samples, 2 problems")
    assert captured.err.splitlines() == [f"FAIL {e}" for e in local.errors]


# ---------------------------------------------------------------------------------------------- the loaders' reads
def _index_fetches_expected(loader, serials: list[int]) -> dict[str, int]:
    """Index GETs per index object path that a loader makes when it takes up windows ``serials`` in this order and
    keeps the local index copies of the current and the next window only: a shard's index is fetched when a window
    reads it and the window taken up before did not (a shard in windows s and s + 1 is not fetched again; one read
    again after a gap is)."""
    windows = [set(loader.readable_window(s)) for s in serials]
    expected: dict[str, int] = {}
    for k, shards in enumerate(windows):
        for i in shards - (windows[k - 1] if k else set()):
            key = "/" + str(loader.manifest.index_url(loader.manifest.shards[i])).split("://", 1)[1]
            expected[key] = expected.get(key, 0) + 1
    return expected


def test_the_dali_loader_fetches_each_index_once_per_window_build_and_one_get_per_sample(s3_env, local_shards):
    """Five passes over s3:// shards in windows of 2 shards (a DALI reader built per window, 15 windows): an index is
    one GET each time a window reads its shard after a window that did not (its local copy is dropped when the
    window that read it is retired: only the current and the next window's copies are kept, so a billion-image
    epoch does not pile up ~63 B per sample on local disk), never one per sample or step; each tar is one HEAD per
    reader build, and DALI reads a sample with one ranged GET (no read-ahead on S3)."""
    pytest.importorskip("nvidia.dali")
    from tests.pipeline.helpers import make_cfg, take

    url = "s3://data/dali-reads"
    _upload(local_shards, url)
    with s3_env.recording() as requests:
        # 30 batches of 8 pairs: 5 passes over the 48 samples, 3 windows (2 batches each) per pass
        _batches, loader = take(make_cfg(url, "dali", window_shards=2), 30)
        recorded = requests()
    assert loader.window_serial == 14 and loader.windows_per_pass == 3
    gets = _get_counts(recorded)
    idx_gets = {path: n for path, n in gets.items() if path.endswith(".idx")}
    expected = _index_fetches_expected(loader, list(range(16)))  # window 15 was prepared ahead after the 30th batch
    assert idx_gets == expected and len(idx_gets) == 6
    # Fetched again after a gap (the bound is exercised), and never more often than the windows read the shard (16).
    assert max(idx_gets.values()) > 1 and sum(idx_gets.values()) < 16 * 2
    tar_heads = sum(method == "HEAD" and path.endswith(".tar") for method, path, _ in recorded)
    assert tar_heads >= 15 * 2  # a reader build opens its shards again: the index did not come with it
    ranges = [r for method, path, r in recorded if method == "GET" and path.endswith(".tar") and r]
    jpg_sizes = {int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for r in ranges}
    assert len(ranges) >= 5 * 48 and max(jpg_sizes) < 64 << 10  # one GET of one JPEG member each, not a block


@pytest.mark.parametrize("backend", ["dali", "pytorch"])
def test_local_index_copies_stay_within_two_windows_and_a_resume_fetches_them_again(backend, s3_env, local_shards):
    """Over 4 passes of 3 windows on s3://, the loader's local index copies on disk never exceed the current and the
    next window's (2 x 2 shards) and are gone once it is closed; a resume into a window whose copies were dropped
    fetches what it reads again (each once per window taken up) and continues the same stream."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    import torch

    from distributed import DistInfo
    from pipeline import build_train_loader
    from tests.pipeline.helpers import make_cfg, take

    url = f"s3://data/copies-{backend}"
    _upload(local_shards, url)
    cfg = make_cfg(url, backend, window_shards=2, num_threads=1)
    loader = build_train_loader(cfg, DistInfo())
    copies = loader.manifest.index_copies
    try:
        batches, most, state = [], 0, None
        for step in range(26):  # 13 windows of 2 batches
            batches.append(next(loader)[0])
            on_disk = [p for p in copies.folder.iterdir() if not p.name.startswith(".")]  # not a fetch in flight
            assert len(on_disk) <= 2 * 2, (step, sorted(p.name for p in on_disk))
            most = max(most, len(on_disk))
            if step == 13:
                state = loader.state_dict()  # after 14 batches: the end of window 6
        folder = copies.folder
    finally:
        loader.close()
    assert most == 2 * 2 and not folder.exists()  # two windows' worth at times, nothing left behind

    with s3_env.recording() as requests:
        resumed, again = take(cfg, 12, state=state)
        recorded = requests()
    assert all(torch.equal(a, b[0]) for a, b in zip(batches[14:], resumed))
    fetched = {path: n for path, n in _get_counts(recorded).items() if path.endswith(".idx")}
    # Taken up: window 0 (checked as the loader is made), 6 (the resumed position), then 7 to 13 (13 prepared ahead).
    assert again.window_serial == 12 and fetched == _index_fetches_expected(again, [0, *range(6, 14)])


# ---------------------------------------------------------------------------------------------- the loaders' checks
STORE_LATENCY = 0.02  # seconds a request to the store waits on average before it is sent (a remote round trip)


def _slow_store(monkeypatch, latency: float = STORE_LATENCY) -> list[str]:
    """Make every request to the store wait first (moto on the loopback answers in ~1 ms): 0.5, 1 or 1.5 x
    ``latency`` by object, so checks run at once end in another order than they started in. Returns the list the
    URLs asked for are appended to."""
    real = storage._errors
    asked: list[str] = []

    @contextlib.contextmanager
    def slow(url):
        asked.append(str(url))
        time.sleep(latency * (0.5 + 0.5 * (zlib.crc32(str(url).encode()) % 3)))
        with real(url):
            yield

    monkeypatch.setattr(storage, "_errors", slow)
    return asked


@pytest.fixture(scope="module")
def damaged_small_shards(photo_dir, tmp_path_factory) -> Path:
    """The 48 photos in 24 shards of 2, three of them damaged: a truncated tar, an empty tar, a garbled index."""
    from tests.conftest import write_simple_shards
    from tests.faults.damage import empty_file, garble_index, truncate_inside

    out = tmp_path_factory.mktemp("small-shards")
    write_simple_shards(sorted(photo_dir.rglob("*.*")), out, per_shard=2)
    truncate_inside(out / "train-000005.tar", out / "train-000005.idx", sample=1, into=100)
    empty_file(out / "train-000011.tar")
    garble_index(out / "train-000017.idx")
    return out


def test_a_windows_shard_checks_run_in_parallel_in_object_storage(s3_env, damaged_small_shards, monkeypatch):
    """The loader's checks of a window of 24 s3:// shards, 20 ms a request: checked 16 at a time they take a
    fraction of the time one by one takes, with the same verdicts and the damaged shards found in the same order
    (the window's, not the order the checks end in); a stop cancels the checks not started."""
    import numpy as np

    from pipeline.shard_check import ShardChecks

    url = "s3://data/checks"
    _upload(damaged_small_shards, url)
    asked = _slow_store(monkeypatch)
    order = np.random.default_rng(0).permutation(24).tolist()  # a window's shards are in dealt order, not sorted

    one_by_one = ShardChecks(read_manifest(url, check_files=False))
    start = time.perf_counter()
    for i in order:
        one_by_one.check(i)
    sequential = time.perf_counter() - start

    parallel = ShardChecks(read_manifest(url, check_files=False))  # its own index copies: fetched again
    assert parallel.remote
    start = time.perf_counter()
    parallel.check_many(order)
    in_parallel = time.perf_counter() - start

    found = [i for i, _ in one_by_one.take_found()]
    assert sorted(found) == [5, 11, 17] and found == [i for i in order if i in (5, 11, 17)]
    assert [i for i, _ in parallel.take_found()] == found
    assert all(parallel.check(i) == one_by_one.check(i) for i in range(24))  # the same verdicts, all recorded
    assert [i for i, _ in parallel.damaged()] == found
    # 7 requests a shard: ~24 x 7 x 20 ms one by one; 16 at a time ~2 rounds
    assert in_parallel < sequential / 2.5, (in_parallel, sequential)
    print(f"24 shards at {STORE_LATENCY * 1e3:.0f} ms a request: one by one {sequential:.2f} s, "
          f"16 at a time {in_parallel:.2f} s ({sequential / in_parallel:.1f}x)")

    stopped = ShardChecks(read_manifest(url, check_files=False))
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    asked.clear()
    start = time.perf_counter()
    stopped.check_many(order, stop)
    took = time.perf_counter() - start
    recorded = [i for i in order if stopped.is_checked(i)]
    assert recorded == order[:len(recorded)] and len(recorded) < 24, recorded  # in order, then nothing more
    touched = {url.rsplit("/", 1)[1].split(".")[0] for url in asked}
    assert len(touched) < 24 and took < sequential / 2, (touched, took)  # the checks not started were cancelled
    stopped.check_many(order)  # the rest, checked afresh
    assert [i for i, _ in stopped.take_found()] == found


def test_local_copies_download_different_objects_at_once_and_one_object_once(s3_env, monkeypatch):
    """LocalCopies holds no lock over a download: 8 threads fetching 8 index objects at 0.2 s a request overlap
    (one at a time took 8 x 0.2 s); 8 threads asking for one object make one download and share its copy; a copy
    closed while it downloads is fetched again into a new folder, never returned from the deleted one."""
    for k in range(8):
        storage.write_bytes(f"s3://data/copies/{k}.idx", f"index {k}\n".encode())
    _slow_store(monkeypatch, latency=0.2 / 1.5)  # at most 0.2 s a request
    copies = storage.LocalCopies()
    paths: dict[int, Path] = {}

    def fetch(k: int, url: str) -> None:
        paths[k] = copies.get(url)

    start = time.perf_counter()
    threads = [threading.Thread(target=fetch, args=(k, f"s3://data/copies/{k}.idx")) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert [paths[k].read_text() for k in range(8)] == [f"index {k}\n" for k in range(8)]
    assert copies.fetches == 8 and elapsed < 8 * 0.2 / 2, elapsed

    same = storage.LocalCopies()
    threads = [threading.Thread(target=lambda k=k: paths.__setitem__(k, same.get("s3://data/copies/3.idx")))
               for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same.fetches == 1 and len({paths[k] for k in range(8)}) == 1 and paths[0].read_text() == "index 3\n"

    closing = storage.LocalCopies()
    closed_once = threading.Event()
    real_download = storage.LocalCopies._download

    def download_then_close(url: str, folder: Path) -> Path:
        out = real_download(url, folder)
        if not closed_once.is_set():
            closed_once.set()
            closing.close()  # as a loader shutting down while its check thread still fetches
        return out

    monkeypatch.setattr(storage.LocalCopies, "_download", staticmethod(download_then_close))
    copy = closing.get("s3://data/copies/5.idx")
    assert copy.read_text() == "index 5\n" and copy.parent == closing.folder and closing.fetches == 1
    copies.close(), same.close(), closing.close()
