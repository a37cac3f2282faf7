"""raysemi's one typed config tree.

Every command reads a YAML file into :class:`RaysemiConfig`, applies repeated ``--set dotted.key=value``
overrides, and validates the result before any work starts. Unknown keys and bad values fail with a
:class:`~raysemi.errors.ConfigError` that names the field path (``loss.tau_high``) and what was expected.

Workers receive the config as a plain dict (``cfg.to_dict()``) and rebuild it first thing with
:meth:`RaysemiConfig.from_dict`, so a typo never travels to a remote worker.

Sections: ``data``, ``model``, ``loss``, ``curriculum``, ``train``, ``tune``, ``tracking``. Each field
carries its METHOD.md default and a one-line description (shown by ``raysemi config --show``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raysemi.errors import ConfigError


class _Section(BaseModel):
    """Strict base: unknown keys are errors, assignment is validated, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


Triple = tuple[int, int, int]


class DataConfig(_Section):
    root: str = Field("demo_data", description="Folder of BraTS cases (2021 or 2023 naming).")
    labeled_fraction: float = Field(
        0.25, gt=0.0, le=1.0,
        description="Share of the labeled (non-validation) cases whose labels training may see; the rest "
        "become unlabeled with hidden truth.",
    )
    validation_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of labeled cases held out for validation.")
    seed: int = Field(0, description="Seed of the split.")
    max_labeled: int | None = Field(None, ge=1, description="Cap on labeled training cases (None: no cap).")
    labeled_sites: list[str] | None = Field(None, description="Only cases of these sites give labeled cases.")
    unlabeled_sites: list[str] | None = Field(None, description="Only cases of these sites give unlabeled cases.")
    validation_sites: list[str] | None = Field(None, description="Only cases of these sites give validation cases.")
    site_map: str | None = Field(None, description="CSV with columns case_id,site (real data); synth writes <id>_site.json.")
    patch_size: Triple = Field((64, 64, 64), description="Training patch size; each side divisible by 16.")
    patches_per_volume: int = Field(4, ge=1, description="Random patches drawn from each volume per epoch.")
    foreground_ratio: float = Field(
        0.67, ge=0.0, le=1.0, description="Share of patches centred on tumour (foreground oversampling)."
    )
    augment: bool = Field(True, description="Random flips and intensity shifts on training patches.")
    object_store_memory_gb: float | None = Field(
        None, gt=0, description="Ray object store budget for a local cluster (GB); None: Ray's default."
    )

    @field_validator("patch_size")
    @classmethod
    def _divisible_by_16(cls, value: Triple) -> Triple:
        if any(side <= 0 or side % 16 for side in value):
            raise ValueError(f"every side must be a positive multiple of 16 (4 downsamplings), got {list(value)}")
        return value


class ModelConfig(_Section):
    preset: Literal["tiny", "base"] = Field("tiny", description="TransASPP-UNet size preset.")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="Dropout p (None: the preset's).")
    mc_passes: int = Field(8, ge=1, description="Monte-Carlo dropout passes T for pseudo-labels.")
    mc_max_batch: int | None = Field(None, ge=1, description="Most samples per forward call in MC inference (None: all T).")
    sw_batch_size: int = Field(2, ge=1, description="Windows per sliding-window forward call.")
    sw_overlap: float = Field(0.25, ge=0.0, lt=1.0, description="Sliding-window overlap.")


class LossConfig(_Section):
    tau_high: float = Field(0.2, ge=0.0, le=1.0, description="τ_h: voxels with uncertainty ≤ τ_h are learned.")
    tau_low: float = Field(0.5, ge=0.0, le=1.0, description="τ_l: voxels with uncertainty ≥ τ_l are unlearned.")
    lambda_high: float = Field(1.0, ge=0.0, description="λ_h: weight of Dice+CE on high-confidence voxels.")
    lambda_low: float = Field(0.3, ge=0.0, description="λ_l: weight of the unlearning term.")
    ramp_up_fraction: float = Field(
        1.0, ge=0.0, description="λ_l ramps up with a sigmoid over this many stages' worth of steps (1 = first stage)."
    )
    eps: float = Field(1e-6, gt=0.0, lt=0.1, description="ε in −log(1 − p + ε).")
    unlearn_background: bool = Field(
        False,
        description="Unlearn voxels of L whose pseudo-label is background too (METHOD.md's literal rule). The default "
        "unlearns only tumour-labelled voxels of L: pushing 'not background' over wide uncertain regions tells the "
        "student 'tumour' without saying where, and in the domain-shift study the student over-segmented more with "
        "every stage (README).",
    )
    mean_teacher_weight: float = Field(
        0.1, ge=0.0, description="Mean Teacher baseline: weight of the consistency loss (SSL4MIS default 0.1)."
    )
    mean_teacher_ema: float = Field(0.99, gt=0.0, lt=1.0, description="Mean Teacher baseline: EMA decay of the teacher.")

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> "LossConfig":
        if not self.tau_high < self.tau_low:
            raise ValueError(f"tau_high ({self.tau_high}) must be below tau_low ({self.tau_low})")
        return self


