"""Command line of the shard tools.

    python -m shards build INPUT... --out DIR [--prefix train] [--samples-per-shard 10000] [--max-shard-bytes B]
                           [--short-side 256] [--workers N] [--part i/n] [--labels-from-folders]
                           [--path-column COLUMN]
    python -m shards verify DIR [--no-dali]
    python -m shards stats DIR
    python -m shards merge-manifests PART_DIRS... --out DIR [--hash-prefix k/m]

On a cluster, run ``build ... --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` in every array task (all
parts may share one --out directory), then ``merge-manifests`` once. Mistakes (missing input, unwritable output,
bad option) are a one-line ``error:`` and exit code 2; ``verify`` exits 1 when it finds a problem.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace

import cli
from shards.build import BuildError, BuildOptions, build_shards
from shards.manifest import ManifestError
from shards.sources import InputError
from shards.storage import StorageError


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m shards", description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,verify,stats,merge-manifests}")

    build = sub.add_parser("build", help="images -> validated, deduplicated WebDataset shards + manifest",
                           description="Images -> validated, deduplicated WebDataset shards + manifest.json.")
    build.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="directory, .txt list or .csv/.tsv/.parquet table of paths, or .tar")
    build.add_argument("--out", required=True, help="output directory (created)")
    build.add_argument("--part", default=None, metavar="I/N",
                       help="build part i of n (0-based), e.g. 3/64; join with merge-manifests (default: the whole run)")
    cli.add_flags(build, BuildOptions, skip=("part",))

    verify = sub.add_parser("verify", help="every shard opens, index matches, every image decodes (Pillow and DALI)")
    verify.add_argument("dir", help="shard directory or manifest.json")
    verify.add_argument("--dali", action=argparse.BooleanOptionalAction, default=True,
                        help="also read every sample with DALI (default: True)")

    stats = sub.add_parser("stats", help="totals, rejections by reason, JPEG size histogram")
    stats.add_argument("dir", help="shard directory or manifest.json")

    merge = sub.add_parser("merge-manifests", help="join the manifests of --part runs (removes cross-part duplicates)")
    merge.add_argument("parts", nargs="+", metavar="PART", help="part output directories or part manifest files")
    merge.add_argument("--out", required=True, help="directory for the joined manifest.json")
    merge.add_argument("--hash-prefix", default=None, metavar="K/M",
                       help="only find the duplicates of hash slice k of m (holds 1/m of the digests) into "
                            "--out/duplicates-*.json; run all m, then once without it (default: one process, all)")
    return parser


def parse_fraction(text: str, flag: str, letters: str, example: str) -> tuple[int, int]:
    """``"3/64"`` -> (3, 64) for ``--part`` and ``--hash-prefix``; a one-line ConfigError otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise cli.ConfigError(f"{flag} must look like {letters} (e.g. {example}), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        i_name, n_name = letters.split("/")
        raise cli.ConfigError(f"{flag} must be {letters} with 0 <= {i_name} < {n_name}, got {text!r}")
    return i, n


def main(argv: list[str] | None = None) -> int:
    errors = (BuildError, InputError, ManifestError, StorageError)  # StorageError: a bad URL, bucket or credentials
    return cli.guard(lambda: _run(build_parser().parse_args(argv)), user_errors=errors)


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        options = cli.build(BuildOptions, cli.flag_values(args, [f.name for f in fields(BuildOptions)
                                                               if f.name != "part"]), prefix="--")
        if args.part:
            options = replace(options, part=parse_fraction(args.part, "--part", "i/n", "3/64"))
        build_shards(args.inputs, args.out, options)
    elif args.command == "verify":
        from shards.verify import verify_shards

        report = verify_shards(args.dir, dali=args.dali)
        for line in report.errors:
            print(f"FAIL {line}", file=sys.stderr)
        dali = f", {report.dali_samples} read by DALI" if args.dali else ""
        print(f"{'OK' if report.ok else 'FAILED'}: {report.shards} shards, {report.samples} samples{dali}, "
              f"{len(report.errors)} problems")
        return 0 if report.ok else 1
    elif args.command == "stats":
        from shards.summary import format_summary, summarize

        print(format_summary(summarize(args.dir)))
    else:
        from shards.merge import find_duplicates, merge_manifests

        if args.hash_prefix:
            found = find_duplicates(args.parts, args.out, parse_fraction(args.hash_prefix, "--hash-prefix", "k/m", "3/16"))
            print(f"slice {args.hash_prefix}: {found['digests']} digests, "
                  f"{sum(map(len, found['duplicates'].values()))} cross-part duplicates -> {args.out}")
            return 0
        manifest = merge_manifests(args.parts, args.out)
        print(f"merged {len(manifest.shards)} shards, {manifest.total_samples} samples -> {args.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
