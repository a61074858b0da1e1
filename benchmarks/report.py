"""The result of one suite, its JSON form (documented schema and a validator), table, Markdown and PNG plot.

JSON schema (``schema: "moco-dali-bench/1"``), one file per suite, ``<out>/<suite>.json``::

    {
      "schema": "moco-dali-bench/1",
      "suite": "model",                        # pipeline | model | e2e | shards | scaling
      "created_utc": "2026-01-01T12:00:00Z",
      "quick": false,
      "argv": ["run", "--suite", "model", ...],
      "wall_s": 123.4,                         # the suite's own run time
      "machine": {...},                        # benchmarks.machine.machine_info()
      "config": {...},                         # the suite's settings (sizes, repeats, ...)
      "rows": [                                # one measured configuration each
        {"name": "ours bf16 cl split K=65536", "group": "precision",
         "params": {"precision": "bf16", ...},
         "metrics": {"pairs_per_s": {"median": 5312.0, "min": 5290.1, "max": 5330.7, "n": 5},
                     "peak_mem_mib": 30120.5,  # a plain number: measured once
                     "mfu": null}}             # null: not measurable here (e.g. MFU on a CPU)
      ],
      "comparisons": [                         # ours vs the baseline measured in the same run
        {"name": "step pairs/s vs original structure", "metric": "pairs_per_s",
         "ours": "<row name>", "baseline": "<row name>", "ratio": 1.8}   # ours / baseline
      ],
      "extra": {...},                          # suite-specific tables (bytes per shuffle-BN strategy, ...)
      "skipped": [{"name": "...", "reason": "..."}],   # every configuration not measured, with why
      "notes": ["..."]
    }

Every number in ``metrics``, ``comparisons`` and ``extra`` is finite and > 0, except: names ending in ``_share``
are fractions in [0, 1] (a loader that never makes the step wait has a data-wait share of exactly 0), and names
ending in ``_signed`` are differences (step time minus a reference, which noise can make negative: finite only).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.timing import Stats

SCHEMA = "moco-dali-bench/1"
SUITES = ("shards", "model", "pipeline", "e2e", "scaling")
TOP_KEYS = {"schema": str, "suite": str, "created_utc": str, "quick": bool, "argv": list, "wall_s": (int, float),
            "machine": dict, "config": dict, "rows": list, "comparisons": list, "extra": dict, "skipped": list,
            "notes": list}

Metric = Stats | float | int | None


@dataclass
class Row:
    """One measured configuration."""

    name: str
    group: str
    params: dict[str, Any]
    metrics: dict[str, Metric]

    def value(self, metric: str) -> float | None:
        """The headline number of ``metric``: the median for Stats, the value itself otherwise."""
        m = self.metrics.get(metric)
        return m.median if isinstance(m, Stats) else (None if m is None else float(m))


@dataclass
class Column:
    """A table column: a metric key, its header and the format of its numbers."""

    metric: str
    header: str
    fmt: str = "{:,.1f}"


@dataclass
class SuiteResult:
    """Everything one suite measured; suites fill it, :func:`write_report` serialises it."""

    suite: str
    config: dict[str, Any]
    columns: list[Column]
    plot_metric: str
    rows: list[Row] = field(default_factory=list)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    markdown_extra: str = ""  # suite-specific Markdown appended under the table (from figures in ``extra``)

    def add(self, name: str, group: str, params: dict[str, Any], **metrics: Metric) -> Row:
        row = Row(name, group, dict(params), dict(metrics))
        self.rows.append(row)
        return row

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def compare(self, name: str, ours: str, baseline: str, metric: str, lower_is_better: bool = False) -> float | None:
        """Record ours/baseline on ``metric`` (inverted when lower is better, so > 1 always means ours wins)."""
        a, b = self.row(ours).value(metric), self.row(baseline).value(metric)
        if not a or not b:
            return None
        ratio = b / a if lower_is_better else a / b
        self.comparisons.append({"name": name, "metric": metric, "ours": ours, "baseline": baseline, "ratio": ratio})
        return ratio

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stats):
        return value.to_json()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def report_json(result: SuiteResult, machine: dict[str, Any], argv: list[str], quick: bool) -> dict[str, Any]:
    """The JSON document (see the module docstring) for ``result``."""
    return {
        "schema": SCHEMA,
        "suite": result.suite,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": quick,
        "argv": list(argv),
        "wall_s": result.wall_s,
        "machine": machine,
        "config": _jsonable(result.config),
        "rows": [{"name": r.name, "group": r.group, "params": _jsonable(r.params), "metrics": _jsonable(r.metrics)}
                 for r in result.rows],
        "comparisons": _jsonable(result.comparisons),
        "extra": _jsonable(result.extra),
        "skipped": list(result.skipped),
        "notes": list(result.notes),
    }


# ----------------------------------------------------------------------------- validation


def _numbers(value: Any, path: str):
    """Yield (path, number) for every int/float (not bool) nested in ``value``."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")