class CurriculumConfig(_Section):
    stages: int = Field(6, ge=1, description="Number of curriculum stages S.")
    mode: Literal["fraction", "threshold"] = Field("fraction", description="Admit by cumulative fraction or by C ≥ τ_C(s).")
    fractions: list[float] | None = Field(None, description="Cumulative fractions per stage (None: s/S).")
    thresholds: list[float] | None = Field(None, description="Confidence thresholds per stage (threshold mode).")
    epochs_per_stage: int = Field(2, ge=1, description="Student epochs per stage E.")
    confidence_margin: int = Field(2, ge=0, description="Dilation (voxels) of the predicted tumour in the confidence region.")
    refine_margin: float = Field(0.1, ge=0.0, le=1.0, description="m: student must be this much more confident to win.")
    refine_alpha: float = Field(0.5, ge=0.0, le=1.0, description="α in C' = α·C + (1−α)·A.")
    uncertain_agreement: Literal["unlearn", "ignore"] = Field(
        "ignore",
        description="Voxels where teacher and student agree but are not both confident: ignore them next stage, or "
        "unlearn them (METHOD.md's literal rule). 'ignore' is the default because the literal rule sent 85-91 % of "
        "the refined voxels to the unlearning set and the student collapsed (README, domain-shift study).",
    )
    labeled_share: float | None = Field(
        0.5, gt=0.0, lt=1.0,
        description="Least share of labeled cases in the student's patch stream: labeled cases are repeated so that "
        "pseudo-labeled scans never crowd out ground truth (None: cases in proportion to their counts).",
    )
    student_init: Literal["teacher", "scratch"] = Field("teacher", description="Initialise the student from the teacher or from scratch.")
    refine: bool = Field(True, description="Run agreement refinement after each stage.")

    @model_validator(mode="after")
    def _schedule_matches_stages(self) -> "CurriculumConfig":
        if self.fractions is not None:
            if len(self.fractions) != self.stages:
                raise ValueError(f"fractions has {len(self.fractions)} entries, expected one per stage ({self.stages})")
            if any(not 0 < f <= 1 for f in self.fractions) or any(b < a for a, b in zip(self.fractions, self.fractions[1:])):
                raise ValueError(f"fractions must be nondecreasing values in (0, 1], got {self.fractions}")
        if self.mode == "threshold":
            if self.thresholds is None or len(self.thresholds) != self.stages:
                raise ValueError(f"threshold mode needs thresholds with one value per stage ({self.stages})")
        if self.thresholds is not None:
            if any(not 0 <= t <= 1 for t in self.thresholds) or any(b > a for a, b in zip(self.thresholds, self.thresholds[1:])):
                raise ValueError(f"thresholds must be nonincreasing values in [0, 1], got {self.thresholds}")
        return self

    def cumulative_fractions(self) -> list[float]:
        return list(self.fractions) if self.fractions is not None else [(s + 1) / self.stages for s in range(self.stages)]


class TrainConfig(_Section):
    storage_path: str = Field(
        "runs", description="Where runs, checkpoints and pseudo-labels go: a local path, or a shared POSIX file system "
        "(NFS, EFS, CephFS) mounted on every node of a multi-node cluster."
    )
    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run folder name; rerun to resume.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP).")
    use_gpu: Literal["auto", "yes", "no"] = Field("auto", description="Use GPUs: auto when the cluster has them.")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per training worker.")
    epochs: int = Field(4, ge=1, description="Teacher epochs.")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="Optimiser steps per epoch (None: one pass over the cases' patches); fixes budgets."
    )
    batch_size: int = Field(2, ge=1, description="Patches per worker batch.")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-5, ge=0.0, description="AdamW weight decay.")
    amp: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU).")
    seed: int = Field(0, description="Seed of model init, sampling and augmentation.")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: unlimited).")
    checkpoints_to_keep: int = Field(2, ge=1, description="Checkpoints kept (best by validation Dice).")
    val_max_cases: int | None = Field(None, ge=1, description="Validate on at most this many cases per epoch (None: all).")
    inference_actors: int = Field(1, ge=1, description="Actors in the batch-inference pool (pseudo-labels, predict).")
    inference_gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs per inference actor (0: CPU).")

    @field_validator("storage_path")
    @classmethod
    def _posix_storage(cls, value: str) -> str:
        # Pseudo-labels, the pool snapshot and results are written with local file I/O; an object-store
        # URI would silently become a local folder named "s3:", so it is refused here.
        if "://" in value:
            raise ValueError(
                f"must be a file-system path (local, or a shared NFS/EFS mount on a cluster), got the URI {value!r}; "
                "object stores (s3://, gs://) are not supported yet"
            )
        return value


