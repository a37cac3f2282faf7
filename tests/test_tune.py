"""``raysemi tune``: search space, per-trial configs and masks, and one real sweep on a local Ray cluster.

The sweep (one module-scoped run, because each Ray Train fit costs ~25 s here) is a 2 x 2 grid:

- ``train.lr`` in [1e-6, 1e30]: the first student barely moves away from the teacher; the second one
  takes AdamW steps of ~1e30, so its weights overflow, its logits are NaN and it predicts background
  everywhere (validation Dice 0). Trials run one at a time, in grid order, so ASHA (grace period 1,
  reduction factor 2) compares the second trial's stage-1 Dice with the first one's and stops it.
- ``loss.tau_high`` in [0.15, 0.6] with ``loss.tau_low`` 0.5: the two trials with 0.6 are invalid and
  must fail alone, with a message naming the thresholds, without stopping the sweep. 0.15 differs
  from the base 0.2, so the valid trials recompute their teacher masks.

The last test reruns the same command, which restores the Tuner and must rerun no trial.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from raysemi.config import RaysemiConfig, load_config
from raysemi.errors import ConfigError
from tests.helpers import tiny_config

GOOD_LR, BAD_LR = 1e-6, 1e30


def _sweep_config(data_root: Path, storage: Path, **tune_fields) -> RaysemiConfig:
    tune_section = {
        "name": "sweep-test",
        "search": "grid",
        "num_samples": 1,
        "max_concurrent_trials": 1,
        "scheduler": "asha",
        "grace_period": 1,
        "reduction_factor": 2,
        "cpus_per_trial": 1,
        "space": {
            "train.lr": {"kind": "grid", "values": [GOOD_LR, BAD_LR]},
            "loss.tau_high": {"kind": "grid", "values": [0.15, 0.6]},
        },
    }
    tune_section.update(tune_fields)
    return tiny_config(
        data_root,
        storage,
        train={"epochs": 2, "val_max_cases": 1},
        model={"mc_passes": 2},
        curriculum={"stages": 2, "epochs_per_stage": 1},
        tune=tune_section,
    )


# -- without Ray ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "entry", "message"),
    [
        ("loss.tau_hgh", {"kind": "choice", "values": [0.1]}, "no such config field"),
        ("model.dropout", {"kind": "uniform", "low": 0.1, "high": 0.3}, "cannot be swept"),
        ("data.patch_size", {"kind": "choice", "values": [[32, 32, 32]]}, "cannot be swept"),
        ("train.epochs", {"kind": "randint", "low": 1, "high": 3}, "cannot be swept"),
        ("curriculum.confidence_margin", {"kind": "randint", "low": 1, "high": 3}, "cannot be swept"),
    ],
)
def test_check_space_refuses_unknown_and_shared_keys(tmp_path, key, entry, message):
    from raysemi.tune import check_space

    cfg = _sweep_config(tmp_path, tmp_path, space={key: entry})
    with pytest.raises(ConfigError, match=message):
        check_space(cfg)


def test_check_space_refuses_grid_entries_for_optuna(tmp_path):
    from raysemi.tune import check_space

    cfg = _sweep_config(tmp_path, tmp_path, search="optuna")
    with pytest.raises(ConfigError, match="tune.space.train.lr: Optuna search takes no 'grid'"):
        check_space(cfg)


def test_search_space_kinds_and_list_values_round_trip(tmp_path):
    from ray import tune

    from raysemi.tune import sampled_values, search_space

    space = {
        "curriculum.stages": {"kind": "randint", "low": 2, "high": 4},
        "curriculum.fractions": {"kind": "choice", "values": [[0.5, 1.0], [0.25, 1.0]]},
        "loss.lambda_low": {"kind": "loguniform", "low": 0.01, "high": 1.0},
    }
    cfg = _sweep_config(tmp_path, tmp_path, search="random", space=space)
    built = search_space(cfg)
    stages = built["curriculum"]["stages"]
    assert isinstance(stages, tune.search.sample.Integer)
    assert (stages.lower, stages.upper) == (2, 5)  # Tune's upper bound is exclusive: 4 is included
    assert built["curriculum"]["fractions"].categories == ["[0.5, 1.0]", "[0.25, 1.0]"]
    assert isinstance(built["loss"]["lambda_low"].sampler, tune.search.sample.LogUniform)
    # Grid search enumerates choices too.
    assert search_space(cfg.with_overrides({"tune.search": "grid"}))["curriculum"]["fractions"] == {
        "grid_search": ["[0.5, 1.0]", "[0.25, 1.0]"]
    }
    trial = {"curriculum": {"stages": 3, "fractions": "[0.25, 1.0]"}, "loss": {"lambda_low": 0.2}}
    assert sampled_values(trial, cfg) == {"curriculum.stages": 3, "curriculum.fractions": [0.25, 1.0], "loss.lambda_low": 0.2}


def test_optuna_converts_the_space_and_samples_inside_it(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    from raysemi.tune import sampled_values, search_space

    space = {
        "loss.tau_high": {"kind": "uniform", "low": 0.1, "high": 0.3},
        "curriculum.stages": {"kind": "randint", "low": 2, "high": 3},
        "curriculum.fractions": {"kind": "choice", "values": [[0.5, 1.0], [1.0, 1.0]]},
    }
    cfg = _sweep_config(tmp_path, tmp_path, search="optuna", space=space)
    searcher = OptunaSearch(seed=0)
    assert searcher.set_search_properties("val_dice_mean_regions", "max", search_space(cfg))
    for index in range(5):
        values = sampled_values(searcher.suggest(f"trial_{index}"), cfg)
        assert 0.1 <= values["loss.tau_high"] <= 0.3
        assert values["curriculum.stages"] in (2, 3)
        assert values["curriculum.fractions"] in ([0.5, 1.0], [1.0, 1.0])


def test_apply_sampled_names_an_invalid_combination(tmp_path):
    from raysemi.tune import apply_sampled

    cfg = _sweep_config(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=r"trial t1: loss: tau_high \(0.6\) must be below tau_low \(0.5\).*; sampled values: loss.tau_high=0.6; this trial is skipped"):
        apply_sampled(cfg, {"loss.tau_high": 0.6}, "trial t1")


def test_apply_sampled_drops_fractions_of_another_stage_count(tmp_path):
    from raysemi.tune import apply_sampled

    cfg = _sweep_config(tmp_path, tmp_path).with_overrides({"curriculum.fractions": [0.5, 1.0]})
    assert apply_sampled(cfg, {"curriculum.stages": 3}, "t").curriculum.cumulative_fractions() == pytest.approx([1 / 3, 2 / 3, 1.0])
    # Sampled together, both are kept.
    both = apply_sampled(cfg, {"curriculum.stages": 3, "curriculum.fractions": [0.2, 0.5, 1.0]}, "t")
    assert both.curriculum.fractions == [0.2, 0.5, 1.0]


@pytest.mark.parametrize(
    ("gpus_per_trial", "cluster_gpus", "max_concurrent", "expected"),
    [(0.0, 0, 3, 3), (1.0, 8, 3, 3), (2.0, 4, 3, 2), (1.0, 1, 4, 1)],
)
def test_trial_concurrency(tmp_path, gpus_per_trial, cluster_gpus, max_concurrent, expected):
    from raysemi.tune import trial_concurrency

    cfg = _sweep_config(tmp_path, tmp_path, gpus_per_trial=gpus_per_trial, max_concurrent_trials=max_concurrent)
    assert trial_concurrency(cfg, cluster_gpus) == expected


def test_trial_concurrency_refuses_a_cluster_without_enough_gpus(tmp_path):
    from raysemi.tune import trial_concurrency

    cfg = _sweep_config(tmp_path, tmp_path, gpus_per_trial=2.0)
    with pytest.raises(ConfigError, match="gpus_per_trial is 2.0 but the cluster has 1 GPUs"):
        trial_concurrency(cfg, 1)


def test_recompute_mask_thresholds_the_stored_uncertainty_inside_the_brain_box(tmp_path):
    from raysemi.tune import recompute_mask

    rng = np.random.default_rng(0)
    quantised = rng.integers(0, 256, size=(6, 5, 4)).astype(np.uint8)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = nib.Nifti1Image(quantised, affine)
    image.header.set_slope_inter(1.0 / 255.0, 0.0)
    nib.save(image, tmp_path / "u.nii.gz")
    np.savez(tmp_path / "probs.npz", probs=np.zeros((4, 1, 1, 1), np.uint8), box_start=np.array([1, 0, 1]), box_end=np.array([5, 4, 4]))

    recompute_mask(str(tmp_path / "u.nii.gz"), str(tmp_path / "probs.npz"), 0.3, 0.6, str(tmp_path / "mask.nii.gz"))

    written = nib.load(tmp_path / "mask.nii.gz")
    mask = np.asarray(written.dataobj)
    u = quantised / 255.0
    expected = np.zeros(u.shape, np.uint8)
    inside = np.zeros(u.shape, bool)
    inside[1:5, 0:4, 1:4] = True
    expected[inside & (u <= 0.3)] = 1
    expected[inside & (u >= 0.6)] = 2
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(written.affine, affine)


# -- one real sweep ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(ray_cluster, synth_root, tmp_path_factory):
    from raysemi.tune import run_sweep

    storage = tmp_path_factory.mktemp("tune")
    cfg = _sweep_config(synth_root, storage)
    started = time.time()
    outcome = run_sweep(cfg)
    print(f"sweep took {time.time() - started:.0f} s")
    client = MlflowClient(tracking_uri=cfg.tracking_uri())
    return {"cfg": cfg, "outcome": outcome, "client": client, "root": storage / "sweep-test"}


def _trials(sweep) -> dict[str, dict]:
    """trials.json by trial id (the sweep's own record on disk)."""
    return {t["trial_id"]: t for t in json.loads((sweep["root"] / "trials.json").read_text())}


def _children(sweep, parent_id: str):
    experiment = sweep["client"].get_experiment_by_name(sweep["cfg"].tracking.experiment)
    return sweep["client"].search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def _valid_trials(sweep) -> list[dict]:
    """The two trials with τ_h = 0.15, in the order Tune created (and, one at a time, ran) them."""
    valid = [t for t in _trials(sweep).values() if t["params"]["loss.tau_high"] == 0.15]
    return sorted(valid, key=lambda t: t["trial_id"].rsplit("_", 1)[-1])


def test_sweep_runs_every_trial_and_invalid_ones_fail_alone(sweep):
    trials = _trials(sweep)
    assert len(trials) == 4
    invalid = [t for t in trials.values() if t["params"]["loss.tau_high"] == 0.6]
    assert [t["status"] for t in invalid] == ["error", "error"]
    for trial in invalid:
        assert "tau_high (0.6) must be below tau_low (0.5)" in trial["error"]
    assert sorted(t["params"]["train.lr"] for t in _valid_trials(sweep)) == [GOOD_LR, BAD_LR]


def test_asha_stops_the_diverged_trial_after_the_first_stage(sweep):
    first, second = _valid_trials(sweep)
    assert first["params"]["train.lr"] == GOOD_LR  # grid order; the comparison below relies on it
    assert (first["status"], first["last_stage"]) == ("completed", 2)
    # ASHA's rung at stage 1 holds the first trial's value; with reduction factor 2 its cutoff is
    # that value, and a trial below it stops. Both values come from the trials' own run state.
    stage1 = {}
    for trial in (first, second):
        state = json.loads((sweep["root"] / "trials" / trial["trial_id"] / "state.json").read_text())
        stage1[trial["trial_id"]] = state["steps"]["stage_01"]["metrics"]["val_dice_mean_regions"]
    assert stage1[second["trial_id"]] == 0.0  # NaN weights predict background: no overlap
    assert stage1[first["trial_id"]] > 0.0
    assert (second["status"], second["last_stage"]) == ("stopped", 1)
    assert not (sweep["root"] / "trials" / second["trial_id"] / "stage_02").exists()


def test_mlflow_has_a_sweep_run_with_one_nested_run_per_trial(sweep):
    client, outcome = sweep["client"], sweep["outcome"]
    sweep_run = client.get_run(outcome["sweep_run_id"])
    assert sweep_run.data.tags["raysemi.role"] == "sweep"
    children = {run.info.run_name: run for run in _children(sweep, outcome["sweep_run_id"])}
    first, second = _valid_trials(sweep)
    # The shared teacher and the two trials that started a pipeline; invalid trials never got that far.
    assert set(children) == {"shared-teacher", first["trial_id"], second["trial_id"]}
    for trial in (first, second):
        run = children[trial["trial_id"]]
        assert float(run.data.params["train.lr"]) == trial["params"]["train.lr"]
        assert float(run.data.params["loss.tau_high"]) == 0.15
        assert run.data.tags["raysemi.role"] == "pipeline"
    history = {
        trial["trial_id"]: [m.step for m in client.get_metric_history(children[trial["trial_id"]].info.run_id, "stage_val_dice_mean_regions")]
        for trial in (first, second)
    }
    assert sorted(history[first["trial_id"]]) == [1, 2]
    assert history[second["trial_id"]] == [1]
    # The stages of a trial are nested under the trial's run.
    stage_runs = _children(sweep, children[first["trial_id"]].info.run_id)
    assert sorted(run.info.run_name for run in stage_runs) == [f"{first['trial_id']}-stage_01", f"{first['trial_id']}-stage_02"]


def test_best_config_loads_and_the_champion_is_the_best_trials_student(sweep):
    first, _ = _valid_trials(sweep)
    best = load_config(sweep["root"] / "best_config.yaml")
    assert best.train.lr == GOOD_LR
    assert best.loss.tau_high == 0.15
    assert best.train.run_name == "sweep-test-best"
    assert best.train.storage_path == sweep["cfg"].train.storage_path  # a normal run, not inside the sweep
    client = sweep["client"]
    version = client.get_model_version_by_alias(sweep["cfg"].tracking.register_model, "champion")
    trial_runs = {run.info.run_name: run.info.run_id for run in _children(sweep, sweep["outcome"]["sweep_run_id"])}
    assert version.run_id == trial_runs[first["trial_id"]]
    assert client.get_run(sweep["outcome"]["sweep_run_id"]).data.tags["raysemi.best_trial"] == first["trial_id"]


def test_trials_read_the_shared_teacher_work_and_write_only_their_own_folder(sweep):
    root = sweep["root"]
    assert sorted(p.name for p in (root / "shared" / "pseudo").iterdir()) == ["v01"]  # never refined in place
    first, second = _valid_trials(sweep)
    for trial in (first, second):
        pseudo = root / "trials" / trial["trial_id"] / "pseudo"
        assert (pseudo / "v01").resolve() == (root / "shared" / "pseudo" / "v01").resolve()
    # The completed trial refined its pseudo-labels after each stage, in its own folder.
    first_pseudo = root / "trials" / first["trial_id"] / "pseudo"
    assert sorted(p.name for p in first_pseudo.iterdir()) == ["v01", "v01_masks", "v02", "v03"]
    # The trials sampled τ_h = 0.15 (base 0.2): their stage-1 masks follow 0.15 on the shared uncertainty.
    masks = sorted((root / "trials" / first["trial_id"] / "pseudo" / "v01_masks").glob("*_mask.nii.gz"))
    assert masks
    case_id = masks[0].name.removesuffix("_mask.nii.gz")
    u = np.asarray(nib.load(root / "shared" / "pseudo" / "v01" / f"{case_id}_uncertainty.nii.gz").get_fdata())
    with np.load(root / "shared" / "pseudo" / "v01" / f"{case_id}_probs.npz") as stored:
        (x0, y0, z0), (x1, y1, z1) = stored["box_start"], stored["box_end"]
    box = u[x0:x1, y0:y1, z0:z1]
    mask = np.asarray(nib.load(masks[0]).dataobj)[x0:x1, y0:y1, z0:z1]
    np.testing.assert_array_equal(mask == 1, box <= 0.15)
    np.testing.assert_array_equal(mask == 2, box >= 0.5)


def test_rerunning_the_finished_sweep_reruns_no_trial(sweep, tmp_path):
    from raysemi.cli import main

    root = sweep["root"]
    states = {p: p.stat().st_mtime_ns for p in (root / "trials").glob("*/state.json")}
    runs_before = len(_children(sweep, sweep["outcome"]["sweep_run_id"]))
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(sweep["cfg"].to_dict()))

    assert main(["tune", "--config", str(config_path)]) == 0

    assert {p: p.stat().st_mtime_ns for p in (root / "trials").glob("*/state.json")} == states
    assert len(_children(sweep, sweep["outcome"]["sweep_run_id"])) == runs_before
    after = {k: (t["status"], t["params"], t["last_stage"]) for k, t in _trials(sweep).items()}
    assert after == {t.trial_id: (t.status, t.params, t.last_stage) for t in sweep["outcome"]["trials"]}
    versions = sweep["client"].search_model_versions(f"name = '{sweep['cfg'].tracking.register_model}'")
    assert len(versions) == 1  # the champion is not registered twice
