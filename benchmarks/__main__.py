"""Images-per-second benchmarks of the real modules, each against a baseline measured in the same run.

Run (from the repository root)::

    python -m benchmarks run --suite all --out results/            # full suites (meant for a GPU machine)
    python -m benchmarks run --suite all --quick --out results/q   # < 2 min on a 2-core CPU (smoke / CI)
    python -m benchmarks run --suite model --profile --out results/prof   # + torch.profiler traces
    python -m benchmarks validate results/*.json                   # check JSON files against the schema
    python -m benchmarks prepare --out gpu_data --images 512       # only build shards (carry to a GPU, --shards)

Suites: ``shards`` (ingest images/s per core vs a naive PIL loop), ``model`` (MoCo step pairs/s, peak memory
and MFU vs the original-structure baseline, bytes per shuffle-BN strategy), ``pipeline`` (loader pairs/s of
DALI GPU / DALI CPU / PyTorch on the same shards), ``e2e`` (the real training step fed by the real loader:
pairs/s, data-wait share, step-time percentiles), ``scaling`` (multi-GPU efficiency; needs > 1 GPU).
Each writes ``<out>/<suite>.json`` (schema in benchmarks/report.py), ``.png`` and ``.md`` and prints a table;
``<out>/summary.md`` collects the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

from benchmarks.context import Context, Sizes
from benchmarks.machine import device_label, machine_info
from benchmarks.report import print_table, validate_report, write_report

ORDER = ("shards", "model", "pipeline", "e2e", "scaling")


def _suite_module(name: str):
    # Imported lazily so that one suite's missing dependency (e.g. DALI) does not stop the others.
    import importlib

    modules = {"shards": "benchmarks.shards_ingest", "model": "benchmarks.model_step",
               "pipeline": "benchmarks.pipeline_throughput", "e2e": "benchmarks.end_to_end",
               "scaling": "benchmarks.scaling"}
    return importlib.import_module(modules[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run benchmark suites")
    run.add_argument("--suite", default="all",
                     help=f"all, or one or more of {','.join(ORDER)} separated by commas (e.g. model,pipeline,e2e)")
    run.add_argument("--out", default="results", help="output directory for JSON, PNG, Markdown (and profiles)")
    run.add_argument("--quick", action="store_true", help="tiny sizes: the whole 'all' suite in < 2 min on 2 CPU cores")
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    run.add_argument("--profile", action="store_true",
                     help="wrap each measured region in torch.profiler; traces in <out>/profiles (slows timings)")
    run.add_argument("--wandb", action="store_true", help="also log every suite's rows to W&B (WANDB_MODE applies)")
    run.add_argument("--shards", default="", help="existing shard directory for the pipeline and e2e suites "
                     "(default: built from the embedded real photos by the real builder)")
    run.add_argument("--corpus", default="", help="folder of real images for the shards suite and for building "
                     "shards (default: crops of the embedded photos, ~500x375; needs scikit-image)")
    run.add_argument("--only", default="", help="measure only the configurations whose name matches this regular "
                     "expression (model: 'compile|ours bf16\\+cl$', with their plain-step references; pipeline: "
                     "'batch=256'; e2e: 'DALI GPU|PyTorch')")
    run.add_argument("--torch-threads", type=int, default=0,
                     help="torch intra-op threads (0: torch's default; --quick on a CPU: 1, because on a shared "
                          "2-core machine two OpenMP threads that spin-wait for each other run a step 5-10x slower)")
    prep = sub.add_parser("prepare", help="only build the benchmark corpus and shards (to carry to a machine "
                          "without scikit-image, then pass --shards there)")
    prep.add_argument("--out", default="results", help="the shards go to <out>/_data/")
    prep.add_argument("--images", type=int, default=0, help="corpus size (default: the full suites' 2048)")
    val = sub.add_parser("validate", help="check benchmark JSON files against the schema")
    val.add_argument("files", nargs="+")
    return parser


def _log_wandb(docs: list[dict], quick: bool, out_dir: Path) -> None:
    try:
        import wandb
    except ImportError:
        print("warning: --wandb given but wandb is not installed; skipped W&B logging", file=sys.stderr)
        return
    run = wandb.init(project="moco-benchmarks", job_type="benchmark-quick" if quick else "benchmark", dir=str(out_dir),
                     config={"machine": docs[0]["machine"] if docs else {}, "quick": quick})
    for doc in docs:
        rows = doc["rows"]
        keys = sorted({k for r in rows for k in r["metrics"]})
        table = wandb.Table(columns=["name", *keys])
        for r in rows:
            cells = [r["metrics"].get(k) for k in keys]
            table.add_data(r["name"], *[c["median"] if isinstance(c, dict) else c for c in cells])
        run.log({f"{doc['suite']}/table": table})
        for comp in doc["comparisons"]:
            run.summary[f"{doc['suite']}/{comp['name']}"] = comp["ratio"]
    run.finish()


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.torch_threads < 0:
        print("error: --torch-threads must be >= 0", file=sys.stderr)
        return 2
    if args.torch_threads or (args.quick and device.type == "cpu"):
        torch.set_num_threads(args.torch_threads or 1)
    machine = machine_info()
    machine["torch_threads"] = torch.get_num_threads()
    sizes = Sizes.quick(machine["cpu_cores"]) if args.quick else Sizes.full(machine["cpu_cores"])
    try:
        re.compile(args.only)
    except re.error as exc:
        print(f"error: --only {args.only!r}: not a regular expression ({exc})", file=sys.stderr)
        return 2
    for flag, value in (("--shards", args.shards), ("--corpus", args.corpus)):
        if value and not Path(value).is_dir():
            print(f"error: {flag} {value}: not a directory", file=sys.stderr)
            return 2
    # Absolute paths: child processes (builder, torchrun) run from the repository root, list files resolve
    # relative entries against their own folder.
    ctx = Context(out_dir=Path(args.out).resolve(), quick=args.quick, device=device, sizes=sizes,
                  profile=args.profile, machine=machine, shard_dir=Path(args.shards).resolve() if args.shards else None,
                  corpus_dir=Path(args.corpus).resolve() if args.corpus else None, only=args.only)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    suites = ORDER if args.suite == "all" else tuple(x.strip() for x in args.suite.split(",") if x.strip())
    unknown = [x for x in suites if x not in ORDER]
    if unknown or not suites:
        print(f"error: --suite {args.suite}: expected all or a comma-separated list of {', '.join(ORDER)}",
              file=sys.stderr)
        return 2
    date = datetime.date.today().isoformat()
    label = device_label(machine)
    docs, failed = [], []
    start = time.perf_counter()
    for name in suites:
        t0 = time.perf_counter()
        print(f"== suite {name} ({'quick' if args.quick else 'full'}) on {label}", flush=True)
        try:
            result = _suite_module(name).run(ctx)
        except Exception as exc:  # one broken suite must not hide the others' numbers
            print(f"error: suite {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        result.wall_s = time.perf_counter() - t0
        if args.profile:
            result.notes.append("--profile was on: timings include profiler overhead")
        title = f"{name} — {label} — {date}{' — --quick' if args.quick else ''}"
        doc = write_report(result, ctx.out_dir, machine, argv, args.quick, title)
        print_table(result, title)
        docs.append(doc)
    summary = [f"Benchmarks on {label}, {date} (`python -m benchmarks {' '.join(argv)}`,"
               f" {time.perf_counter() - start:.0f} s)\n"]
    for doc in docs:
        result_md = (ctx.out_dir / f"{doc['suite']}.md").read_text()
        summary.append(f"### {doc['suite']}\n\n{result_md}")
    (ctx.out_dir / "summary.md").write_text("\n".join(summary))
    print(f"wrote {len(docs)} suite report(s) to {ctx.out_dir} in {time.perf_counter() - start:.1f} s", flush=True)
    if args.wandb and docs:
        _log_wandb(docs, args.quick, ctx.out_dir)
    bad = [d["suite"] for d in docs if any(n.startswith("SCHEMA PROBLEMS") for n in d["notes"])]
    if bad:
        print(f"error: schema problems in {', '.join(bad)} (see notes in their JSON)", file=sys.stderr)
    return 1 if failed or bad else 0


def validate(files: list[str]) -> int:
    status = 0
    for path in files:
        try:
            problems = validate_report(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            problems = [f"cannot read: {exc}"]
        print(f"{path}: {'ok' if not problems else '; '.join(problems)}")
        status |= bool(problems)
    return status


def prepare(out: str, images: int) -> int:
    """Build the corpus and shards the full pipeline/e2e suites use; print the shard directory."""
    import dataclasses

    from benchmarks.data import bench_shards

    machine = machine_info()
    sizes = Sizes.full(machine["cpu_cores"])
    if images < 0:
        print("error: --images must be >= 0", file=sys.stderr)
        return 2
    if images:
        sizes = dataclasses.replace(sizes, corpus_images=images)
    ctx = Context(out_dir=Path(out).resolve(), quick=False, device=torch.device("cpu"), sizes=sizes, machine=machine)
    print(bench_shards(ctx))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return validate(args.files)
    if args.command == "prepare":
        return prepare(args.out, args.images)
    return run(args, argv)



if __name__ == "__main__":
    raise SystemExit(main())
