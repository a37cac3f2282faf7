"""Loading a checkpoint never runs code: a file holding a pickled object is refused.

A checkpoint may come from shared storage, a Ray worker on another node or an MLflow artifact store,
so raysemi reads it with ``torch.load(weights_only=True)``. The payload below writes a file when it is
unpickled; the control test shows that a plain ``torch.load`` would run it, and the real tests show
that raysemi's loaders refuse the file and the payload never runs. The last test scans the package for
any other way of unpickling a file.
"""

from __future__ import annotations

import ast
import pathlib
import pickle
from pathlib import Path

import pytest
import torch

from raysemi.train.checkpoint import (
    MODEL_FILE,
    TRAIN_STATE_FILE,
    TrainState,
    load_model_weights,
    load_train_state,
    save_checkpoint,
)

PACKAGE = Path(__file__).resolve().parents[2] / "raysemi"


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: stands in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class _Settings:
    """A harmless user class: still not plain data, so still refused."""

    def __init__(self) -> None:
        self.lr = 0.1


def _good_checkpoint(directory: Path) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(directory, model, optimizer, None, TrainState(epoch=2, best_metric=0.5), {"role": "teacher"})
    return model


def test_control_a_plain_torch_load_runs_the_payload(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"weight": torch.zeros(2, 3), "payload": _Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_genuine_checkpoint_loads(tmp_path):
    saved = _good_checkpoint(tmp_path)
    model = torch.nn.Linear(3, 2)
    load_model_weights(tmp_path, model)
    torch.testing.assert_close(model.weight, saved.weight)
    state = load_train_state(tmp_path, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert (state.epoch, state.best_metric) == (2, 0.5)


@pytest.mark.parametrize("make_object", [_Payload, lambda marker: _Settings()], ids=["code", "class-instance"])
def test_model_weights_with_a_pickled_object_are_refused(tmp_path, make_object):
    _good_checkpoint(tmp_path)
    marker = tmp_path / "ran"
    state_dict = torch.nn.Linear(3, 2).state_dict()
    torch.save({**state_dict, "extra": make_object(marker)}, tmp_path / MODEL_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model_weights(tmp_path, torch.nn.Linear(3, 2))
    assert not marker.exists()


@pytest.mark.parametrize("make_object", [_Payload, lambda marker: _Settings()], ids=["code", "class-instance"])
def test_train_state_with_a_pickled_object_is_refused(tmp_path, make_object):
    _good_checkpoint(tmp_path)
    marker = tmp_path / "ran"
    torch.save({"epoch": 2, "best_metric": 0.5, "optimizer": None, "scheduler": make_object(marker)}, tmp_path / TRAIN_STATE_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_train_state(tmp_path)
    assert not marker.exists()


def _unsafe_loads(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that can unpickle a file: pickle-family ``load(s)``, ``torch.load`` without a literal
    ``weights_only=True``, ``np.load(allow_pickle=True)``, ``mlflow.pytorch.load_model``, ``yaml.load``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = ast.unparse(node.func.value)
        name = node.func.attr
        keywords = {kw.arg: kw.value for kw in node.keywords}

        def is_true(key: str) -> bool:
            return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True

        unsafe = (
            (owner in {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "ray.cloudpickle"} and name in {"load", "loads"})
            or (owner == "torch" and name == "load" and not is_true("weights_only"))
            or (owner in {"np", "numpy"} and name == "load" and "allow_pickle" in keywords and not (
                isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False))
            or (owner == "mlflow.pytorch" and name == "load_model")
            or (owner == "yaml" and name in {"load", "unsafe_load", "full_load"})
        )
        if unsafe:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_scan_finds_each_kind_of_unsafe_load():
    source = (
        "pickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
        "mlflow.pytorch.load_model(uri)\nyaml.load(text)\n"
        "torch.load(p, weights_only=True)\nnp.load(p)\nyaml.safe_load(text)\n"
    )
    assert [line for line, _ in _unsafe_loads(ast.parse(source))] == [1, 2, 3, 4, 5, 6]


def test_the_package_unpickles_no_file():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {call}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, call in _unsafe_loads(ast.parse(path.read_text()))
    ]
    assert not offenders, "\n".join(offenders)
