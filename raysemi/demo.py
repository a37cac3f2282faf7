"""``raysemi demo``: generate a small two-site data set and run the pipeline on it."""

from __future__ import annotations

from pathlib import Path

from raysemi.config import RaysemiConfig


def demo(cfg: RaysemiConfig, cases: int = 20, shape: tuple[int, int, int] = (64, 64, 64), teacher_only: bool = False) -> None:
    """Write ``cases`` phantoms into ``data.root`` (once), then train (teacher, or the whole method)."""
    from raysemi.data.synth import synth_dataset

    root = Path(cfg.data.root)
    if not root.exists() or not any(root.iterdir()):
        print(f"[raysemi] generating {cases} demo cases of shape {shape} in {root} ...", flush=True)
        synth_dataset(root, cases, shape, spacing=(1.5, 1.5, 1.5), seed=cfg.data.seed, sites=("A",), png=True)
    else:
        print(f"[raysemi] using the demo cases already in {root}", flush=True)
    if teacher_only:
        from raysemi.train.pipeline import train_teacher_command

        train_teacher_command(cfg)
    else:
        from raysemi.train.semi_pipeline import run_command

        run_command(cfg)
    uri = cfg.tracking_uri()
    print(f"\nLook at the runs: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
