"""A nested MLflow run created by a driver killed before it recorded the id is adopted, not duplicated."""

from __future__ import annotations

from raysemi import tracking


def test_find_child_run_finds_only_that_parents_child_of_that_name(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.create_run(uri, "exp", "pipeline")
    other_parent = tracking.create_run(uri, "exp", "other pipeline")
    child = tracking.create_run(uri, "exp", "demo-stage_02", {"raysemi.stage": 2}, parent)
    tracking.create_run(uri, "exp", "demo-stage_02", {"raysemi.stage": 2}, other_parent)

    assert tracking.find_child_run(uri, "exp", parent, "demo-stage_02") == child
    assert tracking.find_child_run(uri, "exp", parent, "demo-stage_03") is None
    assert tracking.find_child_run(uri, "exp", tracking.create_run(uri, "exp", "empty"), "demo-stage_02") is None
