"""Tables of paths as build inputs: CSV / TSV / parquet rows carry their other columns into each sample's .json,
``--part`` splits a table (CSV by bytes, parquet by rows) into disjoint parts that cover every row once, and a
missing column or an http(s) URL is a one-line error (exit 2) before any work."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from shards import storage, tables
from shards.__main__ import main
from shards.build import BuildOptions, build_shards
from shards.manifest import read_manifest
from shards.merge import merge_manifests
from shards.sources import InputError, iter_sources
from shards.verify import verify_shards
from tests.shards.test_build import _read_bytes

OPTIONS = BuildOptions(samples_per_shard=16, workers=1, progress=False)


def _photos(photo_dir: Path) -> list[Path]:
    return sorted(p for p in photo_dir.rglob("*") if p.is_file())


def _columns(photos: list[Path], folder: Path) -> dict[str, list]:
    """Per photo: its path relative to ``folder``, a caption with a comma and a quote, an id, a label, a score."""
    return {"caption": [f'photo "{p.stem}", number {i}' for i, p in enumerate(photos)],
            "path": [os.path.relpath(p, folder) for p in photos],
            "id": list(range(len(photos))),
            "label": [p.parent.name for p in photos],
            "score": [float("nan") if i % 5 == 0 else i / 10 for i in range(len(photos))]}


def _write_csv(path: Path, cols: dict[str, list], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(cols)
        writer.writerows(zip(*cols.values()))
    return path


def _samples(out: Path) -> list[dict]:
    """Every sample of the built set, read through the manifest's brace pattern with webdataset."""
    manifest = read_manifest(out)
    pattern = manifest.to_json()["pattern"]
    return list(wds.WebDataset(str(out / pattern), shardshuffle=False, empty_check=False))


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet"])
def test_a_table_carries_its_other_columns_into_each_sample(kind, photo_dir, tmp_path):
    photos = _photos(photo_dir)
    cols = _columns(photos, tmp_path)
    if kind == "parquet":
        table = tmp_path / "photos.parquet"
        pq.write_table(pa.table(cols), table, row_group_size=10)
    else:
        table = _write_csv(tmp_path / f"photos.{kind}", cols, "\t" if kind == "tsv" else ",")
    manifest = build_shards([str(table)], tmp_path / "out", OPTIONS)
    assert manifest.total_samples == len(photos) == 48
    samples = _samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(48)]
    for i, sample in enumerate(samples):
        meta = json.loads(sample["json"])
        assert meta["source"] == os.path.normpath(tmp_path / cols["path"][i]) and "path" not in meta
        assert meta["caption"] == cols["caption"][i] and meta["label"] == cols["label"][i]
        if kind == "parquet":  # typed values; NaN becomes null
            assert meta["id"] == i and meta["score"] == (None if i % 5 == 0 else i / 10)
        else:  # CSV values are the strings as written
            assert meta["id"] == str(i) and meta["score"] == str(cols["score"][i])
        assert meta["key"] == sample["__key__"] and {k for k in sample if not k.startswith("__")} == {"jpg", "json"}
    assert verify_shards(tmp_path / "out", dali=False).ok


def test_parquet_values_become_json(tmp_path, photo_dir):
    """Lists, structs, timestamps, decimals, bytes and nulls of a parquet row come out as JSON values."""
    import datetime
    import decimal

    photo = str(_photos(photo_dir)[0])
    when = datetime.datetime(2024, 5, 6, 7, 8, 9)
    table = pa.table({"url": [photo], "tags": [["a", "b"]], "box": [{"x": 1, "y": float("inf")}],
                      "taken": pa.array([when], pa.timestamp("s")), "price": [decimal.Decimal("1.25")],
                      "blob": [b"\xff\x00"], "note": pa.array([None], pa.string())})
    pq.write_table(table, tmp_path / "t.parquet")
    build_shards([str(tmp_path / "t.parquet")], tmp_path / "out", OPTIONS)
    meta = json.loads(_samples(tmp_path / "out")[0]["json"])
    assert {k: meta[k] for k in ("tags", "box", "taken", "price", "blob", "note")} == {
        "tags": ["a", "b"], "box": {"x": 1, "y": None}, "taken": "2024-05-06T07:08:09", "price": "1.25",
        "blob": "/wA=", "note": None}
    assert meta["source"] == photo