class SearchSpaceEntry(_Section):
    kind: Literal["choice", "uniform", "loguniform", "randint", "grid"] = Field(description="Distribution.")
    values: list[Any] | None = Field(None, description="Values for choice/grid.")
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _complete(self) -> "SearchSpaceEntry":
        if self.kind in ("choice", "grid") and not self.values:
            raise ValueError(f"{self.kind} needs a non-empty 'values' list")
        if self.kind in ("uniform", "loguniform", "randint") and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"{self.kind} needs low < high")
        return self


class TuneConfig(_Section):
    search: Literal["grid", "random", "optuna"] = Field("random", description="Search algorithm.")
    num_samples: int = Field(2, ge=1, description="Trials (per grid point with grid search).")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once.")
    metric: str = Field("val_dice_mean_regions", description="Metric to maximise (reported after every stage).")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="Trial scheduler.")
    grace_period: int = Field(1, ge=1, description="ASHA: stages before a trial may be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA reduction factor.")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs reserved by each trial's driver.")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per trial (cluster).")
    space: dict[str, SearchSpaceEntry] = Field(default_factory=dict, description="dotted config key -> distribution.")
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Sweep folder name; rerun to resume.")


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI (MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db).")
    experiment: str = Field("raysemi", description="MLflow experiment name.")
    register_model: str | None = Field("raysemi-student", description="Registered model name (None: do not register).")
    log_models: bool = Field(True, description="Log final models with mlflow.pytorch.log_model.")


class RaysemiConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> "RaysemiConfig":
        if self.curriculum.mode == "threshold" and self.curriculum.thresholds is None:
            raise ValueError("curriculum.mode is threshold but curriculum.thresholds is missing")
        return self

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> "RaysemiConfig":
        """Validate a nested dict; errors name each field path and what was expected."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, source)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict, for Ray workers and MLflow params."""
        return self.model_dump(mode="json")

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "RaysemiConfig":
        raw = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
        for key, value in items:
            set_dotted(raw, key, value)
        return RaysemiConfig.from_dict(raw, source="--set overrides")

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``loss.tau_high``) for MLflow params."""
        return _flatten(self.to_dict())

    def tracking_uri(self, workdir: str | os.PathLike | None = None) -> str:
        """MLFLOW_TRACKING_URI wins, then ``tracking.uri``, then a SQLite store in the working directory."""
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.tracking.uri:
            return self.tracking.uri
        return f"sqlite:///{Path(workdir or os.getcwd()).resolve() / 'mlflow.db'}"

    def run_dir(self) -> Path:
        """``train.storage_path/<run_name>`` made absolute (Ray Train needs absolute local paths)."""
        return Path(self.train.storage_path).expanduser().resolve() / self.train.run_name

    def save(self, path: str | os.PathLike) -> None:
        from raysemi.atomic import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RaysemiConfig:
    """Load YAML (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    for override in overrides or []:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    return RaysemiConfig.from_dict(raw, source=source if not overrides else f"{source} with --set overrides")


def parse_override(text: str) -> tuple[str, Any]:
    """``loss.tau_high=0.3`` -> (``loss.tau_high``, 0.3). The value is parsed as YAML (lists, null, numbers)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set loss.tau_high=0.3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "<top level>"
        if error["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in error["loc"][:-1])
            lines.append(f"  {path}: unknown key{' in section ' + section if section else ''}")
            continue
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        if "got" not in message and not isinstance(value, dict):
            message += f" (got {value!r})"
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def ceil_fraction(fraction: float, count: int) -> int:
    """⌈f·N⌉ robust to float error (2/6·6 is 2, not 3)."""
    return min(count, math.ceil(fraction * count - 1e-9))
