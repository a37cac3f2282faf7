"""The training loop that every Ray Train worker runs, for the teacher and for each student stage.

Teacher and student differ only by their data (the student's stream also holds pseudo-labeled
patches, with their masks) and by where they start; the loss is :class:`~raysemi.semi.losses.DualLoss`,
which reduces to supervised Dice+CE on a batch without pseudo-labeled patches.

Per epoch: ``train_epoch`` -> ``validate`` (sliding window on this worker's share of the validation
cases, summed over workers) -> ``save_checkpoint`` + ``ray.train.report`` (every worker reports; rank 0
attaches the checkpoint) -> rank 0 logs metrics and plots to MLflow.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from monai.inferers import sliding_window_inference

from raysemi.config import RaysemiConfig
from raysemi.data.brats import CaseRecord
from raysemi.data.transforms import MASK_HIGH, MASK_LOW, preprocess_case
from raysemi.evaluation.metrics import DICE_KEYS, dice_per_region
from raysemi.model import build_model_from_config
from raysemi.semi.losses import DualLoss, sigmoid_rampup
from raysemi.train.checkpoint import TrainState, load_model_weights, load_train_state, save_checkpoint, unwrap

log = logging.getLogger(__name__)

TRAIN_LOSS_KEYS = ("loss", "loss_supervised", "loss_high", "loss_low", "lambda_low")


@dataclass
class TrainJob:
    """What one ``fit()`` trains; travels to the workers as a plain dict next to the config.

    Attributes:
        role: ``teacher``, ``student``, or ``mean_teacher`` (the baseline: its unlabeled patches
            get the EMA-teacher consistency loss instead of pseudo-labels).
        epochs: epochs of this fit.
        steps_per_epoch: optimiser steps per epoch on each worker.
        validation: validation case records (dicts).
        init_weights: checkpoint folder to initialise the model from (student from teacher), or None.
        mlflow_uri / mlflow_run_id: where rank 0 logs; None disables logging.
        step_offset: global step of the first step (the λ_l ramp runs over the whole student).
        epoch_offset: MLflow step of the first epoch (stages continue one curve).
        rampup_steps: steps of the λ_l sigmoid ramp-up.
        stage: curriculum stage (0 for the teacher).
        plots_dir: local folder for PNGs (rank 0).
    """

    role: str
    epochs: int
    steps_per_epoch: int
    validation: list[dict[str, Any]] = field(default_factory=list)
    init_weights: str | None = None
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    step_offset: int = 0
    epoch_offset: int = 0
    rampup_steps: int = 0
    stage: int = 0
    plots_dir: str | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: ``loop_config = {"cfg": RaysemiConfig dict, "job": TrainJob dict}``."""
    cfg = RaysemiConfig.from_dict(loop_config["cfg"], source="train_loop_config")
    job = TrainJob(**loop_config["job"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seed_everything(cfg.train.seed + 1000 * job.stage + rank)
    device = ray.train.torch.get_device()

    model = build_model_from_config(cfg.model)
    if job.init_weights:
        load_model_weights(job.init_weights, model)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    # Polynomial decay over the epochs of this fit, as nnU-Net does; stepped once per epoch.
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=job.epochs, power=0.9)
    loss_fn = DualLoss(
        tau_high=cfg.loss.tau_high,
        tau_low=cfg.loss.tau_low,
        lambda_high=cfg.loss.lambda_high,
        lambda_low=cfg.loss.lambda_low,
        rampup_steps=job.rampup_steps,
        eps=cfg.loss.eps,
        unlearn_background=cfg.loss.unlearn_background,
    )

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_model_weights(directory, model)
            state = load_train_state(directory, optimizer, scheduler)
        log.info("rank %d resumes %s at epoch %d", rank, job.role, state.epoch + 1)
        if rank == 0:
            _backfill_mlflow(job, state)

    use_amp = cfg.train.amp and device.type == "cuda"
    mean_teacher = MeanTeacher(model, cfg.loss.mean_teacher_ema, cfg.loss.mean_teacher_weight, job.rampup_steps) if job.role == "mean_teacher" else None
    batches = _batch_stream(cfg.train.batch_size)
    validation = [CaseRecord.from_dict(c) for c in job.validation][rank::world]

    for epoch in range(state.epoch, job.epochs):
        started = time.time()
        train_metrics = train_epoch(model, optimizer, loss_fn, batches, job, epoch, device, use_amp, mean_teacher)
        scheduler.step()
        val_metrics, example = validate(model, validation, cfg, device, use_amp)
        metrics = {
            **{f"train_{k}": v for k, v in train_metrics.items()},
            **{f"val_{k}": v for k, v in val_metrics.items()},
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.time() - started,
            "stage": job.stage,
        }
        state.epoch = epoch + 1
        state.history.append({**metrics, "global_epoch": job.epoch_offset + epoch + 1})
        score = metrics.get("val_dice_mean_regions", float("nan"))
        if score == score and score > state.best_metric:
            state.best_metric = score
        metrics["best_val_dice_mean_regions"] = state.best_metric
        meta = {"config": cfg.to_dict(), "role": job.role, "stage": job.stage, "metrics": metrics}
        if rank == 0:
            print(_progress_line(job, metrics), flush=True)
            # MLflow first, checkpoint second: a kill in between makes the resumed run log this epoch
            # again (a duplicate point) instead of never logging it.
            _log_to_mlflow(job, metrics, state, example)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(tmp, model, optimizer, scheduler, state, meta)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)