def _check_number(path: str, x: float) -> str | None:
    """The rule for one number, chosen by the suffix of its name (the last component of ``path``)."""
    name = path.split(".")[-1]
    if name in ("median", "min", "max"):
        name = path.split(".")[-2]
    if not math.isfinite(x):
        return f"{path} is not finite: {x}"
    if name.endswith("_signed"):
        return None
    if name.endswith("_share"):
        return None if 0 <= x <= 1 else f"{path} is a share outside [0, 1]: {x}"
    if x <= 0:
        return f"{path} is not positive: {x}"
    return None


def validate_report(doc: dict[str, Any]) -> list[str]:
    """Check a suite JSON document against the schema; returns the list of problems (empty when valid)."""
    errors: list[str] = []
    for key, tp in TOP_KEYS.items():
        if key not in doc:
            errors.append(f"missing key {key!r}")
        elif not isinstance(doc[key], tp) or (tp is not bool and isinstance(doc[key], bool)):
            errors.append(f"{key!r} has type {type(doc[key]).__name__}")
    if errors:
        return errors
    if doc["schema"] != SCHEMA:
        errors.append(f"schema is {doc['schema']!r}, expected {SCHEMA!r}")
    if doc["suite"] not in SUITES:
        errors.append(f"unknown suite {doc['suite']!r}")
    for key in ("cpu_model", "cpu_cores", "gpu_count", "torch"):
        if key not in doc["machine"]:
            errors.append(f"machine lacks {key!r}")
    if not doc["rows"] and not doc["skipped"]:
        errors.append("no rows and nothing skipped: the suite measured nothing")
    names = set()
    for i, row in enumerate(doc["rows"]):
        where = f"rows[{i}]"
        if not isinstance(row.get("name"), str) or not isinstance(row.get("params"), dict) \
                or not isinstance(row.get("metrics"), dict) or not isinstance(row.get("group"), str):
            errors.append(f"{where} needs name/group (str), params and metrics (dict)")
            continue
        if row["name"] in names:
            errors.append(f"{where}: duplicate row name {row['name']!r}")
        names.add(row["name"])
        if not row["metrics"]:
            errors.append(f"{where} ({row['name']}) has no metrics")
        for metric, value in row["metrics"].items():
            mpath = f"{where}.metrics.{metric}"
            if value is None:
                continue
            if isinstance(value, dict):
                if set(value) != {"median", "min", "max", "n"}:
                    errors.append(f"{mpath}: stats need exactly median/min/max/n, got {sorted(value)}")
                    continue
                if not value["min"] <= value["median"] <= value["max"]:
                    errors.append(f"{mpath}: min <= median <= max violated: {value}")
                if not isinstance(value["n"], int) or value["n"] < 1:
                    errors.append(f"{mpath}: n must be a positive int")
                for part in ("median", "min", "max"):
                    problem = _check_number(f"{mpath}.{part}", value[part])
                    if problem:
                        errors.append(problem)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                problem = _check_number(mpath, value)
                if problem:
                    errors.append(problem)
            else:
                errors.append(f"{mpath}: must be a number, a stats object or null; got {value!r}")
    for i, comp in enumerate(doc["comparisons"]):
        for key in ("name", "metric", "ours", "baseline", "ratio"):
            if key not in comp:
                errors.append(f"comparisons[{i}] lacks {key!r}")
        for ref in ("ours", "baseline"):
            if comp.get(ref) not in names:
                errors.append(f"comparisons[{i}].{ref} names no row: {comp.get(ref)!r}")
    for path, x in [*_numbers(doc["comparisons"], "comparisons"), *_numbers(doc["extra"], "extra")]:
        problem = _check_number(path, x)
        if problem:
            errors.append(problem)
    for i, item in enumerate(doc["skipped"]):
        if not isinstance(item, dict) or not item.get("name") or not item.get("reason"):
            errors.append(f"skipped[{i}] needs a name and a reason")
    return errors


# ----------------------------------------------------------------------------- table, Markdown, plot


