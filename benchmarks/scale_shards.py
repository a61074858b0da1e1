"""Sharder at scale: a part's memory vs its input list, dedup bytes per image, main-process cost per image.

    python -m benchmarks run --suite scale --out results/     # through benchmarks/scale.py (measure_sharder)
    python -m benchmarks.scale_shards results/sharder [--quick] # alone: writes scale_shards.json there

Every "before" figure is the code this replaced, measured in the same run: the ``shards`` package as it was
before the streaming parts (extracted with ``git archive`` from the parent of the commit that added
``shards/digests.py``) runs in a subprocess with that copy first on ``PYTHONPATH``. Without git history the
before rows are counted skips.

* **Part memory vs input list** (one fresh subprocess per point): ``shards build --part 0/n`` for n = 1, 10, 100 on
  list files of 10k / 100k / 1M lines (quick: 10k / 100k) of paths that do not exist, for the code after and
  before. A part only seeks to its byte range, so its memory follows the part, not the list; the old build listed
  and sorted every line first (~218 B per input). Every input is still rejected by a real worker
  (``unreadable``), so stats files are written as in a real build. Peak RSS is the point process's own high-water
  mark (``VmHWM``, which starts afresh at exec), not ``getrusage``'s ``ru_maxrss``: a child starts with its
  parent's ``ru_maxrss``, which made every point of an earlier run read the parent's 972 MiB. ``part_rss_mib`` is
  that peak over the same process's peak after a one-input build (interpreter, the package and whatever a build
  imports lazily, such as the image decoders): what the part's inputs cost.
* **Dedup bytes per image** (``tracemalloc`` peak over random 16-byte digests, in a subprocess so that the hex
  sets do not grow the suite's process): the build's ``DigestSet`` fed in the build's batches (1M digests; quick
  100k) and the merge's per-slice scan over synthetic part stats files with 1% planted cross-part duplicates (1M
  digests in 4 parts; quick 100k), against a Python set of hex strings (what both used to hold). The merge row
  also checks that it finds exactly the planted duplicates. Issue 15's target: at most 20 B per image in both.
* **Main-process CPU per image** of ``build_shards`` with instant workers (``_instant_workers_build``: 64 real
  photos converted beforehand, 20k inputs, best of 2; quick 2k, once): the cap one build's main process puts on
  images/s, whatever the worker count. Inter-process transfer of the results is not in it (it is for both codes
  the same bytes: a JPEG and its metadata). Full runs also write a cProfile of the new main process.

The rows' metrics are named as the scale suite's table columns: ``peak_rss_mib``, ``part_rss_mib`` and ``build_s``
(parts), ``bytes_per_image`` and ``us_per_image`` (dedup; main-process CPU in the main-process rows).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PART_COUNTS = (1, 10, 100)  # n of the measured part 0/n, for every list length
DEDUP_TARGET_BYTES = 20.0  # issue 15: at most this many bytes per image for dedup, in the build and in the merge


def measure(out_dir: Path, quick: bool) -> dict[str, Any]:
    """Run every measurement; return ``{"rows", "notes", "skipped"}`` (the scale suite's sharder contract)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"rows": [], "notes": [], "skipped": []}
    before = _before_tree(out_dir / "before")
    if before is None:
        doc["notes"].append("no git history: the 'before' rows are skipped")
    _part_memory(doc, out_dir, before, (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000))
    dedup = _run_point("dedup", [str(out_dir), str(100_000 if quick else 1_000_000)])
    doc["rows"] += dedup["rows"]
    doc["notes"] += dedup["notes"]
    _main_process(doc, out_dir, before, 2000 if quick else 20_000, repeats=1 if quick else 2, profile=not quick)
    (out_dir / "scale_shards.json").write_text(json.dumps(doc, indent=1))
    return doc


# ----------------------------------------------------------------------------- the code before, from git


def _before_tree(dest: Path) -> Path | None:
    """``dest`` holding the shards package as it was before the streaming parts, or None without git history."""
    if (dest / "shards" / "build.py").is_file():
        return dest
    try:
        added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "shards/digests.py"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split()
        if not added:
            return None
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", f"{added[-1]}^", "shards"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return dest


def _run_point(kind: str, args: list[str], before: Path | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run ``_point_<kind>`` in a fresh interpreter (the old package first on the path when ``before``)."""
    path = [str(before)] if before else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(REPO)]), "OMP_NUM_THREADS": "1"}
    code = "import sys, benchmarks.scale_shards as b; b._point(sys.argv[1], sys.argv[2:])"
    proc = subprocess.run([sys.executable, "-c", code, kind, *args], env=env, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=timeout)  # cwd: not the repo, whose shards/ wins
    if proc.returncode:
        raise RuntimeError(f"{kind} point failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _point(kind: str, args: list[str]) -> None:
    """Subprocess side: one measurement, one JSON line on stdout."""
    from shards.build import BuildOptions, build_shards

    if kind == "part":
        list_path, out, i, n = args[0], args[1], int(args[2]), int(args[3])
        # A one-input build first, so that what any build loads lazily (image decoders, ...) is in the baseline
        # and the figure over it is what this part's inputs cost.
        warm = Path(out).with_name(Path(out).name + "-warm-up")
        warm.mkdir(parents=True, exist_ok=True)
        (warm / "one.txt").write_text("/nonexistent/warm-up.jpg\n")
        build_shards([str(warm / "one.txt")], str(warm / "out"), BuildOptions(workers=1, progress=False, part=(0, 1)))
        shutil.rmtree(warm)
        warm_rss = _peak_rss_mib()
        t0 = time.perf_counter()
        manifest = build_shards([list_path], out, BuildOptions(workers=1, progress=False, part=(i, n)))
        print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "warm_rss_mib": warm_rss, "rss_source": _RSS_SOURCE,
                          "seconds": time.perf_counter() - t0, "inputs": manifest.options["inputs"]}))
    elif kind == "dedup":
        doc: dict[str, Any] = {"rows": [], "notes": []}
        _dedup(doc, Path(args[0]), int(args[1]))
        print(json.dumps(doc))
    elif kind == "loop":
        photos_dir, list_path, out, profile = args[0], args[1], args[2], args[3]
        seconds, inputs = _instant_workers_build(photos_dir, list_path, out, profile)
        print(json.dumps({"main_cpu_s": seconds, "inputs": inputs}))
    else:
        raise ValueError(f"unknown point {kind!r}")


def _instant_workers_build(photos_dir: str, list_path: str, out: str, profile: str) -> tuple[float, int]:
    """Main-process CPU seconds of ``build_shards`` whose workers answer instantly (results converted beforehand).

    The real conversion of the corpus's photos runs first (untimed); the build then lists the list file's N lines
    (cycling those photos) and gets, per input, a precomputed result with its own digest (no duplicates), through
    the function that normally collects the pool's results. So the time is the main process alone: listing,
    dedup, writing tars, index and stats files. Works for the code before (``_converted``) and after (``_results``).
    """
    import hashlib

    import shards.build as build
    from shards.build import BuildOptions, build_shards
    from shards.sources import Source

    photos = sorted(str(p) for p in Path(photos_dir).rglob("*.jpg"))
    ids = [os.path.normpath(line) for line in Path(list_path).read_text().split()]
    digests = [hashlib.blake2b(i.to_bytes(8, "big"), digest_size=16).digest() for i in range(len(ids))]
    options = BuildOptions(samples_per_shard=1000, workers=1, progress=False)
    if hasattr(build, "_results"):  # after: workers send (index, id, digest, key, framed sample)
        build._JOB = build._Job(options.convert_options(), None, {})
        done = build._convert_batch([(k, Source(p, p)) for k, p in enumerate(photos)])
        ready = [(i, ids[i], digests[i], *done[i % len(done)][3:]) for i in range(len(ids))]

        def instant(tasks, workers, job):
            for batch in tasks:
                yield [ready[i] for i, _ in batch]

        build._results = instant
    else:  # before: workers sent (index, Converted) and the main process wrote the members with tarfile
        from dataclasses import replace

        done = build._convert_batch([(k, Source(p, p)) for k, p in enumerate(photos)], options.convert_options())
        ready = [(i, replace(done[i % len(done)][1], hash=digests[i].hex())) for i in range(len(ids))]

        def instant(sources, todo, per, options):
            yield from ready

        build._converted = instant
    t0 = time.process_time()
    if profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        manifest = prof.runcall(build_shards, [list_path], out, options)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        Path(profile).write_text(text.getvalue())
    else:
        manifest = build_shards([list_path], out, options)
    return time.process_time() - t0, manifest.options["inputs"]


def _peak_rss_mib() -> float:
    """This process's peak resident size in MiB: ``VmHWM``, the high-water mark of its own address space since exec.

    Not ``getrusage``'s ``ru_maxrss`` where /proc exists: Linux starts a child's ``ru_maxrss`` at its parent's
    (it is kept across fork and exec), so a point run from a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


_RSS_SOURCE = "VmHWM" if os.path.isfile("/proc/self/status") else "ru_maxrss (may include the parent's peak)"


# ----------------------------------------------------------------------------- part memory vs list size


def _part_memory(doc: dict[str, Any], work: Path, before: Path | None, sizes: tuple[int, ...]) -> None:
    """Rows ``part 0/n of an N-line list (after|before)``: peak RSS and build time of each part in its own process."""
    for n_lines in sizes:
        lst = work / f"paths-{n_lines}.txt"
        if not lst.is_file():
            with open(lst, "w") as fh:  # ~40 bytes a line, like real corpus paths
                for k in range(n_lines):
                    fh.write(f"/nonexistent/corpus/{k % 997:03d}/img_{k:09d}.jpg\n")
        for parts in PART_COUNTS:
            for label, tree in (("after", None), ("before", before)):
                name = f"part 0/{parts} of a {n_lines:,}-line list ({label})"
                if label == "before" and tree is None:
                    doc["skipped"].append({"name": name, "reason": "no git history for the old code"})
                    continue
                out = work / f"part-{label}-{n_lines}-{parts}"
                shutil.rmtree(out, ignore_errors=True)
                try:
                    got = _run_point("part", [str(lst), str(out), "0", str(parts)], tree)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    doc["skipped"].append({"name": name, "reason": str(exc)[:200]})
                    continue
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                params = {"list_inputs": n_lines, "parts": parts, "part_inputs": got["inputs"], "code": label,
                          "rss_source": got["rss_source"]}
                doc["rows"].append({"name": name, "params": params, "metrics": {
                    "peak_rss_mib": round(got["peak_rss_mib"], 1),
                    "part_rss_mib": round(max(got["peak_rss_mib"] - got["warm_rss_mib"], 0.1), 1),
                    "build_s": round(got["seconds"], 3)}})
    doc["notes"] += _part_memory_notes(doc["rows"])


def _part_memory_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 15's target in words: a part's memory follows the part, not the list (peak RSS over the warm-up)."""
    over = {(r["params"]["code"], r["params"]["list_inputs"], r["params"]["parts"]): r["metrics"]["part_rss_mib"]
            for r in rows if "list_inputs" in r["params"]}
    lists = sorted({n for _, n, _ in over})
    if not lists:
        return []
    small, large = lists[0], lists[-1]
    notes = []
    for code in ("after", "before"):
        same_part = [f"{n:,} lines {over[code, n, n // small]:.1f}" for n in lists if (code, n, n // small) in over]
        in_large = [f"part 0/{n} ({large // n:,} inputs) {over[code, large, n]:.1f}" for n in PART_COUNTS
                    if (code, large, n) in over]
        if same_part:
            notes.append(f"part memory ({code}), peak RSS over a one-input build's, MiB: a part of {small:,} inputs "
                         "in a list of " + ", ".join(same_part) + f"; the {large:,}-line list: " + ", ".join(in_large))
    return notes


# ----------------------------------------------------------------------------- dedup bytes per image


def _traced(fn) -> tuple[Any, int, float]:
    """(result, peak traced bytes, CPU seconds) of ``fn()``: memory traced in one call, time taken in another
    (tracemalloc slows every allocation, more so for code that allocates more)."""
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    t0 = time.process_time()
    fn()
    return result, peak, time.process_time() - t0


def _dedup(doc: dict[str, Any], work: Path, count: int) -> None:
    import numpy as np

    from shards.build import _BATCH
    from shards.digests import DIGEST_SIZE, DigestSet, decode_digests, encode_digests
    from shards.merge import _load_parts, _scan

    data = np.random.default_rng(0).integers(0, 256, count * DIGEST_SIZE, dtype=np.uint8).tobytes()
    step = _BATCH * DIGEST_SIZE

    def digest_set() -> int:
        seen = DigestSet()
        for at in range(0, len(data), step):
            seen.add_many(data[at:at + step])
        return len(seen)

    def hex_set() -> int:  # the build before: seen.add(result.hash) per image, the hash a hex string
        seen: set[str] = set()
        for at in range(0, len(data), DIGEST_SIZE):
            h = data[at:at + DIGEST_SIZE].hex()
            if h not in seen:
                seen.add(h)
        return len(seen)

    for name, fn, code in (("dedup in the build: DigestSet", digest_set, "after"),
                           ("dedup in the build: set of hex strings (before)", hex_set, "before")):
        held, peak, seconds = _traced(fn)
        assert held == count
        doc["rows"].append({"name": name, "params": {"digests": count, "batch": _BATCH, "code": code},
                            "metrics": {"bytes_per_image": round(peak / count, 2),
                                        "us_per_image": round(seconds / count * 1e6, 3)}})

    # The merge: 4 synthetic parts of 25 groups; 1% of each later part's digests copy an earlier part's.
    root = work / "merge"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    parts, groups = 4, 25
    per_group = count // (parts * groups)
    rng = random.Random(0)
    earlier: list[bytes] = []
    planted = offset = 0
    for i in range(parts):
        pool = []
        for g in range(groups):
            chunk = bytearray(data[offset:offset + per_group * DIGEST_SIZE])
            offset += per_group * DIGEST_SIZE
            if earlier:
                for k in rng.sample(range(per_group), per_group // 100):
                    chunk[k * DIGEST_SIZE:(k + 1) * DIGEST_SIZE] = rng.choice(earlier)
                    planted += 1
            pool.extend(bytes(chunk[k * DIGEST_SIZE:(k + 1) * DIGEST_SIZE]) for k in range(0, per_group, 97))
            (root / f"bench-p{i:04d}-g{g:06d}.stats.json").write_text(json.dumps({"digests": encode_digests(chunk)}))
        earlier.extend(pool)
        manifest = {"prefix": "bench", "options": {"part": f"{i}/{parts}", "groups": groups}, "classes": None}
        (root / f"manifest.part-{i:04d}-of-{parts:04d}.json").write_text(json.dumps(manifest))
    total = parts * groups * per_group
    loaded = _load_parts([str(root)])
    for slices in (1, 4):  # one process per slice: the figure is the largest slice's peak
        found, peak, seconds, held = 0, 0, 0.0, 0
        for k in range(slices):
            (n_held, dups), p, sec = _traced(lambda k=k, slices=slices: _scan(loaded, (k, slices)))
            found += sum(map(len, dups.values()))
            peak, seconds, held = max(peak, p), seconds + sec, max(held, n_held)
        assert found == planted, (found, planted)
        doc["rows"].append({"name": f"dedup in merge-manifests: {slices} hash slice(s), one per process",
                            "params": {"digests": total, "slices": slices, "planted_duplicates": planted,
                                       "code": "after"},
                            "metrics": {"bytes_per_image": round(peak / total, 2),
                                        "bytes_per_digest_held": round(peak / held, 2),
                                        "us_per_image": round(seconds / total * 1e6, 3)}})

    def old_merge() -> int:  # the merge before: one set of every part's hex hashes
        seen: set[str] = set()
        dups = 0
        for i in range(parts):
            for g in range(groups):
                raw = json.loads((root / f"bench-p{i:04d}-g{g:06d}.stats.json").read_text())["digests"]
                chunk = decode_digests(raw)
                hexes = [chunk[k:k + DIGEST_SIZE].hex() for k in range(0, len(chunk), DIGEST_SIZE)]
                dups += sum(h in seen for h in hexes)
                seen.update(hexes)
        return dups

    found, peak, seconds = _traced(old_merge)
    assert found == planted
    doc["rows"].append({"name": "dedup in merge-manifests: set of hex strings (before)",
                        "params": {"digests": total, "slices": 1, "planted_duplicates": planted, "code": "before"},
                        "metrics": {"bytes_per_image": round(peak / total, 2),
                                    "us_per_image": round(seconds / total * 1e6, 3)}})
    shutil.rmtree(root, ignore_errors=True)
    per_image = {r["name"]: r["metrics"]["bytes_per_image"] for r in doc["rows"] if r["params"].get("code") == "after"}
    worst = max(v for k, v in per_image.items() if k.startswith("dedup"))
    doc["notes"].append(f"dedup of {count:,} digests, issue 15's target of <= {DEDUP_TARGET_BYTES:.0f} B/image "
                        f"{'met' if worst <= DEDUP_TARGET_BYTES else 'MISSED'}: "
                        + ", ".join(f"{k.removeprefix('dedup in ')} {v:.1f}" for k, v in per_image.items())
                        + " (a slice's process holds only its slice's digests: its B/image is per image of the whole)")


# ----------------------------------------------------------------------------- main-process cost per image


def _main_process(doc: dict[str, Any], work: Path, before: Path | None, inputs: int, repeats: int,
                  profile: bool) -> None:
    photos = work / "photos"
    if not (work / "photos.done").is_file():
        try:
            from shards.sample_corpus import write_sample_corpus
        except ImportError as exc:
            doc["skipped"].append({"name": "build main process", "reason": f"no sample photos: {exc}"})
            return
        shutil.rmtree(photos, ignore_errors=True)
        write_sample_corpus(photos, num_images=64, seed=1, short_side=(300, 420), formats=False)
        (work / "photos.done").write_text("")
    names = sorted(str(p) for p in photos.rglob("*.jpg"))
    lst = work / f"photos-{inputs}.txt"
    lst.write_text("".join(f"{names[i % len(names)]}\n" for i in range(inputs)))
    results: dict[str, list[float]] = {"after": [], "before": []}
    for _repeat in range(repeats):  # interleaved, so both see the same machine load
        for label, tree in (("after", None), ("before", before)):
            if label == "before" and tree is None:
                continue
            out = Path(tempfile.mkdtemp(dir=work))
            try:
                got = _run_point("loop", [str(photos), str(lst), str(out), ""], tree)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            results[label].append(got["main_cpu_s"] / got["inputs"])
    for label, per_image in results.items():
        name = f"build main process, {inputs:,} inputs, instant workers ({label})"
        if not per_image:
            doc["skipped"].append({"name": name, "reason": "no git history for the old code"})
            continue
        best = min(per_image)
        doc["rows"].append({"name": name, "params": {"images": inputs, "code": label},
                            "metrics": {"us_per_image": round(best * 1e6, 2),  # main-process CPU
                                        "main_images_per_s": round(1 / best, 1)}})
    if results["after"] and results["before"]:
        doc["notes"].append(f"main process: {min(results['before']) / min(results['after']):.1f}x less CPU per image "
                            f"than before (best of {repeats} interleaved runs each, instant workers)")
    if profile:
        out = Path(tempfile.mkdtemp(dir=work))
        try:
            _run_point("loop", [str(photos), str(lst), str(out), str(work / "main_profile.txt")])
            doc["notes"].append(f"cProfile of the new main process: {work / 'main_profile.txt'}")
        finally:
            shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------- the curve


def plot_part_memory(points: list[tuple[dict[str, Any], dict[str, Any]]], path: Path) -> Path | None:
    """Draw the part rows' ``part_rss_mib`` (``points``: their ``(params, metrics)``) into ``path``; None without
    matplotlib or part rows. The peak over a one-input build, not the whole peak: the two codes import different
    image decoders (tens of MiB), which would hide what the inputs cost.

    Left: against the list's length, one line per code and part count n of ``part 0/n`` (after: flat when n grows
    with the list, so the part keeps its size). Right: against the inputs in the part, one line per list length
    (after: the lines coincide when the memory follows the part alone).
    """
    parts = [(p, m) for p, m in points if "list_inputs" in p and m.get("part_rss_mib") is not None]
    try:
        import matplotlib
    except ImportError:
        return None
    if not parts:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_list, by_part) = plt.subplots(1, 2, figsize=(11, 4.2))
    for code in ("after", "before"):
        style = "o-" if code == "after" else "s--"
        for n in sorted({p["parts"] for p, _ in parts if p["code"] == code}):
            pts = sorted((p["list_inputs"], m["part_rss_mib"]) for p, m in parts
                         if p["code"] == code and p["parts"] == n)
            by_list.plot(*zip(*pts), style, label=f"{code}: part 0/{n}")
        for lines in sorted({p["list_inputs"] for p, _ in parts if p["code"] == code}):
            pts = sorted((p["part_inputs"], m["part_rss_mib"]) for p, m in parts
                         if p["code"] == code and p["list_inputs"] == lines)
            by_part.plot(*zip(*pts), style, label=f"{code}: {lines:,}-line list")
    ylabel = "peak RSS over a one-input build, MiB"
    by_list.set(xscale="log", xlabel="lines in the input list", ylabel=ylabel,
                title="shards build --part 0/n: memory vs list length")
    by_part.set(xscale="log", xlabel="inputs in the part", ylabel=ylabel, title="... vs inputs in the part")
    for ax in (by_list, by_part):
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="work and output directory (scale_shards.json)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~1-2 min on 2 cores)")
    args = parser.parse_args(argv)
    doc = measure(Path(args.out), args.quick)
    plot_part_memory([(r["params"], r["metrics"]) for r in doc["rows"]], Path(args.out) / "scale_shards.png")
    for row in doc["rows"]:
        print(f"{row['name']:<62} {json.dumps(row['metrics'])}")
    for item in doc["skipped"]:
        print(f"skipped {item['name']}: {item['reason']}")
    for note in doc["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
