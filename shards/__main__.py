"""Command line of the shard tools.

    python -m shards build INPUT... --out DIR [--prefix train] [--samples-per-shard 1000] [--max-shard-bytes B]
                           [--short-side 256] [--workers N] [--part i/n] [--labels-from-folders]
    python -m shards verify DIR [--no-dali]
    python -m shards stats DIR
    python -m shards merge-manifests PART_DIRS... --out DIR

On a cluster, run ``build ... --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` in every array task (all
parts may share one --out directory), then ``merge-manifests`` once. Mistakes (missing input, unwritable output,
bad option) are a one-line ``error:`` and exit code 2; ``verify`` exits 1 when it finds a problem.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from shards.build import BuildError, BuildOptions, build_shards, parse_part
from shards.manifest import ManifestError
from shards.sources import InputError

_HELP = {
    "prefix": "Shard name prefix: <prefix>-000000.tar ...",
    "samples_per_shard": "Inputs per shard (a shard holds this many minus rejections). 1000 ~ 25 MB at 256 px.",
    "max_shard_bytes": "Byte target per tar; a fuller group continues in a -1 shard. 1 GiB.",
    "short_side": "Shorter side after resize (never upscaled); 256 serves 224 crops. 0 keeps the original size.",
    "min_side": "Reject images whose shorter side is below this (thumbnails). 32.",
    "max_pixels": "Reject images above this many pixels (decompression bombs). 100 MP.",
    "max_aspect": "Reject images whose long/short side ratio exceeds this (banners). 4.",
    "quality": "JPEG quality of the re-encoded samples. 90 (visually lossless).",
    "workers": "Decode processes; 0 = all cores. The output does not depend on it.",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards", description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="images -> validated, deduplicated WebDataset shards + manifest")
    build.add_argument("inputs", nargs="+", metavar="INPUT", help="directory, .txt list of paths, or .tar")
    build.add_argument("--out", required=True, help="output directory (created)")
    defaults = BuildOptions()
    for f in fields(BuildOptions):
        if f.name in _HELP:
            build.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                               default=getattr(defaults, f.name), help=_HELP[f.name])
    build.add_argument("--part", default=None, help="build part i of n (0-based), e.g. 3/64; join with merge-manifests")
    build.add_argument("--labels-from-folders", action="store_true",
                       help="write <key>.cls from the first-level class folder under each input directory")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    verify = sub.add_parser("verify", help="every shard opens, index matches, every image decodes (Pillow and DALI)")
    verify.add_argument("dir", help="shard directory or manifest.json")
    verify.add_argument("--no-dali", action="store_true", help="skip the DALI read pass")

    stats = sub.add_parser("stats", help="totals, rejections by reason, JPEG size histogram")
    stats.add_argument("dir", help="shard directory or manifest.json")

    merge = sub.add_parser("merge-manifests", help="join the manifests of --part runs (removes cross-part duplicates)")
    merge.add_argument("parts", nargs="+", metavar="PART", help="part output directories or part manifest files")
    merge.add_argument("--out", required=True, help="directory for the joined manifest.json")

    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            kwargs = {f.name: getattr(args, f.name) for f in fields(BuildOptions) if f.name in _HELP}
            options = BuildOptions(**kwargs, part=parse_part(args.part) if args.part else None,
                                   labels_from_folders=args.labels_from_folders, progress=not args.no_progress)
            build_shards(args.inputs, args.out, options)
        elif args.command == "verify":
            from shards.verify import verify_shards

            report = verify_shards(args.dir, dali=not args.no_dali)
            for line in report.errors:
                print(f"FAIL {line}", file=sys.stderr)
            dali = f", {report.dali_samples} read by DALI" if not args.no_dali else ""
            print(f"{'OK' if report.ok else 'FAILED'}: {report.shards} shards, {report.samples} samples{dali}, "
                  f"{len(report.errors)} problems")
            return 0 if report.ok else 1
        elif args.command == "stats":
            from shards.summary import format_summary, summarize

            print(format_summary(summarize(args.dir)))
        else:
            from shards.merge import merge_manifests

            manifest = merge_manifests(args.parts, args.out)
            print(f"merged {len(manifest.shards)} shards, {manifest.total_samples} samples -> {args.out}/manifest.json")
    except (BuildError, InputError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