def _cell(value: Metric, fmt: str) -> str:
    if value is None:
        return "N/A"
    if isinstance(value, Stats):
        if value.n > 1 and value.max > value.min:
            return f"{fmt.format(value.median)} ({fmt.format(value.min)}–{fmt.format(value.max)})"
        return fmt.format(value.median)
    return fmt.format(value)


def table_rows(result: SuiteResult) -> tuple[list[str], list[list[str]]]:
    """Headers and cell strings of the suite's table (medians with min–max over repeats)."""
    headers = ["configuration", *[c.header for c in result.columns]]
    body = [[r.name, *[_cell(r.metrics.get(c.metric), c.fmt) for c in result.columns]] for r in result.rows]
    return headers, body


def print_table(result: SuiteResult, title: str) -> None:
    """Print the suite's table with rich, or as Markdown where rich is not installed (e.g. a bare GPU image)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"{title}\n\n{markdown_table(result)}", flush=True)
        return
    headers, body = table_rows(result)
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for cells in body:
        table.add_row(*cells)
    console = Console(width=max(140, Console().width))
    console.print(table)
    for comp in result.comparisons:
        console.print(f"  {comp['name']}: ours/baseline = {comp['ratio']:.2f}x")
    for item in result.skipped:
        console.print(f"  skipped {item['name']}: {item['reason']}")
    if result.markdown_extra:
        console.print(result.markdown_extra, markup=False, highlight=False)


def markdown_table(result: SuiteResult) -> str:
    """The suite's table as GitHub Markdown, followed by its comparisons and skips."""
    headers, body = table_rows(result)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    if not body:
        lines = ["Nothing measured on this machine."]
    lines += [""] + [f"- {c['name']}: ours/baseline = **{c['ratio']:.2f}x**" for c in result.comparisons]
    lines += [f"- skipped {s['name']}: {s['reason']}" for s in result.skipped]
    if result.markdown_extra:
        lines += ["", result.markdown_extra]
    return "\n".join(lines).rstrip() + "\n"


def plot(result: SuiteResult, path: Path, title: str) -> Path | None:
    """A PNG of the suite's headline metric: horizontal bars (median, whiskers min–max) or, for scaling, a curve.

    Returns None (and writes nothing) where matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.value(result.plot_metric) is not None]
    header = next((c.header for c in result.columns if c.metric == result.plot_metric), result.plot_metric)
    if result.suite == "scaling" and rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        gpus = [r.params["gpus"] for r in rows]
        ax.plot(gpus, [r.value(result.plot_metric) for r in rows], "o-", label="measured")
        base = rows[0].value(result.plot_metric) / rows[0].params["gpus"]
        ax.plot(gpus, [base * g for g in gpus], "--", label="linear")
        ax.set_xlabel("GPUs")
        ax.set_ylabel(header)
        ax.legend()
    else:
        fig, ax = plt.subplots(figsize=(9, 0.45 * max(len(rows), 2) + 1.2))
        values = [r.value(result.plot_metric) for r in rows]
        errs = [[0.0] * len(rows), [0.0] * len(rows)]
        for i, r in enumerate(rows):
            m = r.metrics[result.plot_metric]
            if isinstance(m, Stats):
                errs[0][i], errs[1][i] = m.median - m.min, m.max - m.median
        palette = {"baseline": "tab:gray", "reference": "tab:olive"}
        colors = [palette.get(r.group, "tab:gray" if "baseline" in r.name else "tab:blue") for r in rows]
        ax.barh(range(len(rows)), values, xerr=errs, color=colors, capsize=3)
        ax.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(header + " (median, whiskers min–max)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: SuiteResult, out_dir: str | os.PathLike, machine: dict[str, Any], argv: list[str],
                 quick: bool, title: str) -> dict[str, Any]:
    """Write ``<suite>.json``, ``<suite>.png`` and ``<suite>.md`` into ``out_dir``; return the JSON document."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = report_json(result, machine, argv, quick)
    if result.rows and importlib.util.find_spec("matplotlib") is None:
        doc["notes"].append("no PNG: matplotlib is not installed")
    problems = validate_report(doc)
    if problems:
        # Still write the file so the numbers can be inspected, but make the problem loud.
        doc["notes"].append("SCHEMA PROBLEMS: " + "; ".join(problems))
    tmp = out / f".{result.suite}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / f"{result.suite}.json")
    plot(result, out / f"{result.suite}.png", title)
    (out / f"{result.suite}.md").write_text(f"**{title}**\n\n" + markdown_table(result))
    return doc