def _row_ids(table: Path, part: tuple[int, int] | None) -> list[str]:
    return [s.columns["id"] for s in iter_sources([str(table)], part)]


@pytest.mark.parametrize("num_parts", [2, 3, 7])
def test_parts_of_a_table_are_disjoint_and_cover_every_row_once(num_parts, tmp_path):
    names = [f"img/{i:05d}.jpg" for i in range(2000)]
    cols = {"path": names, "id": [str(i) for i in range(2000)]}
    csv_table = _write_csv(tmp_path / "t.csv", cols)
    one_group = tmp_path / "one.parquet"
    pq.write_table(pa.table(cols), one_group)  # a single row group: parts still balanced (split by rows)
    many_groups = tmp_path / "many.parquet"
    pq.write_table(pa.table(cols), many_groups, row_group_size=150)
    for table in (csv_table, one_group, many_groups):
        parts = [_row_ids(table, (i, num_parts)) for i in range(num_parts)]
        assert [x for p in parts for x in p] == cols["id"]  # in order, each row exactly once
        assert all(abs(len(p) - 2000 / num_parts) < 40 for p in parts)
        assert _row_ids(table, None) == cols["id"]


def test_parquet_is_read_one_row_group_at_a_time(tmp_path):
    """Arrow memory while streaming stays near one row group, not the table (pyarrow pre-buffers what it is given)."""
    rows = 60_000
    table = pa.table({"path": [f"d/{i:06d}.jpg" for i in range(rows)],
                      "caption": [f"a photo of thing {i} " * 5 for i in range(rows)]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2_000)
    size, baseline = table.nbytes, pa.total_allocated_bytes() - table.nbytes
    del table
    peak = count = 0
    for count, _row in enumerate(tables.iter_rows(str(tmp_path / "t.parquet"), "path"), 1):
        if count % 1000 == 0:
            peak = max(peak, pa.total_allocated_bytes() - baseline)
    assert count == rows and 0 < peak < size / 5


@pytest.mark.parametrize("content, count, expected", [
    (b"a\nb\nc", 2, [b"a\n", b"b\n"]), (b"a\nb\nc", 5, [b"a\n", b"b\n", b"c"]), (b"", 1, []),
    (b"x" * 70_000 + b"\ny\n", 1, [b"x" * 70_000 + b"\n"]),  # longer than one request
])
def test_first_lines(content, count, expected, tmp_path):
    (tmp_path / "f.txt").write_bytes(content)
    assert tables.first_lines(str(tmp_path / "f.txt"), count) == expected


def test_csv_parts_read_only_their_byte_range(tmp_path):
    table = _write_csv(tmp_path / "big.csv", {"path": [f"d/{i:06d}.jpg" for i in range(20_000)],
                                              "caption": [f"caption {i}" for i in range(20_000)]})
    seen = []
    for i in range(4):
        before = _read_bytes()
        rows = [r.path for r in tables.iter_rows(str(table), "path", (i, 4))]
        assert _read_bytes() - before < table.stat().st_size / 4 + 64 * 1024
        assert abs(len(rows) - 5000) < 250  # balanced by bytes: the later rows are a few bytes longer
        seen += rows
    assert seen == [f"d/{i:06d}.jpg" for i in range(20_000)]


def test_a_quoted_newline_is_read_whole_and_refused_in_parts(tmp_path):
    cols = {"path": [f"{i}.jpg" for i in range(40)], "caption": [f"line one\nline two {i}" if i == 25 else f"c{i}"
                                                                 for i in range(40)]}
    table = _write_csv(tmp_path / "t.csv", cols)
    whole = list(tables.iter_rows(str(table), "path"))
    assert [r.columns["caption"] for r in whole] == cols["caption"]
    with pytest.raises(InputError, match="a row spans 2 lines"):
        for i in range(3):
            list(iter_sources([str(table)], (i, 3)))


def test_bad_rows_are_counted_rejections(photo_dir, tmp_path):
    """A row with the wrong number of fields or an empty path is rejected as unreadable, with its place."""
    photo = str(_photos(photo_dir)[0])
    (tmp_path / "t.csv").write_text(f"path,caption\n{photo},ok\n,no path\n{photo},too,many\n\n")
    sources = list(iter_sources([str(tmp_path / "t.csv")]))
    assert [s.error for s in sources] == ["", "unreadable: column path holds '', not a path",
                                          "unreadable: row has 3 fields, the header 2"]
    second_row_at = len("path,caption\n") + len(f"{photo},ok\n")
    assert sources[1].id == f"{tmp_path / 't.csv'}@{second_row_at}"


def test_the_path_column_is_chosen_by_name(photo_dir, tmp_path):
    photo = str(_photos(photo_dir)[0])
    (tmp_path / "t.csv").write_text(f"\ufeffurl,file\nhttp-not-used,{photo}\n")  # a spreadsheet's BOM
    assert tables.path_column(str(tmp_path / "t.csv")) == "url"
    (source,) = iter_sources([str(tmp_path / "t.csv")], path_column="file")
    assert source.path == photo and source.columns == {"url": "http-not-used"}


@pytest.mark.parametrize("content, args, message", [
    ("caption,file\na,b.jpg\n", [], "error: table {t} has no column named path or url (columns: caption, file); "
                                    "name the column of image paths with --path-column"),
    ("path,caption\na.jpg,b\n", ["--path-column", "image"], "error: table {t} has no column 'image' "
                                                             "(columns: path, caption)"),
    ("path\nhttps://example.com/a.jpg\n", [], "error: https://example.com/a.jpg (in {t}): http(s) URLs are not "
                                              "downloaded by this build; fetch them with img2dataset"),
])
def test_table_mistakes_are_one_line_errors(content, args, message, tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text(content)
    code = main(["build", str(table), "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(message.format(t=table)) and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_http_urls_are_refused_wherever_they_appear(photo_dir, tmp_path, capsys):
    """A direct input, a list's first line, a parquet cell up front; a later listed URL stops the build with
    the same line (never "file not found"), keeping the complete groups made before it was met."""
    photos = [str(p) for p in _photos(photo_dir)] * 2  # 96: the second 48 are duplicates
    pq.write_table(pa.table({"url": ["http://example.com/x.jpg"]}), tmp_path / "t.parquet")
    (tmp_path / "first.txt").write_text("# urls\nHTTPS://example.com/y.jpg\n")
    (tmp_path / "later.txt").write_text("\n".join([*photos[:64], "https://example.com/z.jpg", *photos[64:]]))
    for item, url in [("https://example.com/list.txt", "https://example.com/list.txt"),
                      (tmp_path / "t.parquet", "http://example.com/x.jpg"),
                      (tmp_path / "first.txt", "HTTPS://example.com/y.jpg"),
                      (tmp_path / "later.txt", "https://example.com/z.jpg")]:
        out = tmp_path / f"o-{Path(str(item)).stem}"
        code = main(["build", str(item), "--out", str(out), "--workers", "1", "--no-progress",
                     "--samples-per-shard", "8"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith(f"error: {url}") and "img2dataset" in err[-1], err
    assert 0 < len(list((tmp_path / "o-later").glob("*.stats.json"))) <= 64 // 8  # resumable, as after a kill


def test_the_first_path_of_a_parquet_table_skips_empty_row_groups(tmp_path):
    # A streaming writer that flushes before its first row leaves row group 0 empty; the check before a build
    # used to ask that group for its first row and crash with a bare StopIteration.
    table = pa.table({"url": ["http://example.com/x.jpg", "b.jpg"], "caption": ["a", "b"]})
    with pq.ParquetWriter(tmp_path / "t.parquet", table.schema) as writer:
        writer.write_table(table.slice(0, 0))
        writer.write_table(table)
    assert pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0).num_rows == 0
    assert tables.first_path(str(tmp_path / "t.parquet"), "url") == "http://example.com/x.jpg"
    with pytest.raises(InputError, match="http.s. URLs are not downloaded"):
        list(iter_sources([str(tmp_path / "t.parquet")]))


def test_parts_of_a_table_build_and_merge_into_every_row_once(photo_dir, tmp_path):
    photos = _photos(photo_dir)
    table = tmp_path / "photos.parquet"
    pq.write_table(pa.table(_columns(photos, tmp_path)), table, row_group_size=7)
    out = tmp_path / "out"
    for i in range(3):
        build_shards([str(table)], out, BuildOptions(samples_per_shard=8, workers=1, progress=False, part=(i, 3)))
    merged = merge_manifests([str(out)], out)
    ids = [json.loads(s["json"])["id"] for s in _samples(out)]
    assert sorted(ids) == list(range(48)) and merged.total_samples == 48


def test_a_table_build_resumes_to_the_same_files(photo_dir, tmp_path):
    photos = _photos(photo_dir)
    table = _write_csv(tmp_path / "photos.csv", _columns(photos, tmp_path))
    out = tmp_path / "out"
    options = BuildOptions(samples_per_shard=8, workers=1, progress=False)
    build_shards([str(table)], out, options)
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    for stats in sorted(out.glob("*.stats.json"))[-2:]:
        stats.unlink()  # the last two groups never finished
    build_shards([str(table)], out, options)
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()} == before


def test_a_table_in_object_storage(s3_env, photo_dir, tmp_path):
    """A parquet table of paths relative to its folder and a CSV of s3:// URLs, both in the bucket."""
    photos = _photos(photo_dir)[:6]
    keys = [f"photos/{p.relative_to(photo_dir).as_posix()}" for p in photos]
    for p, key in zip(photos, keys):
        storage.put_file(p, f"s3://data/{key}")
    pq.write_table(pa.table({"path": keys, "caption": [f"c{i}" for i in range(6)]}), tmp_path / "t.parquet")
    storage.put_file(tmp_path / "t.parquet", "s3://data/t.parquet")
    _write_csv(tmp_path / "t.csv", {"url": [f"s3://data/{k}" for k in keys[:3]], "caption": ["a", "b", "c"]})
    storage.put_file(tmp_path / "t.csv", "s3://data/tables/t.csv")
    manifest = build_shards(["s3://data/tables/t.csv", "s3://data/t.parquet"], tmp_path / "out", OPTIONS)
    assert manifest.options["inputs"] == 9 and manifest.total_samples == 6  # the parquet's first 3: duplicates
    metas = [json.loads(s["json"]) for s in _samples(tmp_path / "out")]
    assert [(m["source"], m["caption"]) for m in metas] == [
        *[(f"s3://data/{k}", c) for k, c in zip(keys[:3], "abc")],
        *[(f"s3://data/{k}", f"c{i}") for i, k in enumerate(keys) if i >= 3]]


def test_parts_of_remote_lists_and_tables_cover_every_row_once(s3_env, tmp_path):
    """The buffered line reader over a remote file: seek to a part's byte range, then whole lines."""
    names = [f"s3://data/img/{i:05d}.jpg" for i in range(3000)]
    storage.write_bytes("s3://data/parts/l.txt", ("\n".join(names) + "\n").encode())
    _write_csv(tmp_path / "t.csv", {"path": names, "caption": [f"c,{i}" for i in range(3000)]})
    storage.put_file(tmp_path / "t.csv", "s3://data/parts/t.csv")
    for url in ("s3://data/parts/l.txt", "s3://data/parts/t.csv"):
        parts = [[s.id for s in iter_sources([url], (i, 3))] for i in range(3)]
        assert [x for p in parts for x in p] == names and all(parts)
