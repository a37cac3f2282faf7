"""Benchmark (issue 10): teacher-loop steps/s under Ray Train (1 worker) vs the same loop in plain PyTorch.

Both runs execute :func:`timed_training`: the same seeded tiny TransASPP-UNet, AdamW, DualLoss and
:func:`raysemi.train.loop.train_epoch` over the same in-memory batches (random images, random
labels, every voxel confident), with the same torch thread count. Only the host differs:

- **plain**: this process;
- **Ray Train**: a ``TorchTrainer`` with one worker (``prepare_model`` as the real loop does) on a
  local Ray; the worker times its own steps, so Ray's start-up (worker group, process group,
  imports) is excluded from steps/s and reported apart.

Warm-up steps are excluded from the timing. The plain run goes before and after the Ray run and
the baseline is their mean, so a machine load that drifts does not favour one side. Both runs also
report their mean loss: the same seed, batches and loop give the same losses, which shows both did
the same work.

Ray gives a worker ``OMP_NUM_THREADS`` = its CPUs; the worker asks for ``--threads`` CPUs and sets
``torch.set_num_threads(--threads)`` explicitly, as the plain run does.

Usage::

    python benchmarks/train_step.py [--quick] [--out benchmarks/out/train_step.json]

Target (issue 10, printed, never asserted): Ray Train >= 0.9x plain PyTorch steps/s.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from typing import Any

from _common import benchmark_parser, compare, fill_size_defaults, machine_info, write_report

NAME = "train_step"


# Everything below down to the driver runs inside the Ray Train worker too. Functions defined in
# this script travel to the worker by value (cloudpickle), so they must not use _common, which the
# worker cannot import.
def make_batches(seed: int, count: int, batch_size: int, patch: int) -> list[dict[str, Any]]:
    """``count`` distinct in-memory batches: image (B, 4, P, P, P) float32, label (B, P, P, P) uint8,
    mask (B, P, P, P) uint8 all MASK_HIGH, is_pseudo (B,) bool all False (labeled teacher patches)."""
    import torch

    from raysemi.data.transforms import MASK_HIGH

    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, patch, patch, patch)
    return [
        {
            "image": torch.randn((batch_size, 4, patch, patch, patch), generator=generator),
            "label": torch.randint(0, 4, shape, generator=generator, dtype=torch.uint8),
            "mask": torch.full(shape, MASK_HIGH, dtype=torch.uint8),
            "is_pseudo": torch.zeros(batch_size, dtype=torch.bool),
        }
        for _ in range(count)
    ]


def timed_training(settings: dict[str, Any], in_ray: bool) -> dict[str, Any]:
    """Build the teacher's model, optimiser and loss; run warm-up steps, then time ``steps`` steps.

    Args:
        settings: seed, patch, batch_size, batches, warmup, steps, threads.
        in_ray: inside a Ray Train worker: ``prepare_model`` and Ray's device.

    Returns:
        steps_per_s, step time, mean loss of the timed steps, torch threads and device.
    """
    import torch

    from raysemi.config import RaysemiConfig
    from raysemi.model import build_model_from_config
    from raysemi.semi.losses import DualLoss
    from raysemi.train.loop import TrainJob, seed_everything, train_epoch

    torch.set_num_threads(settings["threads"])
    cfg = RaysemiConfig.from_dict({"model": {"preset": "tiny"}, "data": {"patch_size": [settings["patch"]] * 3}})
    seed_everything(settings["seed"])
    model = build_model_from_config(cfg.model)
    if in_ray:
        import ray.train.torch

        device = ray.train.torch.get_device()
        model = ray.train.torch.prepare_model(model)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = DualLoss(cfg.loss.tau_high, cfg.loss.tau_low, cfg.loss.lambda_high, cfg.loss.lambda_low)
    use_amp = cfg.train.amp and device.type == "cuda"
    batches = itertools.cycle(
        make_batches(settings["seed"], settings["batches"], settings["batch_size"], settings["patch"])
    )

    warmup = TrainJob(role="teacher", epochs=1, steps_per_epoch=settings["warmup"])
    train_epoch(model, optimizer, loss_fn, batches, warmup, 0, device, use_amp)
    timed = TrainJob(role="teacher", epochs=1, steps_per_epoch=settings["steps"], step_offset=settings["warmup"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    metrics = train_epoch(model, optimizer, loss_fn, batches, timed, 0, device, use_amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "steps": settings["steps"],
        "seconds": seconds,
        "steps_per_s": settings["steps"] / seconds,
        "seconds_per_step": seconds / settings["steps"],
        "loss_mean": metrics["loss"],
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "amp": use_amp,
    }


def ray_train_loop(settings: dict[str, Any]) -> None:
    """``train_loop_per_worker``: records when the loop was entered, then times the same training."""
    import ray.train

    entered_at = time.time()
    result = timed_training(settings, in_ray=True)
    metrics = {**result, "entered_loop_at": entered_at, "finished_loop_at": time.time()}
    # Ray Train v2 keeps only the metrics reported with a checkpoint (Result.metrics), so a small one goes along.
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "timing.txt"), "w") as handle:
            handle.write(repr(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def run_ray_train(settings: dict[str, Any], storage: str) -> dict[str, Any]:
    """One TorchTrainer fit with one worker; start-up = fit() called -> loop entered."""
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpu = torch.cuda.is_available()
    # One logical CPU more than the worker's, for Ray Train's controller.
    ray.init(num_cpus=settings["threads"] + 1, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(settings["threads"])}})
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config=settings,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu,
                                     resources_per_worker={"CPU": settings["threads"], **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name="train_step_benchmark", storage_path=storage),
    )
    fit_called = time.time()
    result = trainer.fit()
    fit_returned = time.time()
    ray.shutdown()
    if not result.metrics:
        raise RuntimeError(f"the Ray Train worker reported no timing (error: {result.error})")
    metrics = dict(result.metrics)
    metrics["startup_s"] = metrics["entered_loop_at"] - fit_called
    metrics["shutdown_s"] = fit_returned - metrics["finished_loop_at"]
    metrics["fit_wall_s"] = fit_returned - fit_called
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, help="patch side (default 64; quick 32)")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per step")
    parser.add_argument("--batches", type=int, default=4, help="distinct in-memory batches, cycled")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; quick 1)")
    parser.add_argument("--steps", type=int, help="timed steps (default 20; quick 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in both runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the batches")
    args = parser.parse_args(argv)
    fill_size_defaults(args, quick=dict(patch=32, warmup=1, steps=4), full=dict(patch=64, warmup=3, steps=20))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray of our own, never a user's cluster
    settings = {k: getattr(args, k) for k in ("seed", "patch", "batch_size", "batches", "warmup", "steps", "threads")}
    machine_before = machine_info()

    # Plain, Ray, plain again: the baseline is the mean of the runs before and after, so that a load
    # that drifts during the benchmark does not favour whichever run came first.
    print(f"plain PyTorch: {args.warmup} warm-up + {args.steps} timed steps, batch {args.batch_size} x "
          f"{args.patch}^3, {args.threads} threads ...", flush=True)
    plain_before = timed_training(settings, in_ray=False)
    print(f"  {plain_before['steps_per_s']:.3f} steps/s", flush=True)
    print("Ray Train, 1 worker ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="raysemi-bench-train-") as storage:
        ray_result = run_ray_train(settings, storage)
    print(f"  {ray_result['steps_per_s']:.3f} steps/s (start-up {ray_result['startup_s']:.1f} s excluded)", flush=True)
    print("plain PyTorch again ...", flush=True)
    plain_after = timed_training(settings, in_ray=False)
    print(f"  {plain_after['steps_per_s']:.3f} steps/s", flush=True)
    plain = {**plain_before, "steps_per_s": (plain_before["steps_per_s"] + plain_after["steps_per_s"]) / 2,
             "steps_per_s_before": plain_before["steps_per_s"], "steps_per_s_after": plain_after["steps_per_s"]}
    plain["seconds_per_step"] = 1 / plain["steps_per_s"]

    same_losses = abs(plain["loss_mean"] - ray_result["loss_mean"]) <= 1e-4 * max(1.0, abs(plain["loss_mean"]))
    notes = [
        f"Ray Train start-up (fit() -> loop entered) {ray_result['startup_s']:.1f} s and shut-down "
        f"{ray_result['shutdown_s']:.1f} s are excluded from steps/s; they are paid once per fit.",
        f"Mean loss of the timed steps: plain {plain['loss_mean']:.6f}, Ray Train {ray_result['loss_mean']:.6f} "
        f"({'equal: same work' if same_losses else 'DIFFERENT: the runs did not do the same work'}).",
        f"torch threads: plain {plain['torch_threads']}, Ray worker {ray_result['torch_threads']}.",
    ]
    print("\nResults:")
    comparisons = [
        compare("Ray Train (1 worker) teacher loop", ray_result["steps_per_s"],
                "plain PyTorch, same loop (mean of before/after)", plain["steps_per_s"], "steps/s", target=0.9),
    ]
    for note in notes:
        print(f"  {note}")
    machine = {**machine_before, "load_average_after": machine_info()["load_average"]}
    results = {"plain": plain, "plain_before": plain_before, "plain_after": plain_after, "ray_train": ray_result}
    write_report(args.out, NAME, args.quick, settings, results, comparisons, notes,
                 machine=machine)


if __name__ == "__main__":
    sys.exit(main())
