"""Read an offline W&B run (``offline-run-*`` folder) for the tests: config, history rows and summary."""

from __future__ import annotations

import json
from pathlib import Path

from training.wandb_offline import read_records


def read_offline_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """Return (config, history rows) of the offline run in ``run_dir`` (the ``offline-run-*`` folder)."""
    config, history, _ = read_offline_run_with_summary(run_dir)
    return config, history


def read_offline_run_with_summary(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """Return (config, history rows, summary) of the offline run in ``run_dir``; nested keys are joined with '/'."""
    (path,) = list(Path(run_dir).glob("run-*.wandb"))
    config, history, summary = {}, [], {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config, history, summary
