"""One command-line mechanism for every entry point: the same help format, YAML shape and one-line error / exit 2."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from typing import Literal

import pytest

import cli
import config
import demo
from benchmarks.__main__ import main as benchmarks_main
from cli import ConfigError
from eval.export import main as export_main
from eval.linear import LinearEvalConfig
from eval.linear import main as linear_main
from shards.__main__ import main as shards_main
from tests.conftest import REPO

HELP_CALLS = {
    "train": lambda: cli.parse(config.Config, ["--help"]),
    "eval.linear": lambda: linear_main(["--help"]),
    "eval.export": lambda: export_main(["--help"]),
    "shards build": lambda: shards_main(["build", "--help"]),
    "shards verify": lambda: shards_main(["verify", "--help"]),
    "benchmarks run": lambda: benchmarks_main(["run", "--help"]),
    "demo": lambda: demo.main(["--help"]),
}


def option_entries(text: str) -> list[str]:
    """Each option's help entry (its invocation line plus continuation lines), whitespace collapsed."""
    entries, current = [], None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith("    ") and line.strip():
            current.append(line)
        else:
            current = None
    return [" ".join(" ".join(e).split()) for e in entries]


@pytest.mark.parametrize("name", list(HELP_CALLS))
def test_help_shows_one_default_choices_and_flag_pairs(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        HELP_CALLS[name]()
    assert exit_.value.code == 0
    entries = option_entries(capsys.readouterr().out)
    assert entries
    for entry in entries:
        assert entry.count("(default:") <= 1 and "(default: None)" not in entry and "[default:" not in entry, entry
        flag = entry.split()[0]
        if "/--no-" in flag:  # a boolean: no value to give
            assert re.match(r"^--([\w-]+)/--no-\1$", flag), entry
        assert not re.match(r"^--[\w-]+ [A-Z_]+_[A-Z_]+ ", entry), entry  # no argparse FIELD_NAME placeholders


def test_literal_fields_show_their_choices_and_bools_are_flag_pairs(capsys):
    @dataclasses.dataclass(frozen=True)
    class Toy:
        """A toy.

        Args:
            mode: how to do it.
            fast: go fast.
        """

        mode: Literal["a", "b"] = "a"
        fast: bool = True
        sizes: list[int] = cli.option([1, 2], "Sizes.")

    with pytest.raises(SystemExit):
        cli.parse(Toy, ["--help"], group="toy")
    out = " ".join(capsys.readouterr().out.split())
    assert "--mode {a,b} how to do it. (default: a)" in out
    assert "--fast/--no-fast go fast. (default: True)" in out and "--sizes N,... Sizes. (default: 1,2)" in out
    assert cli.parse(Toy, ["--no-fast", "--mode", "b", "--sizes", "3,4"], group="toy") == Toy("b", False, [3, 4])


def test_linear_eval_yaml_is_nested_under_linear(tmp_path, capsys):
    path = tmp_path / "lincls.yaml"
    path.write_text("linear:\n  lr: 0.5\n  epochs: 3\n")
    cfg = cli.parse(LinearEvalConfig, ["--config", str(path), "--epochs", "4"], group="linear")
    assert (cfg.lr, cfg.epochs) == (0.5, 4)
    with pytest.raises(SystemExit):
        cli.parse(LinearEvalConfig, ["--config", str(path), "--print-config"], group="linear")
    printed = capsys.readouterr().out
    assert printed.startswith("linear:\n  checkpoint: ''\n") and "\n  lr: 0.5\n" in printed
    path.write_text(printed)
    assert cli.parse(LinearEvalConfig, ["--config", str(path)], group="linear") == dataclasses.replace(cfg, epochs=3)
    path.write_text("lr: 0.5\n")  # the old flat shape
    with pytest.raises(ConfigError, match="unknown group 'lr' \\(expected one of linear\\)"):
        cli.parse(LinearEvalConfig, ["--config", str(path)], group="linear")
    path.write_text("linear:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match="linear.lr must be a finite number"):
        cli.parse(LinearEvalConfig, ["--config", str(path)], group="linear")


@pytest.mark.parametrize("main, argv, message", [
    (linear_main, ["--lr", "nan"], "error: linear.lr must be a finite number; got 'nan'"),
    (linear_main, ["--device", "tpu"], "error: linear.device must be one of auto, cuda, cpu; got 'tpu'"),
    (linear_main, ["--workers", "-1"], "error: linear.workers must be >= 0; got -1"),
    (export_main, ["c.pt", "--out", "o.pth", "--format", "onnx"], "error: argument --format: invalid choice: 'onnx'"),
    (export_main, ["c.pt"], "error: the following arguments are required: --out"),
    (export_main, ["/no/such.pt", "--out", "o.pth"], "error: "),
    (demo.main, ["--steps", "0"], "error: --steps must be > 0; got 0"),
    (demo.main, ["--seed", "many"], "error: --seed must be an integer; got 'many'"),
    (demo.main, ["--torch-threads=-2"], "error: --torch-threads must be >= 0; got -2"),
])
def test_every_entry_point_reports_mistakes_in_one_line_with_exit_2(main, argv, message, capsys, tmp_path,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err


def test_docstring_args_become_help():
    @dataclasses.dataclass
    class Opts:
        """Options.

        Args:
            alpha: first line
                continued here.
            beta (int): second.

        Returns:
            nothing.
        """

        alpha: int = 1
        beta: int = 2

    fields = {f.name: f for f in dataclasses.fields(Opts)}
    assert cli.field_help(Opts, fields["alpha"]) == "first line continued here."
    assert cli.field_help(Opts, fields["beta"]) == "second."


def test_a_file_value_that_needs_a_flag_is_checked_after_the_flags(tmp_path):
    path = tmp_path / "lincls.yaml"
    path.write_text("linear:\n  val_crop: 300\n  val_resize: 256\n")
    assert cli.parse(LinearEvalConfig, ["--config", str(path), "--val-resize", "320"], group="linear").val_crop == 300
    with pytest.raises(ConfigError, match=r"linear.val_crop \(300\) must not exceed val_resize \(256\)"):
        cli.parse(LinearEvalConfig, ["--config", str(path)], group="linear")


# Modules that take seconds to import: an entry point must not load them before its command line is parsed.
HEAVY_MODULES = ("torch", "torchvision", "nvidia.dali", "wandb")


def imported_heavy_modules(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime ARGS`` from the repository root; return the process and the heavy modules it
    imported (read from the import-time lines, which name every module imported, in the order imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, {h for h in HEAVY_MODULES if h in names or any(n.startswith(h + ".") for n in names)}


EARLY_ANSWERS = [  # (command line, the one stderr line it ends with; None: --help, exit 0)
    (["train.py", "--help"], None),
    (["-m", "eval.linear", "--help"], None),
    (["-m", "eval.export", "--help"], None),
    (["-m", "demo", "--help"], None),
    (["-m", "shards", "build", "--help"], None),
    (["-m", "benchmarks", "run", "--help"], None),
    (["train.py", "--no-such-flag"], "error: unrecognized arguments: --no-such-flag"),
    (["train.py", "--batch-size", "x"], "error: data.batch_size must be an integer; got 'x'"),
    (["-m", "eval.linear", "--lr", "nan"], "error: linear.lr must be a finite number; got 'nan'"),
    (["-m", "eval.export", "c.pt", "--out", "o.pth", "--format", "onnx"], "error: argument --format: invalid choice"),
    (["-m", "demo", "--steps", "0"], "error: --steps must be > 0; got 0"),
]


@pytest.mark.parametrize("args, message", EARLY_ANSWERS, ids=[" ".join(a) for a, _ in EARLY_ANSWERS])
def test_help_and_flag_mistakes_answer_before_torch_is_imported(args, message):
    proc, heavy = imported_heavy_modules(args)
    assert not heavy, f"{' '.join(args)} imported {sorted(heavy)} before answering"
    err = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    if message is None:
        assert proc.returncode == 0 and "usage:" in proc.stdout and not err, proc.stderr[-2000:]
    else:
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith(message), err


def test_the_heavy_modules_load_once_the_command_line_is_valid(tmp_path):
    """The control for the test above: past parsing, the export imports torch and reports a missing file."""
    proc, heavy = imported_heavy_modules(["-m", "eval.export", str(tmp_path / "absent.pt"), "--out", "o.pth"])
    err = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert "torch" in heavy and proc.returncode == 2 and err == [f"error: checkpoint not found: {tmp_path}/absent.pt"]


@pytest.mark.parametrize("main, first_group", [(lambda argv: __import__("train").main(argv), "data"),
                                               (linear_main, "linear")])
def test_train_and_linear_eval_read_the_config_yaml_they_print(main, first_group, tmp_path, capsys):
    """Both take ``--config`` nested by group (``data:`` ... for train.py, ``linear:`` for eval.linear), the shape
    their own ``--print-config`` prints, through their real main()."""
    with pytest.raises(SystemExit) as exit_:
        main(["--print-config", "--seed", "3"])
    printed = capsys.readouterr().out
    assert exit_.value.code == 0 and printed.startswith(f"{first_group}:\n") and "\n  seed: 3\n" in printed
    path = tmp_path / "config.yaml"
    path.write_text(printed)
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--print-config"])
    assert capsys.readouterr().out == printed
    path.write_text("seed: 3\n")  # flat: not the shape
    assert main(["--config", str(path)]) == 2
    assert "unknown group 'seed'" in capsys.readouterr().err
