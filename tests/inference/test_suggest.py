"""``raysemi suggest-labels``: one batch-inference run over five unlabeled and one labeled case."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raysemi.errors import DataError
from raysemi.inference.commands import suggest_labels
from tests.helpers import tiny_config
from tests.inference import make_checkpoint, read_csv, run_cli, synth_case

UNLABELED = [f"scan_{index}" for index in range(5)]
K = 3


@pytest.fixture(scope="module")
def suggested(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("suggest")
    cases = root / "cases"
    cfg = tiny_config(cases, root / "store")
    checkpoint = make_checkpoint(root / "checkpoint", cfg, seed=1)
    for index, case_id in enumerate(UNLABELED):
        synth_case(cases, case_id, seed=10 + index)
    synth_case(cases, "annotated", seed=20, labeled=True)
    out = root / "out"
    status, stdout = run_cli([
        "suggest-labels", "--model", str(checkpoint), "--input", str(cases), "-k", str(K), "--output", str(out),
        "--set", "model.mc_passes=2", "--set", "train.inference_actors=2",
    ])
    return SimpleNamespace(status=status, stdout=stdout, out=out, cases=cases, cfg=cfg, checkpoint=checkpoint)


def test_only_unlabeled_cases_are_predicted(suggested):
    assert suggested.status == 0
    predictions = read_csv(suggested.out / "predictions.csv")
    assert sorted(row["case_id"] for row in predictions) == UNLABELED
    assert not (suggested.out / "annotated").exists()


def test_suggestions_are_the_k_least_confident(suggested):
    predictions = {row["case_id"]: row["confidence"] for row in read_csv(suggested.out / "predictions.csv")}
    suggestions = read_csv(suggested.out / "suggestions.csv")
    assert [row["rank"] for row in suggestions] == ["1", "2", "3"]
    confidences = [float(row["confidence"]) for row in suggestions]
    assert confidences == sorted(confidences)
    # Same values as predict's CSV, and nothing left out is less confident than a suggestion.
    assert all(row["confidence"] == predictions[row["case_id"]] for row in suggestions)
    not_suggested = set(predictions) - {row["case_id"] for row in suggestions}
    assert min(float(predictions[case_id]) for case_id in not_suggested) >= confidences[-1]


def test_each_suggestion_has_an_overlay_and_a_table_row(suggested):
    for row in read_csv(suggested.out / "suggestions.csv"):
        case_id = row["case_id"]
        assert row["overlay_png"] == f"{case_id}/{case_id}_overlay.png"
        assert (suggested.out / row["overlay_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"| {row['rank']} | {case_id} |" in suggested.stdout


def test_k_below_one_is_refused_before_inference(suggested, tmp_path):
    with pytest.raises(DataError, match="-k must be at least 1"):
        suggest_labels(suggested.cfg, str(suggested.checkpoint), suggested.cases, 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_of_labeled_cases_has_nothing_to_suggest(tmp_path):
    synth_case(tmp_path / "cases", "annotated", seed=20, labeled=True)
    with pytest.raises(DataError, match="nothing to suggest"):
        suggest_labels(tiny_config(tmp_path, tmp_path), "unused", tmp_path / "cases", 2, tmp_path / "out")
