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
pairs/s, data-wait share, step-time percentiles), ``scaling`` (multi-GPU efficiency; needs > 1 GPU), ``scale``
(billion-image data path simulated: dealing time vs world size, one rank's loader build time and RSS vs shards).
Each writes ``<out>/<suite>.json`` (schema in benchmarks/report.py), ``.png`` and ``.md`` and prints a table;
``<out>/summary.md`` collects the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import sys
import time
from pathlib import Path
from typing import Literal

import cli
from cli import ConfigError, option

ORDER = ("shards", "model", "pipeline", "e2e", "scaling", "scale")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Options of ``python -m benchmarks run``."""

    suite: str = option("all", f"all, or one or more of {','.join(ORDER)} separated by commas (e.g. model,pipeline,e2e).")
    out: str = option("results", "Output directory for JSON, PNG, Markdown (and profiles).",
                       metavar="DIR")
    quick: bool = option(False, "Tiny sizes: the whole 'all' suite in < 2 min on 2 CPU cores.")
    device: Literal["auto", "cuda", "cpu"] = option("auto", "auto: CUDA when available.")
    profile: bool = option(False, "Wrap each measured region in torch.profiler; traces in <out>/profiles (slows "
                                  "timings).")
    wandb: bool = option(False, "Also log every suite's rows to W&B (WANDB_MODE applies).")
    shards: str = option("", "Existing shard directory for the pipeline and e2e suites (empty: built from the "
                             "embedded real photos by the real builder).", metavar="DIR")
    corpus: str = option("", "Folder of real images for the shards suite and for building shards (empty: crops of "
                             "the embedded photos, ~500x375; needs scikit-image).", metavar="DIR")
    only: str = option("", "Measure only the configurations whose name matches this regular expression (model: "
                           "'compile|ours bf16\\+cl$', with their plain-step references; pipeline: 'batch=256'; "
                           "e2e: 'DALI GPU|PyTorch'; scale: the parts 'dealing', 'loader', 'manifest', 'sharder').",
                     metavar="REGEX")
    torch_threads: int = option(0, "Torch intra-op threads. 0: usable cores / local ranks, except --quick on a CPU: "
                                   "1, because on a shared 2-core machine two OpenMP threads that spin-wait for each "
                                   "other run a step 5-10x slower.")

    def __post_init__(self) -> None:
        if self.torch_threads < 0:
            raise ConfigError(f"--torch-threads must be >= 0; got {self.torch_threads}")
        try:
            re.compile(self.only)
        except re.error as exc:
            raise ConfigError(f"--only {self.only!r}: not a regular expression ({exc})") from None
        for flag, value in (("--shards", self.shards), ("--corpus", self.corpus)):
            if value and not Path(value).is_dir():
                raise ConfigError(f"{flag} {value}: not a directory")
        if not self.suites or any(x not in ORDER for x in self.suites):
            raise ConfigError(f"--suite {self.suite}: expected all or a comma-separated list of {', '.join(ORDER)}")

    @property
    def suites(self) -> tuple[str, ...]:
        return ORDER if self.suite == "all" else tuple(x.strip() for x in self.suite.split(",") if x.strip())


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Options of ``python -m benchmarks prepare``."""

    out: str = option("results", "The shards go to <out>/_data/.", metavar="DIR")
    images: int = option(0, "Corpus size (0: the full suites' 27,648, 108 batches of 256).")

    def __post_init__(self) -> None:
        if self.images < 0:
            raise ConfigError(f"--images must be >= 0; got {self.images}")


def _suite_module(name: str):
    # Imported lazily so that one suite's missing dependency (e.g. DALI) does not stop the others.
    import importlib

    modules = {"shards": "benchmarks.shards_ingest", "model": "benchmarks.model_step",
               "pipeline": "benchmarks.pipeline_throughput", "e2e": "benchmarks.end_to_end",
               "scaling": "benchmarks.scaling", "scale": "benchmarks.scale"}
    return importlib.import_module(modules[name])


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,prepare,validate}")
    cli.add_flags(sub.add_parser("run", help="run benchmark suites", description="Run benchmark suites."), RunOptions)
    prep = sub.add_parser("prepare", help="only build the benchmark corpus and shards (to carry to a machine "
                          "without scikit-image, then pass --shards there)")
    cli.add_flags(prep, PrepareOptions)
    val = sub.add_parser("validate", help="check benchmark JSON files against the schema")
    val.add_argument("files", nargs="+", metavar="FILE", help="benchmark JSON files")
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


def run(args: RunOptions, argv: list[str]) -> int:
    import torch

    import distributed
    from benchmarks.context import Context, Sizes
    from benchmarks.machine import device_label, machine_info
    from benchmarks.report import print_table, write_report

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    distributed.set_torch_threads(args.torch_threads or (1 if args.quick and device.type == "cpu" else 0))
    machine = machine_info()
    machine["torch_threads"] = torch.get_num_threads()
    sizes = Sizes.quick(machine["cpu_cores"]) if args.quick else Sizes.full(machine["cpu_cores"])
    # Absolute paths: child processes (builder, torchrun) run from the repository root, list files resolve
    # relative entries against their own folder.
    ctx = Context(out_dir=Path(args.out).resolve(), quick=args.quick, device=device, sizes=sizes,
                  profile=args.profile, machine=machine, shard_dir=Path(args.shards).resolve() if args.shards else None,
                  corpus_dir=Path(args.corpus).resolve() if args.corpus else None, only=args.only)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    label = device_label(machine)
    docs, failed = [], []
    start = time.perf_counter()
    for name in args.suites:
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
    return 1 if failed else 0


def validate(files: list[str]) -> int:
    from benchmarks.report import load_report

    status = 0
    for path in files:
        try:
            load_report(json.loads(Path(path).read_text()))
            problem = ""
        except (OSError, json.JSONDecodeError) as exc:
            problem = f"cannot read: {exc}"
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        print(f"{path}: {problem or 'ok'}")
        status |= bool(problem)
    return status


def prepare(options: PrepareOptions) -> int:
    """Build the corpus and shards the full pipeline/e2e suites use; print the shard directory."""
    import dataclasses

    import torch

    from benchmarks.context import Context, Sizes
    from benchmarks.data import bench_shards
    from benchmarks.machine import machine_info

    machine = machine_info()
    sizes = Sizes.full(machine["cpu_cores"])
    if options.images:
        sizes = dataclasses.replace(sizes, corpus_images=options.images)
    ctx = Context(out_dir=Path(options.out).resolve(), quick=False, device=torch.device("cpu"), sizes=sizes,
                  machine=machine)
    print(bench_shards(ctx))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli.guard(lambda: _dispatch(build_parser().parse_args(argv), argv))


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "validate":
        return validate(args.files)
    if args.command == "prepare":
        return prepare(cli.build(PrepareOptions, cli.flag_values(args, ["out", "images"]), prefix="--"))
    names = [f.name for f in dataclasses.fields(RunOptions)]
    return run(cli.build(RunOptions, cli.flag_values(args, names), prefix="--"), argv)


if __name__ == "__main__":
    raise SystemExit(main())
