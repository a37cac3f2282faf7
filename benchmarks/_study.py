"""Helpers shared by the two study benchmarks, ``domain_shift.py`` and ``data_efficiency.py``.

A study is a set of full raysemi trainings (teacher, student, baselines) over a few seeds, compared
on one validation set. What the two scripts share lives here:

- :func:`study_parser` and :func:`load_study`: the command line (``--config``, ``--set``, ``--quick``,
  ``--seeds``, ``--out DIR``) and the config. A study YAML is a raysemi config plus one extra
  top-level section ``study:`` (sizes of the generated data, seeds, ...), which the script validates
  with its own pydantic model; ``--set study.key=value`` overrides it like any other key.
- :func:`check_resume`: a rerun with the same ``--out`` continues where the last one stopped (every
  run's ``state.json``, plus the cached evaluations), so it must use the same settings; this
  refuses a rerun whose settings changed, naming the keys.
- :func:`ensure_synth`, :func:`cached_json`: generated data and finished steps are reused on rerun.
- :func:`mean_std`, :func:`pm`, :func:`json_safe`, :class:`Progress`: numbers, tables, progress lines.

Standard deviations are population standard deviations (``numpy.std``, ``ddof=0``), as in
:mod:`raysemi.evaluation.report` and :func:`raysemi.evaluation.plots.data_efficiency`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ValidationError

from raysemi.atomic import atomic_write_json
from raysemi.config import RaysemiConfig, parse_override, set_dotted
from raysemi.errors import ConfigError

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
STUDY_SECTION = "study"
#: The studies' headline score: mean Dice of the ET, TC and WT regions.
SCORE = "dice_mean_regions"
#: Training sizes of both studies' ``--quick`` smoke tests (each adds its own ``study.*`` sizes).
QUICK_TRAINING = (
    "data.patch_size=[32, 32, 32]", "model.mc_passes=2", "curriculum.stages=2", "curriculum.epochs_per_stage=1",
    "train.epochs=2", "train.steps_per_epoch=4",
)
SETTINGS_FILE = "study_settings.json"

Settings = TypeVar("Settings", bound=BaseModel)


def study_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options both studies take; ``--config`` defaults to ``jobs/configs/<name>.yaml``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=REPO_ROOT / "jobs" / "configs" / f"{name}.yaml",
                        help="study YAML: a raysemi config plus a 'study:' section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set train.lr=0.001 or --set study.seeds=[0]")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one seed: an end-to-end smoke test in minutes, not a measurement")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds to run (each seeds the generated data, the split and training); default: study.seeds")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder: report (JSON, Markdown, PNG), generated data, runs, MLflow store "
                        f"(default: benchmarks/out/{name}, or benchmarks/out/{name}-quick with --quick)")
    return parser


def check_shape(shape: Sequence[int]) -> None:
    """A generated volume must be at least 16 voxels per side (the model's 4 downsamplings)."""
    if any(side < 16 for side in shape):
        raise ValueError(f"every side of shape must be at least 16, got {list(shape)}")


def output_dir(out: Path | None, name: str, quick: bool) -> Path:
    """The study's output folder.

    ``--out DIR`` as given; a path ending in ``.json`` means the folder of that name without the
    suffix. Without ``--out``: ``benchmarks/out/<name>``, and ``<name>-quick`` for ``--quick``, so
    that a smoke test never collides with the resumable runs of a full study.
    """
    if out is None:
        return BENCHMARKS_DIR / "out" / (f"{name}-quick" if quick else name)
    out = out.expanduser()
    return (out.with_suffix("") if out.suffix == ".json" else out).resolve()


def load_study(
    config_path: Path,
    overrides: Sequence[str],
    quick_overrides: Sequence[str],
    settings_model: type[Settings],
    out_dir: Path,
) -> tuple[RaysemiConfig, Settings]:
    """Read a study YAML, apply ``quick_overrides`` then ``overrides``, validate both parts.

    Defaults that tie a study to its output folder: ``train.storage_path`` is ``<out>/runs`` unless
    the YAML or ``--set`` names one, and ``tracking.uri`` is a SQLite store ``<out>/mlflow.db``
    unless the YAML, ``--set`` or ``MLFLOW_TRACKING_URI`` names one.

    Raises:
        ConfigError: unreadable or invalid YAML, a bad ``--set``, an invalid raysemi key, or an
            invalid ``study.*`` key (the message names the field path).
    """
    try:
        raw = yaml.safe_load(Path(config_path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read the study config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    study_raw = raw.pop(STUDY_SECTION, None) or {}
    if not isinstance(study_raw, dict):
        raise ConfigError(f"{config_path}: '{STUDY_SECTION}' must be a mapping, got {type(study_raw).__name__}")
    for override in [*quick_overrides, *overrides]:
        key, value = parse_override(override)
        if key.startswith(STUDY_SECTION + "."):
            set_dotted(study_raw, key.removeprefix(STUDY_SECTION + "."), value)
        else:
            set_dotted(raw, key, value)
    train_raw, tracking_raw = raw.setdefault("train", {}), raw.setdefault("tracking", {})
    if not isinstance(train_raw, dict) or not isinstance(tracking_raw, dict):
        raise ConfigError(f"{config_path}: 'train' and 'tracking' must be mappings")
    train_raw.setdefault("storage_path", str(out_dir / "runs"))
    if not tracking_raw.get("uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
        tracking_raw["uri"] = f"sqlite:///{out_dir / 'mlflow.db'}"
    source = f"{config_path}" + (" with overrides" if overrides or quick_overrides else "")
    cfg = RaysemiConfig.from_dict(raw, source=source)
    try:
        settings = settings_model.model_validate(study_raw)
    except ValidationError as exc:
        lines = [f"invalid '{STUDY_SECTION}' section ({source}):"]
        for error in exc.errors():
            path = ".".join([STUDY_SECTION, *(str(part) for part in error["loc"])])
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
            lines.append(f"  {path}: {message} (got {error.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None
    return cfg, settings


def check_resume(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Record the settings of this study folder, or check that a rerun uses the same ones.

    Args:
        out_dir: the study's output folder.
        fingerprint: everything that decides the results except the list of seeds (a rerun may add
            seeds) and where MLflow logs.

    Raises:
        ConfigError: the folder holds a study with other settings; names the differing keys.
    """
    path = out_dir / SETTINGS_FILE
    current = json.loads(json.dumps(fingerprint, default=str))
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != current:
            changed = sorted(k for k in _flatten(previous).keys() | _flatten(current).keys()
                             if _flatten(previous).get(k) != _flatten(current).get(k))
            raise ConfigError(
                f"{out_dir} holds a study run with other settings ({', '.join(changed[:8])}"
                f"{', ...' if len(changed) > 8 else ''} differ; see {path}). Its runs would be resumed with "
                "the wrong settings: pass another --out, or delete that folder to start over."
            )
        return
    atomic_write_json(path, current)


def _flatten(raw: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {prefix.rstrip("."): raw}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def ensure_synth(root: Path, spec: dict[str, Any], generate: Callable[[], Any]) -> bool:
    """Generate a data set into ``root`` unless a finished one with the same ``spec`` is there.

    ``<root>/.synth.json`` records the spec once generation has finished (the generator writes each
    file atomically and is deterministic, so regenerating after a crash rewrites the same bytes).

    Returns:
        True when it generated, False when it reused the data.
    """
    marker = root / ".synth.json"
    wanted = json.loads(json.dumps(spec, default=str))
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return False
    generate()
    atomic_write_json(marker, wanted)
    return True


def cached_json(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The JSON at ``path`` if a previous attempt finished this step, else ``compute()`` saved there.

    ``compute``'s wall time is added as ``step_seconds`` (the time of the attempt that finished it).
    """
    if path.exists():
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = json_safe(compute())
    result["step_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(path, result)
    return result


def json_safe(value: Any) -> Any:
    """Replace NaN/inf by None and numpy scalars by Python numbers, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and population std of the finite numbers in ``values``.

    The std is None for a single number (one seed has no spread to report), and both are None
    when there is no number at all.
    """
    numbers = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not numbers:
        return None, None
    return float(np.mean(numbers)), (float(np.std(numbers)) if len(numbers) > 1 else None)


def pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    """``0.812 ± 0.021`` (just the mean without a std, ``n/a`` without a mean)."""
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def number(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def read_summary(path: Path) -> dict[str, Any] | None:
    """The ``summary`` of a pipeline results file (``pseudo_labels.json``, ``refinement_stage_XX.json``)."""
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("summary")


def spearman(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Spearman correlation of (x, y) pairs; None with fewer than 3 pairs or a constant side."""
    pairs = [(float(x), float(y)) for x, y in pairs if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    from scipy.stats import spearmanr

    value = float(spearmanr(*zip(*pairs)).statistic)
    return value if math.isfinite(value) else None


class Progress:
    """``[name 123s] message`` lines, flushed at once (the runs print their own lines in between)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{self.name} {time.perf_counter() - self.started:6.0f}s] {message}", flush=True)
