"""Profile (issue 10 item 5): where the per-case work of ``raysemi run`` spends its time.

Runs each hot path of the pipeline in this one process (no Ray, so that one sampling profiler sees
all of it), on the same generated cases, with an untrained tiny model (the work per case does not
depend on the weights):

- ``patches``: :func:`raysemi.data.pipeline.patches_for_row`, the Ray Data task that decodes a case
  and cuts its training patches (labeled cases and pseudo-labeled cases);
- ``pseudo_label``: :class:`~raysemi.inference.predictor.PseudoLabeler` (T MC passes, sliding window,
  files written);
- ``refine``: :class:`~raysemi.inference.predictor.Refiner` (student MC passes + agreement refinement);
- ``evaluate``: :class:`~raysemi.inference.predictor.Evaluator` (one pass + Dice/HD95);
- ``train_step``: forward + backward + AdamW step of the tiny model on a batch of patches, with the
  dual loss (the Ray Train worker's inner loop, without Ray).

It prints wall seconds per path and per case. With ``--py-spy`` it reruns itself under
``py-spy record`` (raw, collapsed stacks) and adds, per path, the functions with the most samples
(inclusive: a function and what it calls) and the most *own* samples, grouped by library.

Usage::

    python benchmarks/profile_hot_paths.py [--quick] [--py-spy] [--cases 6] [--size 96]

Writes ``benchmarks/out/profile_hot_paths.json`` (and ``.md``); ``--out`` chooses another JSON path.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import benchmark_parser, compare, fill_size_defaults, machine_info, machine_line, write_report

NAME = "profile_hot_paths"
PATHS = ("patches", "pseudo_label", "refine", "evaluate", "train_step")


def make_config(args: argparse.Namespace, storage: str) -> Any:
    from raysemi.config import RaysemiConfig

    return RaysemiConfig.from_dict({
        "data": {"root": "unused", "patch_size": [args.patch] * 3, "patches_per_volume": 2},
        "model": {"preset": "tiny", "mc_passes": args.passes, "sw_batch_size": 2},
        "train": {"storage_path": storage},
    })


def save_untrained_checkpoint(cfg: Any, directory: Path) -> None:
    import torch

    from raysemi.model import build_model_from_config
    from raysemi.train.checkpoint import TrainState, save_checkpoint

    torch.manual_seed(0)
    model = build_model_from_config(cfg.model)
    save_checkpoint(directory, model, None, None, TrainState(), {"config": cfg.to_dict(), "role": "teacher"})


def one_row(row: dict[str, Any]) -> dict[str, np.ndarray]:
    return {key: np.array([value]) for key, value in row.items()}


def run_paths(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every hot path once over the cases; returns wall seconds per path."""
    import torch

    from raysemi.data.brats import discover_cases
    from raysemi.data.pipeline import PatchSpec, TrainingItem, patches_for_row
    from raysemi.inference.batch import case_rows
    from raysemi.inference.predictor import Evaluator, PseudoLabeler, Refiner
    from raysemi.model import build_model_from_config
    from raysemi.semi.losses import DualLoss, decode_masks

    cfg = make_config(args, str(work))
    checkpoint = work / "checkpoint"
    save_untrained_checkpoint(cfg, checkpoint)
    cases = discover_cases(args.data)
    rows = case_rows(cases, score_truth={c.case_id: True for c in cases})
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        started = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - started
        print(f"  {name}: {seconds[name]:.2f} s ({seconds[name] / len(cases):.2f} s per case)", flush=True)
        return result

    labeler = PseudoLabeler(str(checkpoint), cfg.to_dict(), str(work / "pseudo" / "v01"))
    if args.compare_whole_passes:
        # Baseline of the fix this profile led to: every MC pass runs the whole network, encoder included.
        from raysemi.semi import uncertainty

        shared_encoder = uncertainty._deterministic_encoder
        uncertainty._deterministic_encoder = lambda model: False
        try:
            timed("pseudo_label_whole_passes", lambda: [labeler(one_row(row)) for row in rows])
        finally:
            uncertainty._deterministic_encoder = shared_encoder
    pseudo = timed("pseudo_label", lambda: [json.loads(r) for row in rows for r in labeler(one_row(row))["result_json"]])
    failed = [p for p in pseudo if p.get("error")]
    if failed:
        raise RuntimeError(f"pseudo-labeling failed: {failed[0]['error']}")

    spec = PatchSpec.from_config(cfg.data, seed=0).__dict__
    items = [TrainingItem(case) for case in cases] + [
        TrainingItem(case, pseudo_label=p["label_path"], mask=p["mask_path"]) for case, p in zip(cases, pseudo)
    ]
    patches = timed("patches", lambda: [patch for item in items for patch in patches_for_row(item.to_row(0), spec)])

    refiner = Refiner(str(checkpoint), cfg.to_dict(), str(work / "pseudo"))
    refine_rows = [{**row, "label_path": p["label_path"], "probs_path": p["probs_path"], "confidence": p["confidence"],
                    "version": 1} for row, p in zip(rows, pseudo)]
    timed("refine", lambda: [refiner(one_row(row)) for row in refine_rows])

    evaluator = Evaluator(str(checkpoint), cfg.to_dict())
    timed("evaluate", lambda: [evaluator(one_row(row)) for row in rows])

    torch.manual_seed(0)
    model = build_model_from_config(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = DualLoss()
    batches = [patches[i : i + 2] for i in range(0, len(patches) - 1, 2)][: args.steps]

    def train_steps() -> None:
        model.train()
        for batch in batches:
            image = torch.as_tensor(np.stack([p["image"] for p in batch]))
            label = torch.as_tensor(np.stack([p["label"] for p in batch])).long()
            high, low = decode_masks(np.stack([p["mask"] for p in batch]))
            is_pseudo = torch.as_tensor([bool(p["is_pseudo"]) for p in batch])
            loss, _ = loss_fn(model(image), label, is_pseudo, high, low)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    timed("train_step", train_steps)
    seconds["train_steps"] = len(batches)
    return {"seconds": seconds, "cases": len(cases), "patches": len(patches)}


# ------------------------------------------------------------------------------------------------
# py-spy: raw collapsed stacks -> top functions per path
# ------------------------------------------------------------------------------------------------
def frame_name(frame: str) -> str:
    """``fn (path/to/module.py:123)`` -> ``module.fn``, with the library (raysemi, monai, torch, ...)."""
    name, _, where = frame.partition(" (")
    path = where.split(":")[0]
    for marker in ("site-packages/", "/raysemi/", "benchmarks/"):
        if marker in path:
            path = path.split(marker, 1)[1] if marker == "site-packages/" else marker.strip("/") + "/" + path.split(marker, 1)[1]
            break
    module = path.removesuffix(".py").replace("/", ".")
    return f"{module}.{name}"


def summarise_profile(raw: Path, top: int) -> dict[str, Any]:
    """Samples per hot path: the inclusive and own top functions.

    ``--format raw`` has no timestamps, so each sample goes to the path whose entry function is in its
    stack (the paths run one after another).
    """
    markers = {
        "pseudo_label": "PseudoLabeler", "refine": "Refiner", "evaluate": "Evaluator",
        "patches": "patches_for_row", "train_step": "train_steps",
    }
    inclusive: dict[str, collections.Counter] = {p: collections.Counter() for p in PATHS}
    own: dict[str, collections.Counter] = {p: collections.Counter() for p in PATHS}
    totals = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(f) for f in stack.split(";")]
        path = next((p for p, m in markers.items() if any(m in f for f in frames)), None)
        if path is None:
            continue
        n = int(count)
        totals[path] += n
        for f in set(frames):
            inclusive[path][f] += n
        own[path][frames[-1]] += n
    out = {}
    for path in PATHS:
        total = totals[path] or 1
        out[path] = {
            "samples": totals[path],
            "inclusive": [(f, round(c / total, 3)) for f, c in inclusive[path].most_common(top * 3)
                          if f.startswith(("raysemi.", "monai.", "nibabel.", "numpy.", "scipy.", "torch.nn.functional"))][:top],
            "own": [(f, round(c / total, 3)) for f, c in own[path].most_common(top)],
        }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, help="generated cases (default 6; quick 2)")
    parser.add_argument("--size", type=int, help="generated volume side (default 96; quick 48)")
    parser.add_argument("--patch", type=int, help="patch / sliding-window side (default 64; quick 32)")
    parser.add_argument("--passes", type=int, default=8, help="MC-dropout passes T")
    parser.add_argument("--steps", type=int, default=8, help="training steps of 2 patches")
    parser.add_argument("--top", type=int, default=8, help="functions listed per path")
    parser.add_argument("--py-spy", action="store_true", help="sample the run with py-spy (pip install py-spy)")
    parser.add_argument("--compare-whole-passes", action="store_true",
                        help="also time pseudo-labeling with whole-network MC passes (before the encode-once fix)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.py_spy and args.compare_whole_passes:
        parser.error("--py-spy and --compare-whole-passes go in separate runs (the profile would mix both pseudo-labelings)")
    fill_size_defaults(args, quick=dict(cases=2, size=48, patch=32), full=dict(cases=6, size=96, patch=64))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        result = run_paths(args, Path(args.work))
        (Path(args.work) / "result.json").write_text(json.dumps(result))
        return
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="raysemi-profile-") as tmp:
        tmp_dir = Path(tmp)
        from raysemi.data.synth import synth_dataset

        data = tmp_dir / "cases"
        synth_dataset(str(data), args.cases, (args.size,) * 3, seed=0, sites=("A",), workers=1)
        work = tmp_dir / "work"
        work.mkdir()
        child = [sys.executable, __file__, "--child", "--data", str(data), "--work", str(work), "--cases", str(args.cases),
                 "--size", str(args.size), "--patch", str(args.patch), "--passes", str(args.passes), "--steps", str(args.steps)]
        child += ["--compare-whole-passes"] if args.compare_whole_passes else []
        raw = tmp_dir / "profile.txt"
        if args.py_spy:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            if not Path(py_spy).exists() and shutil.which("py-spy") is None:
                sys.exit("py-spy is not installed: pip install py-spy")
            child = [py_spy, "record", "--format", "raw", "--rate", "50", "--output", str(raw), "--"] + child
        print(f"{args.cases} cases of {args.size}^3, patch {args.patch}^3, T={args.passes}"
              + (" (under py-spy)" if args.py_spy else ""), flush=True)
        subprocess.run(child, check=True)
        result = json.loads((work / "result.json").read_text())
        profile = summarise_profile(raw, args.top) if args.py_spy else None
    lines = [f"# Hot paths of `raysemi run`, one process, no Ray\n", machine_line(machine) + "\n",
             f"{result['cases']} generated cases of {args.size}^3, patch {args.patch}^3, T = {args.passes} MC passes, "
             f"{result['seconds']['train_steps']} training steps of 2 patches; untrained tiny model.\n",
             "| path | seconds | per case |", "| --- | --- | --- |"]
    for path in ("pseudo_label_whole_passes", *PATHS):
        if path in result["seconds"]:
            s = result["seconds"][path]
            lines.append(f"| {path} | {s:.2f} | {s / result['cases']:.2f} |")
    if "pseudo_label_whole_passes" in result["seconds"]:
        ratio = result["seconds"]["pseudo_label_whole_passes"] / result["seconds"]["pseudo_label"]
        result["encode_once_speedup"] = ratio
        lines.append(f"\nPseudo-labeling with the encoder run once per window: {ratio:.2f}x as fast as whole-network "
                     "passes (same run, same cases, same model).")
    if profile:
        for path in PATHS:
            lines += [f"\n## {path} ({profile[path]['samples']} samples)\n", "| function (inclusive) | share |", "| --- | --- |"]
            lines += [f"| `{f}` | {share:.0%} |" for f, share in profile[path]["inclusive"]]
            lines += ["", "| function (own time) | share |", "| --- | --- |"]
            lines += [f"| `{f}` | {share:.0%} |" for f, share in profile[path]["own"]]
    from raysemi.atomic import atomic_write_text

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("child", "data", "work")}
    comparisons = []
    if "pseudo_label_whole_passes" in result["seconds"]:
        comparisons.append(compare(
            f"pseudo-labeling, encoder once per window (T={args.passes}, {args.size}^3)", 60 * result["cases"] / result["seconds"]["pseudo_label"],
            "whole-network MC passes", 60 * result["cases"] / result["seconds"]["pseudo_label_whole_passes"], "cases/min",
        ))
    write_report(args.out, NAME, args.quick, settings, {**result, "profile": profile}, comparisons, machine=machine)
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
