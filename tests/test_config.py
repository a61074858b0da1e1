"""The typed config and the one CLI mechanism: CLI/YAML round trip, help format and one-line errors for bad input."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import config
from config import Config, ConfigError, dump_yaml, from_dict

REPO = Path(__file__).resolve().parents[1]


def parse(argv):
    return cli.parse(Config, argv)


def test_defaults_validate_and_roundtrip_through_yaml(tmp_path):
    cfg = parse(["--batch-size", "512", "--recipe", "v1", "--milestones", "0.5,0.9", "--no-channels-last"])
    assert cfg.data.batch_size == 512 and cfg.data.recipe == "v1" and cfg.optim.milestones == [0.5, 0.9]
    assert cfg.data.channels_last is False
    path = tmp_path / "run.yaml"
    path.write_text(dump_yaml(cfg))
    assert from_dict(cli.load_yaml(path)) == cfg
    assert parse(["--config", str(path)]) == cfg
    assert parse(["--config", str(path), "--channels-last"]).data.channels_last is True


def test_flags_override_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  batch_size: 128\nmodel:\n  arch: resnet18\n")
    cfg = parse(["--config", str(path), "--batch-size", "64"])
    assert cfg.data.batch_size == 64 and cfg.model.arch == "resnet18"
    assert cfg.model.queue_size == Config().model.queue_size


def test_print_config_prints_the_nested_yaml(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["--print-config", "--arch", "resnet18", "--lr", "0.5"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("data:\n") and "\nmodel:\n  arch: resnet18\n" in text and "\n  lr: 0.5\n" in text
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert parse(["--config", str(path)]) == parse(["--arch", "resnet18", "--lr", "0.5"])


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "abc"], "data.batch_size must be an integer"),
    (["--momentum", "1.5"], "model.momentum must be in [0, 1)"),
    (["--shuffle-bn", "magic"], "model.shuffle_bn must be one of"),
    (["--channels-last", "maybe"], "unrecognized arguments: maybe"),
    (["--queue-size", "0"], "model.queue_size must be > 0"),
    (["--milestones", "0.9,0.5"], "optim.milestones must be increasing"),
    (["--no-such-flag", "1"], "unrecognized arguments"),
    (["--knn-every", "10"], "run.knn_every > 0 needs"),
    (["--lr", "nan"], "optim.lr must be a finite number; got 'nan'"),
    (["--lr", "inf"], "optim.lr must be a finite number; got 'inf'"),
    (["--base-lr=-inf"], "optim.base_lr must be a finite number"),
    (["--milestones", "0.5,nan"], "optim.milestones must be a finite number"),
    (["--arch", "resnet51"], "model.arch 'resnet51' is not a torchvision classification model; ResNet family: resnet18"),
    (["--torch-threads", "-1"], "run.torch_threads must be >= 0"),
])
def test_bad_flags_give_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as err:
        parse(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_non_finite_values_are_rejected_however_the_config_is_built():
    with pytest.raises(ConfigError, match="model.temperature must be a finite number"):
        from_dict({"model": {"temperature": float("inf")}})
    with pytest.raises(ConfigError, match="optim.grad_clip must be a finite number"):
        config.replace(Config(), optim={"grad_clip": float("nan")})
    with pytest.raises(ConfigError, match="optim.weight_decay must be a finite number"):
        dataclasses.replace(Config(), optim=dataclasses.replace(Config().optim, weight_decay=float("nan")))


@pytest.mark.parametrize("text, message", [
    ("data:\n  batch_sise: 3\n", "unknown key 'data.batch_sise'"),
    ("dataa:\n  batch_size: 3\n", "unknown group 'dataa'"),
    ("data:\n  batch_size: [1]\n", "data.batch_size must be an integer"),
    ("data: [1, 2]\n", "'data' must be a mapping"),
    ("data: {batch_size: 3\n", "invalid YAML"),
    ("batch_size: 3\n", "unknown group 'batch_size'"),
    ("optim:\n  lr: .nan\n", "optim.lr must be a finite number"),
    ("- 1\n", "top level must be a mapping of groups"),
])
def test_bad_yaml_gives_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse(["--config", str(path)])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_yaml_file():
    with pytest.raises(ConfigError, match="config file not found"):
        parse(["--config", "/nonexistent/run.yaml"])


def test_world_size_must_divide_global_batch():
    cfg = from_dict({"data": {"batch_size": 10}})
    assert config.global_batch(cfg, 2) == 10
    with pytest.raises(ConfigError, match="data.batch_size=10 is not divisible by the world size 3"):
        config.validate(cfg, world_size=3)
    per_gpu = config.replace(cfg, data={"batch_size_per_gpu": 7}, model={"shuffle_bn": "gather"})
    assert config.global_batch(per_gpu, 3) == 21


@pytest.mark.parametrize("batch, world, shuffle_bn, ok", [
    (32, 1, "auto", True), (36, 1, "auto", False), (36, 1, "split", False), (36, 1, "none", True),
    (40, 2, "split", False), (48, 2, "split", True), (36, 2, "auto", True),  # auto is all_to_all with 2 ranks
])
def test_split_bn_groups_must_divide_the_per_rank_batch(batch, world, shuffle_bn, ok):
    cfg = from_dict({"data": {"batch_size": batch}, "model": {"shuffle_bn": shuffle_bn, "split_bn_groups": 8}})
    if ok:
        config.validate(cfg, world_size=world)
        return
    with pytest.raises(ConfigError) as err:
        config.validate(cfg, world_size=world)
    assert f"per-rank batch {batch // world} ({world} rank(s)) is not divisible by model.split_bn_groups=8" in str(
        err.value) and f"multiple of {8 * world}" in str(err.value)


def test_learning_rate_scales_with_global_batch():
    cfg = from_dict({"data": {"batch_size": 512}})
    assert config.learning_rate(cfg, 4) == pytest.approx(0.06)
    assert config.learning_rate(config.replace(cfg, optim={"lr": 0.5}), 4) == 0.5


def test_field_names_unique_and_every_field_has_help():
    names = [f.name for cls in config.GROUPS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    for cls in config.GROUPS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_help_shows_choices_one_default_and_flag_pairs(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert "--backend {auto,dali,pytorch} Loader backend." in flat
    assert "--channels-last/--no-channels-last" in flat and "--compile/--no-compile" in flat
    assert "(default: None)" not in flat and "[default:" not in flat
    fields = [f for cls in config.GROUPS.values() for f in dataclasses.fields(cls)]
    assert flat.count("(default: ") == len(fields) + 0  # exactly one per field flag (--config has none)
    for f in fields:
        assert "--" + f.name.replace("_", "-") in out


def test_unknown_arch_rejected_and_known_ones_need_no_torchvision_import():
    code = "import sys, config; config.Config(); print('torchvision' in sys.modules, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.split() == ["False", "False"], proc.stderr
    assert from_dict({"model": {"arch": "regnet_x_400mf"}}).model.arch == "regnet_x_400mf"  # looked up in torchvision


def test_train_entry_point_error_is_one_line_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--batch-size", "x"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: data.batch_size must be an integer; got 'x'"
    proc = subprocess.run([sys.executable, "train.py", "--lr", "nan", "--shards", str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: optim.lr must be a finite number; got 'nan'"
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "--shards", str(tmp_path), "--batch-size", "12", "--device", "cpu",
                           "--total-steps", "1", "--run-dir", str(run_dir)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: the per-rank batch 12 (1 rank(s)) is not divisible by model.split_bn_groups=8 (split shuffle-BN); "
        "use a batch that is a multiple of 8 or --split-bn-groups that divides 12")
    assert not run_dir.exists()  # before any work
