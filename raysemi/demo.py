"""``raysemi demo``: generate a small two-site data set and run the pipeline on it."""

from __future__ import annotations

from pathlib import Path

from raysemi.config import RaysemiConfig


def demo(cfg: RaysemiConfig, cases: int = 20, shape: tuple[int, int, int] = (64, 64, 64), teacher_only: bool = False) -> None:
    """Write two-site phantoms into ``data.root`` (once), then train (teacher, or the whole method).

    The demo mirrors the setting where the method pays off: labeled scans from hospital A, unlabeled
    and validation scans from hospital B (another scanner and protocol). ``cases`` is split 40 % A,
    60 % B.
    """
    from raysemi.data.synth import synth_dataset

    root = Path(cfg.data.root)
    if not root.exists() or not any(root.iterdir()):
        sites = {"A": max(1, round(0.4 * cases)), "B": max(2, cases - round(0.4 * cases))}
        print(f"[raysemi] generating demo cases {sites} of shape {shape} in {root} ...", flush=True)
        synth_dataset(root, None, shape, spacing=None, seed=cfg.data.seed, sites=sites, png=True)
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
