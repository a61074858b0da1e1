"""The result of one suite (typed rows that check their figures), its JSON form, table, Markdown and PNG plot.

JSON (``schema: "moco-dali-bench/2"``), one file per suite, ``<out>/<suite>.json``::

    {
      "schema": "moco-dali-bench/2",
      "suite": "model",                        # pipeline | model | e2e | shards | scaling
      "created_utc": "2026-01-01T12:00:00Z",
      "git": {"commit": "898a08c...", "dirty": false},   # the code measured (null where unknown)
      "quick": false,
      "argv": ["run", "--suite", "model", ...],
      "repeats": 5,                            # timed repeats (windows) behind the headline figure's Stats
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

Every metric is checked when a suite adds it (:meth:`SuiteResult.add` raises ``ValueError``): finite and > 0,
except names ending in ``_share`` (fractions in [0, 1]: a loader that never makes the step wait has a data-wait
share of exactly 0) and ``_signed`` (differences, such as a step minus a reference, which can be negative).
``Stats`` keep min <= median <= max. ``python -m benchmarks validate FILE`` reads a file back through the same
checks (:func:`load_report`).
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

from benchmarks.machine import git_provenance
from benchmarks.timing import Stats

SCHEMA = "moco-dali-bench/2"
SUITES = ("shards", "model", "pipeline", "e2e", "scaling", "scale")

Metric = Stats | float | int | None


def check_metric(name: str, value: Metric) -> None:
    """Raise ``ValueError`` unless ``value`` obeys the rule its ``name`` implies (see the module docstring)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (Stats, int, float)):
        raise ValueError(f"metric {name}: must be a number, Stats or None; got {value!r}")
    for x in (value.median, value.min, value.max) if isinstance(value, Stats) else (value,):
        if not math.isfinite(x):
            raise ValueError(f"metric {name} is not finite: {x}")
        if name.endswith("_share") and not 0 <= x <= 1:
            raise ValueError(f"metric {name} is a share outside [0, 1]: {x}")
        if not name.endswith(("_share", "_signed")) and x <= 0:
            raise ValueError(f"metric {name} is not positive: {x}")


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

    @property
    def repeats(self) -> int:
        """Timed repeats (or windows) behind the headline figure: the most any row's ``plot_metric`` Stats has."""
        return max((m.n for r in self.rows if isinstance(m := r.metrics.get(self.plot_metric), Stats)), default=0)

    def add(self, name: str, group: str, params: dict[str, Any], **metrics: Metric) -> Row:
        """Add a measured row; raises ``ValueError`` for a repeated name or a figure that breaks its rule."""
        if any(r.name == name for r in self.rows):
            raise ValueError(f"duplicate row name {name!r}")
        for metric, value in metrics.items():
            check_metric(metric, value)
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
        check_metric("ratio", ratio)
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
        "git": git_provenance(),
        "quick": quick,
        "argv": list(argv),
        "repeats": result.repeats,
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


def load_report(doc: dict[str, Any]) -> SuiteResult:
    """Read a suite's JSON document back into a :class:`SuiteResult`, through the checks that wrote it.

    Raises:
        ValueError (or KeyError / TypeError for a missing or mistyped field): the first problem found.
    """
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    if doc["suite"] not in SUITES:
        raise ValueError(f"unknown suite {doc['suite']!r}")
    result = SuiteResult(doc["suite"], doc["config"], [], "", extra=doc["extra"], notes=list(doc["notes"]),
                         wall_s=float(doc["wall_s"]))
    for row in doc["rows"]:
        metrics = {k: Stats(**v) if isinstance(v, dict) else v for k, v in row["metrics"].items()}
        result.add(row["name"], row["group"], row["params"], **metrics)
    for comp in doc["comparisons"]:
        for ref in (comp["ours"], comp["baseline"]):
            result.row(ref)  # raises KeyError when it names no row
        check_metric("ratio", comp["ratio"])
        result.comparisons.append(comp)
    for item in doc["skipped"]:
        result.skip(item["name"], item["reason"])
    if not result.rows and not result.skipped:
        raise ValueError("no rows and nothing skipped: the suite measured nothing")
    return result


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
    tmp = out / f".{result.suite}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / f"{result.suite}.json")
    plot(result, out / f"{result.suite}.png", title)
    (out / f"{result.suite}.md").write_text(f"**{title}**\n\n" + markdown_table(result))
    return doc