def _batch_stream(batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from this worker's shard; a finished stream starts over (re-executed lazily)."""
    shard = ray.train.get_dataset_shard("train")
    while True:
        empty = True
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False, prefetch_batches=2):
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the training stream is empty: every case failed to load (see the log)")


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: DualLoss,
    batches: Iterator[dict[str, torch.Tensor]],
    job: TrainJob,
    epoch: int,
    device: torch.device,
    use_amp: bool,
    mean_teacher: "MeanTeacher | None" = None,
) -> dict[str, float]:
    """``job.steps_per_epoch`` optimiser steps; returns mean loss parts."""
    model.train()
    sums = dict.fromkeys(TRAIN_LOSS_KEYS + ("loss_consistency",), 0.0)
    pseudo_share = 0.0
    for step_in_epoch in range(job.steps_per_epoch):
        batch = next(batches)
        image = batch["image"].to(device, non_blocking=True)
        target = batch["label"].to(device).long()
        mask = batch["mask"].to(device)
        is_pseudo = batch["is_pseudo"].to(device).bool()
        step = job.step_offset + epoch * job.steps_per_epoch + step_in_epoch
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(image)
        loss, parts = loss_fn(
            logits.float(), target, is_pseudo, high_mask=mask == MASK_HIGH, low_mask=mask == MASK_LOW, step=step
        )
        if mean_teacher is not None and is_pseudo.any():
            consistency = mean_teacher.consistency(logits.float()[is_pseudo], image[is_pseudo], step)
            loss = loss + consistency
            sums["loss_consistency"] += float(consistency.detach())
            sums["loss"] += float(consistency.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if mean_teacher is not None:
            mean_teacher.update(model, step)
        for key, part in zip(TRAIN_LOSS_KEYS, ("total", "supervised", "high", "low", "lambda_low")):
            sums[key] += parts[part]
        pseudo_share += float(is_pseudo.float().mean())
    steps = max(job.steps_per_epoch, 1)
    means = {k: v / steps for k, v in sums.items()}
    if mean_teacher is None:
        means.pop("loss_consistency")
    return {**means, "pseudo_patch_share": pseudo_share / steps}


class MeanTeacher:
    """The Mean Teacher baseline (Tarvainen & Valpola 2017, as in SSL4MIS): an EMA copy of the
    network predicts on noisy unlabeled patches; the student matches its softmax (MSE), with a
    sigmoid ramp-up of the consistency weight. It shares the model, data and loop with raysemi."""

    def __init__(self, model: torch.nn.Module, decay: float, weight: float, rampup_steps: int) -> None:
        import copy

        self.ema = copy.deepcopy(unwrap(model))
        for parameter in self.ema.parameters():
            parameter.requires_grad_(False)
        self.decay, self.weight, self.rampup_steps = decay, weight, rampup_steps

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Early on the EMA follows the student closely (SSL4MIS's alpha = min(1 - 1/(step+1), decay)).
        alpha = min(1.0 - 1.0 / (step + 1), self.decay)
        for ema_param, param in zip(self.ema.parameters(), unwrap(model).parameters()):
            ema_param.mul_(alpha).add_(param.detach(), alpha=1.0 - alpha)
        for ema_buffer, buffer in zip(self.ema.buffers(), unwrap(model).buffers()):
            ema_buffer.copy_(buffer)

    def consistency(self, student_logits: torch.Tensor, image: torch.Tensor, step: int) -> torch.Tensor:
        """w(t) · MSE(softmax(student), softmax(EMA teacher on the input plus clipped Gaussian noise))."""
        with torch.no_grad():
            noise = torch.clamp(torch.randn_like(image) * 0.1, -0.2, 0.2)
            self.ema.train()  # dropout on, as in SSL4MIS
            teacher_probs = torch.softmax(self.ema(image + noise).float(), dim=1)
        student_probs = torch.softmax(student_logits, dim=1)
        weight = self.weight * sigmoid_rampup(step, self.rampup_steps)
        return weight * torch.mean((student_probs - teacher_probs) ** 2)


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    cases: list[CaseRecord],
    cfg: RaysemiConfig,
    device: torch.device,
    use_amp: bool,
) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
    """Sliding-window Dice on this worker's validation cases, averaged over all workers.

    Returns the metrics and, for the first case, arrays for an overlay plot.
    """
    network = unwrap(model).eval()
    sums = torch.zeros(len(DICE_KEYS), dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    example = None
    for case in cases[: cfg.train.val_max_cases] if cfg.train.val_max_cases else cases:
        try:
            prepared = preprocess_case(case, with_seg=True)
        except Exception as exc:  # noqa: BLE001 - validated before the run; a disk error skips one case
            log.error("validation skips case %s: %s", case.case_id, exc)
            continue
        labels = predict_labels(network, prepared.image, cfg, device, use_amp)
        ref = torch.as_tensor(prepared.label, device=device)
        dice = dice_per_region(labels.to(device), ref)
        sums += torch.tensor([dice[k] for k in DICE_KEYS], dtype=torch.float64, device=device)
        count += 1
        if example is None:
            example = {"image": prepared.image, "pred": labels.cpu().numpy(), "ref": prepared.label}
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(count)
    network.train()
    if count.item() == 0:
        return {}, example
    means = (sums / count).cpu().tolist()
    return dict(zip([f"{k}" for k in DICE_KEYS], means)), example


def predict_labels(
    network: torch.nn.Module, image: np.ndarray, cfg: RaysemiConfig, device: torch.device, use_amp: bool
) -> torch.Tensor:
    """Deterministic (dropout off) sliding-window prediction: (4, x, y, z) image -> (x, y, z) labels."""
    x = torch.as_tensor(image, device=device)[None]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
        logits = sliding_window_inference(
            x,
            roi_size=tuple(cfg.data.patch_size),
            sw_batch_size=cfg.model.sw_batch_size,
            predictor=network,
            overlap=cfg.model.sw_overlap,
            mode="gaussian",
        )
    return logits.float().argmax(dim=1)[0]


def _progress_line(job: TrainJob, metrics: dict[str, float]) -> str:
    stage = f" stage {job.stage}" if job.role == "student" else ""
    val = metrics.get("val_dice_mean_regions", float("nan"))
    return (
        f"[raysemi] {job.role}{stage} epoch {int(metrics['epoch'])}/{job.epochs} "
        f"loss {metrics['train_loss']:.4f} val Dice (ET/TC/WT mean) {val:.4f} "
        f"({metrics['epoch_seconds']:.1f} s)"
    )


def _log_to_mlflow(job: TrainJob, metrics: dict[str, float], state: TrainState, example: dict | None) -> None:
    """Rank 0 only: per-epoch metrics, the learning curve and a validation overlay."""
    if not job.mlflow_uri or not job.mlflow_run_id:
        return
    from raysemi import tracking
    from raysemi.evaluation import plots

    try:
        step = job.epoch_offset + int(metrics["epoch"])
        tracking.log_metrics(job.mlflow_uri, job.mlflow_run_id, metrics, step=step)
        plots_dir = Path(job.plots_dir or tempfile.mkdtemp(prefix="raysemi-plots-"))
        name = f"stage_{job.stage:02d}" if job.role == "student" else job.role
        curve = plots.learning_curves(state.history, plots_dir / f"{name}_learning_curve.png")
        tracking.log_artifact(job.mlflow_uri, job.mlflow_run_id, curve, "plots")
        if example is not None:
            overlay = plots.segmentation_overlay(
                example["image"], plots_dir / f"{name}_validation_overlay.png", pred=example["pred"],
                ref=example["ref"], title=f"{name} epoch {int(metrics['epoch'])}: validation case",
            )
            tracking.log_artifact(job.mlflow_uri, job.mlflow_run_id, overlay, "plots")
    except Exception as exc:  # noqa: BLE001 - tracking must never kill a training run
        log.warning("MLflow logging failed (training goes on): %s", exc)


def _backfill_mlflow(job: TrainJob, state: TrainState) -> None:
    """After a resume, log the checkpointed epochs that MLflow never received (killed in between)."""
    if not job.mlflow_uri or not job.mlflow_run_id:
        return
    from raysemi import tracking

    try:
        logged = {step for step, _ in tracking.metric_history(job.mlflow_uri, job.mlflow_run_id, "epoch")}
        for entry in state.history:
            step = job.epoch_offset + int(entry["epoch"])
            if step not in logged:
                metrics = {k: v for k, v in entry.items() if k != "global_epoch"}
                tracking.log_metrics(job.mlflow_uri, job.mlflow_run_id, metrics, step=step)
    except Exception as exc:  # noqa: BLE001 - tracking must never kill a training run
        log.warning("MLflow back-fill failed (training goes on): %s", exc)


def steps_per_epoch(num_cases: int, patches_per_volume: int, batch_size: int, num_workers: int) -> int:
    """Optimiser steps per worker that cover each case's patches about once."""
    return max(1, math.floor(num_cases * patches_per_volume / (batch_size * num_workers)))


def epoch_steps(cfg: RaysemiConfig, num_cases: int) -> int:
    """``train.steps_per_epoch`` when set (fixed budgets), else one pass over the cases' patches."""
    if cfg.train.steps_per_epoch:
        return cfg.train.steps_per_epoch
    return steps_per_epoch(num_cases, cfg.data.patches_per_volume, cfg.train.batch_size, cfg.train.num_workers)


def stream_repeats(cfg: RaysemiConfig, num_cases: int, epochs: int, steps: int) -> int:
    """Passes over the cases the patch stream needs so that ``epochs x steps`` batches never run dry."""
    patches_needed = epochs * steps * cfg.train.batch_size * cfg.train.num_workers
    return max(epochs, math.ceil(patches_needed / max(1, num_cases * cfg.data.patches_per_volume)))


def job_dict(job: TrainJob) -> dict[str, Any]:
    return asdict(job)
