"""The typed config: CLI/YAML round trip and one-line errors for every kind of bad input."""

import subprocess
import sys

import pytest

import config
from config import Config, ConfigError, dump_yaml, from_dict, load_yaml, parse_config


def test_defaults_validate_and_roundtrip_through_yaml(tmp_path):
    cfg = parse_config(["--batch-size", "512", "--recipe", "v1", "--milestones", "0.5,0.9", "--channels-last", "false"])
    assert cfg.data.batch_size == 512 and cfg.data.recipe == "v1" and cfg.optim.milestones == [0.5, 0.9]
    assert cfg.data.channels_last is False
    path = tmp_path / "run.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_yaml(path) == cfg
    assert parse_config(["--config", str(path)]) == cfg


def test_flags_override_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  batch_size: 128\nmodel:\n  arch: resnet18\n")
    cfg = parse_config(["--config", str(path), "--batch-size", "64"])
    assert cfg.data.batch_size == 64 and cfg.model.arch == "resnet18"
    assert cfg.model.queue_size == Config().model.queue_size


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "abc"], "data.batch_size must be an integer"),
    (["--momentum", "1.5"], "model.momentum must be in [0, 1)"),
    (["--shuffle-bn", "magic"], "model.shuffle_bn must be one of"),
    (["--channels-last", "maybe"], "data.channels_last must be a boolean"),
    (["--queue-size", "0"], "model.queue_size must be > 0"),
    (["--milestones", "0.9,0.5"], "optim.milestones must be increasing"),
    (["--no-such-flag", "1"], "unrecognized arguments"),
    (["--knn-every", "10"], "run.knn_every > 0 needs"),
])
def test_bad_flags_give_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("data:\n  batch_sise: 3\n", "unknown key 'data.batch_sise'"),
    ("dataa:\n  batch_size: 3\n", "unknown group 'dataa'"),
    ("data:\n  batch_size: [1]\n", "data.batch_size must be an integer"),
    ("data: [1, 2]\n", "'data' must be a mapping"),
    ("data: {batch_size: 3\n", "invalid YAML"),
])
def test_bad_yaml_gives_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_yaml_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml("/nonexistent/run.yaml")


def test_world_size_must_divide_global_batch():
    cfg = from_dict({"data": {"batch_size": 10}})
    assert config.global_batch(cfg, 2) == 10
    with pytest.raises(ConfigError, match="data.batch_size=10 is not divisible by the world size 3"):
        config.validate(cfg, world_size=3)
    per_gpu = config.replace(cfg, data={"batch_size_per_gpu": 7})
    assert config.global_batch(per_gpu, 3) == 21


def test_learning_rate_scales_with_global_batch():
    cfg = from_dict({"data": {"batch_size": 512}})
    assert config.learning_rate(cfg, 4) == pytest.approx(0.06)
    assert config.learning_rate(config.replace(cfg, optim={"lr": 0.5}), 4) == 0.5


def test_field_names_unique_and_every_field_has_help():
    index = config._flag_index()
    assert len(index) == sum(len(config.dataclasses.fields(c)) for c in config.GROUPS.values())
    for cls in config.GROUPS.values():
        for f in config.dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_main_guard_prints_one_line_and_exits_2():
    code = "import config; config.main_guard(lambda: config.parse_config(['--batch-size', 'x']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=config.__file__.rsplit("/", 1)[0])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: data.batch_size must be an integer; got 'x'"
