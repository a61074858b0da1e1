"""Scale suite: what a billion-image corpus on a cluster costs the data path, simulated on one machine.

    python -m benchmarks run --suite scale --out results/            # full: 10k / 100k / 1M shards, W 8 to 4,096
    python -m benchmarks run --suite scale --quick --out results/q   # < 2 min on 2 CPU cores
    python -m benchmarks run --suite scale --only loader --out results/  # one part: dealing, loader or sharder
    python -m benchmarks run --suite scale --only manifest --out results/  # the manifest read curve alone

Four curves (``scale.json``; ``scale_dealing.png``, ``scale_loader.png`` and, when measured, ``scale_shards.png``):

* **Dealing time vs world size** (``pipeline.assignment.ShardPlan``) on fabricated manifests (sample counts only:
  dealing reads no tar) of 10k, 100k and 1M shards of 10,000 samples (the last one short), W from 8 to 4,096:
  the plan built once per run (``plan_s``) plus one rank's share of a pass (``pass_s``), against the old
  pure-Python greedy (``_python_assign``, the code this replaced, O(shards x ranks)) measured in the same run
  wherever shards x ranks stays within a budget; larger cases are counted skips, never extrapolated.
* **One rank's loader build time and peak RSS vs shards per rank** (1k, 10k, 100k shards of 100 real JPEGs:
  10M samples at 100k), with real DALI CPU pipelines over one small real shard hard-linked once per manifest
  entry (its index file too), one subprocess per point (benchmarks/scale_worker.py), windowed
  (``data.window_shards``) against one reader over the rank's whole share (the structure before windows).
  ``build_s`` runs from constructing the loader (manifest, the first window's shard checks, dealing:
  ``construct_s``) to its first batch (``first_batch_s``: the first window's reader built and run); peak RSS
  includes the next window's reader prepared ahead. Two ways: the manifest holds exactly the rank's share
  (1k / 10k / 100k shards, so the manifest grows with it: group ``loader``), and one 100k-shard manifest dealt to
  W = 100 / 10 / 1 ranks (the share alone grows: group ``loader_fixed``). The issue's bar, build time and peak RSS
  within +-20% across the shares, is checked on both as max / min <= 1.2 (``extra``, notes, under the table; build
  time on the best of ``loader_repeats`` processes, since the machine is shared: see :func:`flat_check`). Each row
  shows the median (min-max) of those processes, and the build's CPU time.
* **Manifest read time vs manifest size** (10k, 100k, 1M entries, fabricated: no files): ``read_manifest``
  without the file check, in a process that imported torch and DALI as training does; the O(manifest) part of
  every rank's start-up (it deals from the whole list), and the bytes per entry the read keeps (every rank holds
  the whole manifest) and needs at its peak (the parsed JSON), by tracemalloc. The loader rows add
  ``manifest_s``: the read with the check that every file exists (one directory listing).
* **Sharder part memory vs input count**, when ``benchmarks/scale_shards.py`` exists. Its contract:
  ``measure(out_dir: Path, quick: bool) -> dict`` returning ``{"rows": [{"name": str, "params": {...}, "metrics":
  {"peak_rss_mib": float, ...}}, ...], "notes": [str, ...], "skipped": [{"name", "reason"}]}`` (``notes`` and
  ``skipped`` optional); its rows join this suite's in group ``sharder``, its ``plot_part_memory`` draws them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.context import Context
from benchmarks.report import Column, SuiteResult
from benchmarks.timing import Stats
from pipeline.assignment import ShardPlan, derive_seed

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [
    Column("deal_s", "dealing s/rank", "{:,.4f}"),
    Column("pass_s", "per pass s", "{:,.4f}"),
    Column("build_s", "build s", "{:,.2f}"),
    Column("build_cpu_s", "build CPU s", "{:,.2f}"),
    Column("first_batch_s", "first window s", "{:,.2f}"),
    Column("peak_rss_mib", "peak RSS MiB", "{:,.0f}"),
    Column("loader_rss_mib", "RSS over imports MiB", "{:,.0f}"),
    Column("construct_s", "construct s", "{:,.2f}"),
    Column("manifest_s", "manifest read s", "{:,.2f}"),
    Column("manifest_parse_s", "manifest parse s", "{:,.3f}"),
    Column("bytes_per_entry", "manifest B/entry", "{:,.0f}"),
    Column("part_rss_mib", "part RSS over warm-up MiB", "{:,.1f}"),  # sharder rows (benchmarks/scale_shards.py)
    Column("bytes_per_image", "dedup B/image", "{:,.1f}"),
    Column("us_per_image", "CPU µs/image", "{:,.2f}"),
]
SAMPLES_PER_SHARD = 10_000  # the billion-image corpus: 100k shards of 10k images
TINY_SAMPLES = 100  # samples in the real shard linked for the loader curve: 100k links = 10M samples
LOCAL_BATCH = 256


def _python_assign(sizes: tuple[int, ...], world_size: int, seed: int, pass_index: int) -> list[list[int]]:
    """The dealing this suite measures against: ``ShardPlan.assign`` before it was vectorised (pure Python LPT,
    the least-loaded bin found by a scan over every rank for every shard)."""
    rng = random.Random(derive_seed("assign", seed, pass_index))
    tiebreak = list(range(len(sizes)))
    rng.shuffle(tiebreak)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], tiebreak[i]))
    bins: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in order:
        b = min(range(world_size), key=lambda r: (loads[r], r))
        bins[b].append(i)
        loads[b] += sizes[i]
    to_rank = list(range(world_size))
    rng.shuffle(to_rank)
    per_rank: list[list[int]] = [[] for _ in range(world_size)]
    for b, r in enumerate(to_rank):
        shards = bins[b]
        rng.shuffle(shards)
        per_rank[r] = shards
    return per_rank


def _timed(fn: Callable[[], object], repeats: int) -> Stats:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Stats.of(times)


def _fabricated_sizes(shards: int) -> np.ndarray:
    sizes = np.full(shards, SAMPLES_PER_SHARD, dtype=np.int64)
    sizes[-1] = 3_217  # the builder's last shard is short
    return sizes


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k" if n >= 1000 else str(n)


# ----------------------------------------------------------------------------- dealing


def measure_dealing(result: SuiteResult, shard_counts: tuple[int, ...], worlds: tuple[int, ...], old_budget: int,
                    repeats: int) -> None:
    """Rows ``deal <N> shards W=<W>`` (numpy plan) and, within ``old_budget`` shards x ranks, the old dealing."""
    for n in shard_counts:
        sizes = _fabricated_sizes(n)
        for world in worlds:
            rank = world // 3  # any rank: each computes the same plan and takes its own share
            deal = _timed(lambda s=sizes, w=world, r=rank: ShardPlan(s, w, seed=0).rank_pass(1, r, LOCAL_BATCH, 256),
                          repeats)
            plan = ShardPlan(sizes, world, seed=0)
            per_pass = _timed(lambda p=plan, r=rank: p.rank_pass(2, r, LOCAL_BATCH, 256), repeats)
            name = f"deal {_label(n)} shards W={world}"
            result.add(name, "dealing", {"shards": n, "world_size": world, "samples_per_shard": SAMPLES_PER_SHARD},
                       deal_s=deal, pass_s=per_pass)
            if n * world > old_budget:
                result.skip(f"{name} (old pure Python)", f"{n:,} shards x {world:,} ranks exceeds the baseline's budget "
                            f"of {old_budget:,} (O(shards x ranks): ~0.13 us each); not extrapolated")
                continue
            as_tuple = tuple(sizes.tolist())
            old = _timed(lambda s=as_tuple, w=world: _python_assign(s, w, 0, 1),
                         1 if n * world > old_budget // 10 else repeats)
            result.add(f"{name} (old pure Python)", "baseline", {"shards": n, "world_size": world}, deal_s=old)
            result.compare(f"dealing {_label(n)} shards W={world}: old / numpy", name, f"{name} (old pure Python)",
                           "deal_s", lower_is_better=True)


# ----------------------------------------------------------------------------- loader build


def tiny_shard(work: Path) -> tuple[Path, Path, dict]:
    """One small real shard (``TINY_SAMPLES`` crops of the embedded photos, 48-64 px) with its index file."""
    from PIL import Image  # noqa: F401 - the writer's JPEGs come from PIL

    from shards.sample_corpus import random_crop, sample_photos
    from shards.writer import ShardWriter

    out = work / "scale" / "tiny"
    tar, idx, meta = out / "tiny.tar", out / "tiny.idx", out / "tiny.json"
    if tar.is_file() and idx.is_file() and meta.is_file():
        return tar, idx, json.loads(meta.read_text())
    out.mkdir(parents=True, exist_ok=True)
    import io

    rng = random.Random(0)
    photos = list(sample_photos().values())
    writer = ShardWriter(out, "tiny")
    for i in range(TINY_SAMPLES):
        buf = io.BytesIO()
        random_crop(photos[i % len(photos)], rng, rng.randint(48, 64)).convert("RGB").save(buf, "JPEG", quality=85)
        writer.write(f"{i:09d}", {"jpg": buf.getvalue(), "json": b"{}"})
    entry = writer.close()
    info = {"samples": entry.samples, "bytes": entry.bytes, "max_sample_bytes": entry.max_sample_bytes}
    meta.write_text(json.dumps(info))
    return tar, idx, info


def linked_shards(work: Path, shards: int) -> Path:
    """A shard directory whose manifest lists ``shards`` shards, each a hard link to the one tiny shard."""
    from shards.manifest import Manifest, ShardEntry, write_manifest

    tar, idx, info = tiny_shard(work)
    out = work / "scale" / f"shards-{shards}"
    if (out / "manifest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(shards):
        name = f"train-{i:07d}"
        for src, ext in ((tar, "tar"), (idx, "idx")):
            dst = out / f"{name}.{ext}"
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:  # a file system without hard links
                    os.symlink(src, dst)
        entries.append(ShardEntry(tar=f"{name}.tar", index=f"{name}.idx", samples=info["samples"],
                                  bytes=info["bytes"], max_sample_bytes=info["max_sample_bytes"]))
    write_manifest(Manifest(shards=entries, root=out), out)
    return out


def fabricated_manifest(work: Path, entries: int) -> Path:
    """A shard directory holding only a manifest of ``entries`` shards (their files do not exist): parse timing."""
    out = work / "scale" / f"manifest-{entries}"
    if (out / "manifest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    shards = [{"tar": f"train-{i:07d}.tar", "index": f"train-{i:07d}.idx", "samples": SAMPLES_PER_SHARD,
               "bytes": 1_100_000_000, "max_sample_bytes": 300_000, "stats": ""} for i in range(entries)]
    doc = {"version": 1, "prefix": "train", "total_samples": entries * SAMPLES_PER_SHARD,
           "total_bytes": entries * 1_100_000_000, "pattern": f"train-{{0000000..{entries - 1:07d}}}.tar",
           "shards": shards, "options": {}, "classes": None}
    from shards.manifest import write_json_atomic

    write_json_atomic(out / "manifest.json", doc)  # as write_manifest writes it (indent 1)
    return out


def run_worker(shard_dir: Path, window_shards: int, out: Path, timeout: float, *extra: str) -> dict:
    """One loader point in a fresh process; its JSON (``ok`` False with the error when the loader failed)."""
    cmd = [sys.executable, "-m", "benchmarks.scale_worker", "--shards-dir", str(shard_dir),
           "--window-shards", str(window_shards), "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out.unlink(missing_ok=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    if not out.is_file():
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"ok": False, "error": f"worker died: {tail}"}
    return json.loads(out.read_text())


_POINT_METRICS = ("build_s", "build_cpu_s", "construct_s", "first_batch_s", "peak_rss_mib", "import_rss_mib",
                  "state_dict_s", "manifest_s", "manifest_parse_s")


def _add_point(result: SuiteResult, name: str, group: str, params: dict, points: list[dict]) -> bool:
    """One row from repeated worker runs (median, min-max of each metric); a skip when any run failed."""
    failed = [p for p in points if not p["ok"]]
    if failed:
        result.skip(name, f"failed: {failed[0]['error']}")
        return False
    first = points[0]
    metrics = {m: Stats.of([p[m] for p in points]) for m in _POINT_METRICS if m in first}
    metrics["loader_rss_mib"] = Stats.of([max(p["peak_rss_mib"] - p["import_rss_mib"], 1e-3) for p in points])
    result.add(name, group, {**params, "shards_per_rank": first["rank_shards"], "samples_per_rank": first["samples"],
                             "manifest_shards": first["shards"], "world_size": first["world_size"],
                             "windows_per_pass": first["windows_per_pass"],
                             "batches_per_pass": first["batches_per_pass"], "reader_shards": first["window_shards"]},
               **metrics)
    return True


def flat_check(result: SuiteResult, group: str, key: str, what: str) -> None:
    """The issue's +-20% bar over the rows of ``group``: max / min across the shares of build time and peak RSS.

    Build time is judged on the best of the repeated processes (the run least disturbed by the other processes of
    a shared machine, as ``timeit`` advises); the ratios of the medians and of the CPU time are reported beside it.
    Adds ``<key>_<metric>_max_over_min`` (and ``..._median_max_over_min``) and ``<key>_<metric>_within_20pct`` to
    ``extra``, a note, and a line of Markdown under the table.
    """
    rows = sorted((r for r in result.rows if r.group == group), key=lambda r: r.params["shards_per_rank"])
    if len(rows) < 2:
        return
    shares = " / ".join(_label(r.params["shards_per_rank"]) for r in rows)

    def ratio(metric: str, best: bool) -> float | None:
        values = [r.metrics.get(metric) for r in rows]
        if any(v is None for v in values):
            return None
        values = [v.min if best and isinstance(v, Stats) else r.value(metric) for r, v in zip(rows, values)]
        return max(values) / min(values)

    build, rss = ratio("build_s", best=True), ratio("peak_rss_mib", best=False)
    figures = {"build_s": build, "build_s_median": ratio("build_s", best=False),
               "build_cpu_s": ratio("build_cpu_s", best=False), "first_batch_s": ratio("first_batch_s", best=True),
               "peak_rss_mib": rss}
    for name, value in figures.items():
        if value is not None:
            result.extra[f"{key}_{name}_max_over_min"] = value
    if build is None or rss is None:  # a point without its build time or RSS: no verdict, said so
        result.notes.append(f"{what}: +-20% bar not judged (a point lacks its build time or peak RSS)")
        return
    result.extra[f"{key}_build_s_within_20pct"] = build <= 1.2
    result.extra[f"{key}_peak_rss_mib_within_20pct"] = rss <= 1.2
    verdict = " and ".join(f"{name} {value:.2f}x ({'within' if value <= 1.2 else 'NOT within'} +-20%)"
                           for name, value in (("build time", build), ("peak RSS", rss)))
    others = ", ".join(f"{name} {value:.2f}x" for name, value in (
        ("build time of the medians", figures["build_s_median"]), ("build CPU time", figures["build_cpu_s"]),
        ("first window", figures["first_batch_s"])) if value is not None)
    line = f"{what}, {shares} shards/rank: max/min of {verdict}; also {others}"
    result.notes.append(line)
    result.markdown_extra = (result.markdown_extra + "\n" if result.markdown_extra else "") + f"- +-20% bar: {line}"


def measure_loader(result: SuiteResult, work: Path, shard_counts: tuple[int, ...], window: int,
                   single_reader_counts: tuple[int, ...], timeout: float, single_timeout: float, repeats: int,
                   fixed_worlds: tuple[int, ...]) -> None:
    """Rows ``loader <N> shards/rank`` (windows of ``window`` shards; the manifest is the share), ``... single
    reader`` (the old structure, given ``single_timeout`` seconds: one reader over 100k shards fails only after
    minutes of indexing) and ``loader <M>-shard manifest W=<W>`` (the largest manifest dealt to ``fixed_worlds``
    ranks)."""
    for n in shard_counts:
        shard_dir = linked_shards(work, n)
        for single in (False, True):
            if single and n not in single_reader_counts:
                continue
            name = f"loader {_label(n)} shards/rank " + ("single reader" if single else f"window={window}")
            out = work / "scale" / f"point-{n}-{int(single)}.json"
            points = [run_worker(shard_dir, n if single else window, out, single_timeout if single else timeout)
                      for _ in range(1 if single else repeats)]
            if not _add_point(result, name, "baseline" if single else "loader",
                              {"window_shards": n if single else window}, points):
                continue
            if single:
                ours = f"loader {_label(n)} shards/rank window={window}"
                result.compare(f"peak RSS {_label(n)} shards/rank: single reader / windowed", ours, name,
                               "peak_rss_mib", lower_is_better=True)
                result.compare(f"build {_label(n)} shards/rank: single reader / windowed", ours, name, "build_s",
                               lower_is_better=True)
    total = max(shard_counts)
    for world in fixed_worlds:
        name = f"loader {_label(total)}-shard manifest W={world} ({_label(total // world)} shards/rank) window={window}"
        out = work / "scale" / f"point-{total}-w{world}.json"
        points = [run_worker(linked_shards(work, total), window, out, timeout, "--world-size", str(world))
                  for _ in range(repeats)]
        _add_point(result, name, "loader_fixed", {"window_shards": window}, points)
    flat_check(result, "loader", "windowed", "manifest = the rank's share (it grows with the share)")
    flat_check(result, "loader_fixed", "fixed_manifest", f"one {_label(total)}-shard manifest dealt to "
               f"W = {' / '.join(map(str, fixed_worlds))} ranks (the share alone grows)")


def measure_manifest_read(result: SuiteResult, work: Path, manifest_sizes: tuple[int, ...], timeout: float,
                          repeats: int) -> None:
    """Rows ``manifest read <N> entries``: read time, and bytes per entry kept and at the peak."""
    for entries in manifest_sizes:
        name = f"manifest read {_label(entries)} entries"
        out = work / "scale" / f"manifest-{entries}.json"
        point = run_worker(fabricated_manifest(work, entries), 1, out, timeout, "--manifest-only",
                           "--repeats", str(max(repeats, 3)))
        if not point["ok"]:
            result.skip(name, f"failed: {point['error']}")
            continue
        result.add(name, "manifest", {"entries": entries}, manifest_parse_s=point["manifest_parse_s"],
                   us_per_entry=point["manifest_parse_s"] / entries * 1e6,
                   bytes_per_entry=point["manifest_bytes_per_entry"],
                   peak_bytes_per_entry=point["manifest_peak_bytes_per_entry"])
    parse = sorted((r.params["entries"], r.value("manifest_parse_s"), r.value("bytes_per_entry"),
                    r.value("peak_bytes_per_entry")) for r in result.rows if r.group == "manifest")
    if parse:
        line = "manifest read (parse, no file check, after import torch and DALI; memory kept per entry, and the " \
            "peak while the JSON is parsed, by tracemalloc): " + ", ".join(
                f"{_label(n)} entries {t:.3f} s ({t / n * 1e6:.2f} us/entry, {kept:.0f} B/entry kept, "
                f"{peak:.0f} B/entry peak)" for n, t, kept, peak in parse)
        result.notes.append(line)
        result.markdown_extra = (result.markdown_extra + "\n" if result.markdown_extra else "") + f"- {line}"


# ----------------------------------------------------------------------------- sharder (benchmarks/scale_shards.py)


def measure_sharder(result: SuiteResult, work: Path, quick: bool) -> None:
    if importlib.util.find_spec("benchmarks.scale_shards") is None:
        result.skip("sharder part memory vs inputs", "benchmarks/scale_shards.py is not in this checkout")
        return
    doc = importlib.import_module("benchmarks.scale_shards").measure(work / "scale" / "sharder", quick)
    for row in doc.get("rows", []):
        result.add(row["name"], "sharder", row.get("params", {}), **row["metrics"])
    result.notes += list(doc.get("notes", []))
    for item in doc.get("skipped", []):
        result.skip(item["name"], item["reason"])


# ----------------------------------------------------------------------------- curves


def plot_curves(result: SuiteResult, out_dir: Path) -> list[Path]:
    """``scale_dealing.png``, ``scale_loader.png`` and (with sharder rows) ``scale_shards.png``."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    dealing = [r for r in result.rows if r.group in ("dealing", "baseline") and "shards" in r.params]
    if dealing:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n in sorted({r.params["shards"] for r in dealing}):
            for old in (False, True):
                pts = sorted((r.params["world_size"], r.value("deal_s")) for r in dealing
                             if r.params["shards"] == n and (r.group == "baseline") == old)
                if pts:
                    ax.plot(*zip(*pts), "s--" if old else "o-",
                            label=f"{_label(n)} shards, " + ("old pure Python" if old else "numpy (plan + one pass)"))
        ax.set(xscale="log", yscale="log", xlabel="world size W (ranks)", ylabel="seconds per rank",
               title="Shard dealing per rank vs world size")
        ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "scale_dealing.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    loader = [r for r in result.rows if r.group in ("loader", "loader_fixed", "baseline") and "shards_per_rank" in
              r.params]
    if loader:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        window = next(r.params["window_shards"] for r in loader if r.group == "loader" or r.group == "loader_fixed")
        curves = (("loader", "o-", f"windows of {window}, manifest = share"),
                  ("loader_fixed", "^-", f"windows of {window}, fixed manifest"),
                  ("baseline", "s--", "single reader (before)"))
        for color, (group, style, label) in enumerate(curves):
            pts = sorted((r.params["shards_per_rank"], r.value("build_s"), r.value("first_batch_s"),
                          r.value("peak_rss_mib")) for r in loader if r.group == group)
            if not pts:
                continue
            xs, build, first, rss = zip(*pts)
            axes[0].plot(xs, build, style, color=f"C{color}", label=label + ": constructor + first batch")
            axes[0].plot(xs, first, style[0] + ":", color=f"C{color}", label=label + ": first batch (reader build)")
            axes[1].plot(xs, rss, style, color=f"C{color}", label=label)
        manifest = sorted((r.params["entries"], r.value("manifest_parse_s")) for r in result.rows
                          if r.group == "manifest")
        if manifest:
            axes[2].plot(*zip(*manifest), "o-", label="read_manifest (parse, no file check)")
        files = sorted((r.params["manifest_shards"], r.value("manifest_s")) for r in loader
                       if r.group == "loader" and r.value("manifest_s") is not None)
        if files:
            axes[2].plot(*zip(*files), "s:", label="... and check every file exists (real shard folder)")
        axes[0].set(xscale="log", xlabel="shards per rank (100 samples each)", ylabel="seconds",
                    title="Loader build time")
        axes[1].set(xscale="log", xlabel="shards per rank (100 samples each)", ylabel="peak RSS MiB",
                    title="Loader peak RSS (next window prepared)")
        axes[2].set(xscale="log", yscale="log", xlabel="manifest entries", ylabel="seconds",
                    title="Manifest read time")
        for ax in axes:
            ax.legend(fontsize=7)
        axes[0].set_ylim(bottom=0)
        axes[1].set_ylim(bottom=0)
        fig.tight_layout()
        written.append(out_dir / "scale_loader.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    sharder = [(r.params, r.metrics) for r in result.rows if r.group == "sharder"]
    if sharder:  # the rows came from benchmarks/scale_shards.py, which knows their shape
        from benchmarks.scale_shards import plot_part_memory

        if plot_part_memory(sharder, out_dir / "scale_shards.png"):
            written.append(out_dir / "scale_shards.png")
    return written


def run(ctx: Context) -> SuiteResult:
    if ctx.quick:
        shard_counts, worlds, old_budget, repeats = (10_000, 100_000), (8, 64, 512), 1_000_000, 3
        loader_counts, window, single, timeout, single_timeout = (1_000, 10_000), 64, (1_000,), 120.0, 120.0
        loader_repeats, fixed_worlds, manifest_sizes = 1, (10, 1), (10_000, 100_000)
    else:
        shard_counts, worlds, old_budget, repeats = (10_000, 100_000, 1_000_000), (8, 32, 128, 512, 1024, 4096), \
            60_000_000, 3
        loader_counts, window, single = (1_000, 10_000, 100_000), 256, (1_000, 10_000, 100_000)
        timeout, single_timeout = 420.0, 150.0
        loader_repeats, fixed_worlds, manifest_sizes = 5, (100, 10, 1), (10_000, 100_000, 1_000_000)
    config = {"samples_per_shard": SAMPLES_PER_SHARD, "local_batch": LOCAL_BATCH, "dealing_shards": shard_counts,
              "world_sizes": worlds, "old_dealing_budget": old_budget, "loader_shards_per_rank": loader_counts,
              "loader_window_shards": window, "loader_samples_per_shard": TINY_SAMPLES,
              "loader_timeout_s": timeout, "single_reader_timeout_s": single_timeout, "loader_repeats": loader_repeats,
              "loader_fixed_manifest_worlds": fixed_worlds, "manifest_read_entries": manifest_sizes,
              "loader": "DALI CPU, 1 thread, batch 32, 32 px, one rank"}
    result = SuiteResult("scale", config=config, columns=COLUMNS, plot_metric="build_s")
    # Subprocess points first: a forked child starts with this process's RSS high-water mark (Linux copies it at
    # fork and keeps it across exec), and the old dealing of 1M shards grows this process past 1 GB.
    if ctx.selects("sharder"):
        measure_sharder(result, ctx.work_dir, ctx.quick)
    if not (ctx.selects("loader") or ctx.selects("manifest")):
        pass
    elif importlib.util.find_spec("nvidia.dali") is None:
        result.skip("loader build vs shards per rank", "nvidia-dali is not installed")
    else:
        if ctx.selects("loader"):
            measure_loader(result, ctx.work_dir, loader_counts, window, single, timeout, single_timeout,
                           loader_repeats, fixed_worlds)
        measure_manifest_read(result, ctx.work_dir, manifest_sizes, timeout, loader_repeats)
    if ctx.selects("dealing"):
        measure_dealing(result, shard_counts, worlds, old_budget, repeats)
    written = plot_curves(result, ctx.out_dir)
    result.notes.append("curves: " + (", ".join(p.name for p in written) if written else "none (no matplotlib)"))
    return result
