"""MC-dropout pseudo-labels are reproducible: the same case, teacher and seed give the same files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from raysemi.data.brats import discover_cases
from raysemi.inference.batch import case_rows
from raysemi.inference.predictor import PseudoLabeler
from tests.helpers import tiny_config
from tests.inference import make_checkpoint, synth_case


def _pseudo_label(checkpoint, cfg, case_dir, out_dir):
    rows = case_rows(discover_cases(case_dir))
    labeler = PseudoLabeler(str(checkpoint), cfg.to_dict(), str(out_dir))
    result = json.loads(labeler({key: np.array([value]) for key, value in rows[0].items()})["result_json"][0])
    assert result["error"] == "", result
    uncertainty = np.asarray(nib.load(result["uncertainty_path"]).dataobj)
    label = np.asarray(nib.load(result["label_path"]).dataobj)
    return result["confidence"], label, uncertainty


def test_the_same_seed_gives_the_same_pseudo_label_and_another_seed_other_dropout(tmp_path):
    cases = tmp_path / "cases"
    synth_case(cases, "case_a", seed=1)
    cfg = tiny_config(cases, tmp_path / "store", model={"mc_passes": 4})
    checkpoint = make_checkpoint(tmp_path / "checkpoint", cfg)

    first = _pseudo_label(checkpoint, cfg, cases, tmp_path / "first")
    second = _pseudo_label(checkpoint, cfg, cases, tmp_path / "second")
    assert first[0] == second[0]
    assert np.array_equal(first[1], second[1])
    assert np.array_equal(first[2], second[2])

    other_seed = cfg.with_overrides({"train.seed": 1})
    third = _pseudo_label(checkpoint, other_seed, cases, tmp_path / "third")
    # Dropout is on (4 passes): other masks give another uncertainty map.
    assert not np.array_equal(first[2], third[2])
