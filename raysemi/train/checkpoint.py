"""Checkpoints: model, optimizer, scheduler, epoch and best metric <-> a folder / ``ray.train.Checkpoint``.

Layout of a raysemi checkpoint folder:

- ``model.pt``: the model's ``state_dict`` (tensors only);
- ``train_state.pt``: optimizer and scheduler state, epoch, best metric (tensors and numbers only);
- ``meta.json``: the config the model was built with, role, epoch, metrics and the learning history.

Everything is loaded with ``torch.load(weights_only=True)``: a checkpoint cannot run code when it
is read. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raysemi.atomic import atomic_path, atomic_write_json

MODEL_FILE, TRAIN_STATE_FILE, META_FILE = "model.pt", "train_state.pt", "meta.json"


@dataclass
class TrainState:
    """What a resumed run needs besides the weights."""

    epoch: int = 0  # epochs finished
    best_metric: float = float("-inf")
    history: list[dict[str, float]] = field(default_factory=list)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel, if any."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    state: TrainState,
    meta: dict[str, Any],
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / MODEL_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, tmp)
    train_state = {
        "epoch": state.epoch,
        "best_metric": state.best_metric,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    with atomic_path(directory / TRAIN_STATE_FILE) as tmp:
        torch.save(train_state, tmp)
    atomic_write_json(
        directory / META_FILE,
        {**meta, "epoch": state.epoch, "best_metric": state.best_metric, "history": state.history},
    )
    return directory


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a raysemi checkpoint (missing {META_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt checkpoint metadata ({exc})") from None


def load_model_weights(directory: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load ``model.pt`` into ``model`` (weights only, on CPU first)."""
    path = Path(directory) / MODEL_FILE
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(state_dict)


def load_train_state(
    directory: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> TrainState:
    """Restore optimizer/scheduler in place and return epoch, best metric and history."""
    raw = torch.load(Path(directory) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None and raw.get("optimizer") is not None:
        optimizer.load_state_dict(raw["optimizer"])
    if scheduler is not None and raw.get("scheduler") is not None:
        scheduler.load_state_dict(raw["scheduler"])
    meta = load_meta(directory)
    return TrainState(epoch=int(raw["epoch"]), best_metric=float(raw["best_metric"]), history=meta.get("history", []))


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model recorded in ``meta.json`` and load its weights; returns (model in eval mode, meta)."""
    from raysemi.config import RaysemiConfig
    from raysemi.model import build_model_from_config

    meta = load_meta(directory)
    cfg = RaysemiConfig.from_dict(meta["config"], source=str(Path(directory) / META_FILE))
    model = build_model_from_config(cfg.model)
    load_model_weights(directory, model)
    return model.to(device).eval(), meta
