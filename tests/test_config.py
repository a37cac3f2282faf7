"""The typed config tree: YAML loading, --set overrides, field-path errors, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raysemi.config import RaysemiConfig, ceil_fraction, load_config, parse_override
from raysemi.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    raw = yaml.safe_load(path.read_text())
    # The study benchmarks keep their own settings in a top-level `study` section next to a raysemi config.
    raw.pop("study", None)
    assert isinstance(RaysemiConfig.from_dict(raw, source=str(path)), RaysemiConfig)


def test_demo_and_brats_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "brats2021.yaml"} <= names
    brats = load_config(Path(CONFIGS[0]).parent / "brats2021.yaml")
    assert brats.model.preset == "base" and brats.train.use_gpu == "yes"


def test_defaults_follow_method_md():
    cfg = RaysemiConfig()
    assert (cfg.loss.tau_high, cfg.loss.tau_low, cfg.loss.lambda_high, cfg.loss.lambda_low) == (0.2, 0.5, 1.0, 0.3)
    assert cfg.curriculum.stages == 6 and cfg.model.mc_passes == 8
    assert (cfg.curriculum.refine_margin, cfg.curriculum.refine_alpha) == (0.1, 0.5)
    assert cfg.curriculum.cumulative_fractions() == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"loss": {"tau_high": 0.1}}))
    cfg = load_config(path, ["loss.lambda_low=0.5", "data.patch_size=[32, 48, 64]", "data.max_labeled=null"])
    assert cfg.loss.tau_high == 0.1 and cfg.loss.lambda_low == 0.5
    assert cfg.data.patch_size == (32, 48, 64) and cfg.data.max_labeled is None
    assert parse_override("train.run_name=abc") == ("train.run_name", "abc")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss.tau_hgh=0.3"], "loss.tau_hgh: unknown key in section loss"),
        (["data.patch_size=[60, 64, 64]"], "data.patch_size: every side must be a positive multiple of 16"),
        (["train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["data.labeled_fraction=1.5"], "data.labeled_fraction"),
        (["model.preset=huge"], "model.preset"),
        (["loss.tau_high=0.6"], "tau_high (0.6) must be below tau_low (0.5)"),
        (["curriculum.fractions=[0.5, 1.0]"], "fractions has 2 entries, expected one per stage (6)"),
        (["curriculum.mode=threshold"], "threshold mode needs thresholds"),
        (["train.storage_path=s3://bucket/runs"], "train.storage_path: must be a file-system path"),
        (["train.run_name=../escape"], "train.run_name"),
        (["bogus.key=1"], "bogus: unknown key"),
    ],
)
def test_bad_values_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert expected in str(error.value)


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["loss.tau_high"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_plain_dict():
    cfg = load_config(None, ["loss.tau_high=0.15", "curriculum.stages=3"])
    assert RaysemiConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["loss.tau_high"] == 0.15


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    cfg = load_config(None, ["tracking.uri=sqlite:////tmp/x.db"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cfg.tracking_uri() == "sqlite:////tmp/x.db"
    assert RaysemiConfig().tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert cfg.tracking_uri() == "http://mlflow:5000"


@pytest.mark.parametrize(("fraction", "count", "expected"), [(2 / 6, 6, 2), (1 / 6, 6, 1), (0.07, 100, 7), (1.0, 5, 5), (0.5, 5, 3)])
def test_ceil_fraction_is_robust_to_float_error(fraction, count, expected):
    assert ceil_fraction(fraction, count) == expected
