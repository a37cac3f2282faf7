"""Demo data: BraTS-style brain-tumour phantoms on the real MNI152 anatomy, from two acquisition sites.

Every phantom starts from the 1 mm ICBM152 2009a templates that ship inside the nilearn wheel (T1,
grey-matter and white-matter probability maps; nothing is downloaded). Per case, seeded:

1. **Pose.** Rotation of up to ±10° about each axis, isotropic scale 0.9-1.1, translation up to 3 % of
   the field of view. The field of view is ``shape * spacing`` mm, centred on the brain. The brain
   keeps its real size when it fits; in a field of view too small for it (test volumes such as
   48^3 at 1 mm) it is shrunk as a whole to about 80 % of the field of view, so that every phantom
   shows the whole brain. Tumour sizes and the blur scale with it (on very coarse grids each
   compartment keeps a floor of one to a few voxels). ``<id>_site.json`` records this
   ``anatomy_scale``.
2. **Tissues.** CSF, GM and WM fractions are resampled trilinearly onto the output grid. They are
   low-pass filtered first when the output grid is coarser than the template, which also models
   the partial-volume averaging of thick slices. CSF is the template brain mask minus GM and WM.
3. **Tumours.** One or two (35 %), centred in white matter and kept away from the brain surface.
   Each has an irregular ellipsoidal core: a necrotic centre (NCR/NET) inside an enhancing rim
   (ET), and around it edema (ED). Edema reaches further into white matter than into grey matter
   (its distance limit grows with the WM fraction) and stays out of the ventricles. Every tumour
   has all three compartments.
4. **Acquisition.** Each tissue gets its site's intensity (table below), and tumour compartments
   get a mild texture. The image is then blurred (the PSF; ``blur_sigma_mm`` is in anatomy mm,
   so it scales with the brain like the tumours do), multiplied by a smooth random bias
   field (``exp(bias_strength * f)``, ``f`` a random quadratic polynomial with unit standard
   deviation), scaled by the scanner gain and given Rician noise of standard deviation
   ``noise_std * WM intensity * gain``. Last comes skull-stripping: exactly 0 outside the brain
   mask, strictly positive inside it.

Output per case, in the BraTS 2021 layout: ``<out>/<id>/<id>_{t1,t1ce,t2,flair}.nii.gz`` (float32),
``<id>_seg.nii.gz`` (uint8, on-disk labels 0/1/2/4, left out when ``labeled=False``) and
``<id>_site.json``. ``synth_dataset(png=True)`` also writes ``<id>_montage.png``. The affine is
``diag(spacing)`` in RAS, and the centre of the field of view sits at world (0, 0, 0).
Same seed, same arrays, bit for bit (and byte-identical files).

Relative tissue intensities (WM = 1 in every modality; multiplied by the site's gain):

| site | modality | csf | gm | wm | necrosis | enhancing | edema |
|---|---|---|---|---|---|---|---|
| A | t1 | 0.30 | 0.65 | 1.00 | 0.35 | 0.60 | 0.55 |
| A | t1ce | 0.30 | 0.65 | 1.00 | 0.30 | 1.70 | 0.55 |
| A | t2 | 2.40 | 1.30 | 1.00 | 2.10 | 1.40 | 1.90 |
| A | flair | 0.25 | 1.15 | 1.00 | 0.80 | 1.40 | 1.90 |
| B | t1 | 0.45 | 0.80 | 1.00 | 0.50 | 0.75 | 0.70 |
| B | t1ce | 0.45 | 0.80 | 1.00 | 0.50 | 1.40 | 0.75 |
| B | t2 | 1.90 | 1.15 | 1.00 | 1.70 | 1.30 | 1.55 |
| B | flair | 0.45 | 1.06 | 1.00 | 0.95 | 1.30 | 1.50 |

Acquisition parameters:

| site | noise_std | bias_strength | blur_sigma_mm | spacing (mm) | gain | description |
|---|---|---|---|---|---|---|
| A | 0.03 | 0.08 | 0.0 | 1.0 x 1.0 x 1.0 | 1000 | 3T research protocol: isotropic 1 mm, strong contrast, bias-corrected |
| B | 0.06 | 0.25 | 1.0 | 1.0 x 1.0 x 2.0 | 400 | 1.5T clinical protocol: 2 mm slices, weaker GM/WM and enhancement contrast, noisier, residual bias |

Both sites keep the same contrast order (T1: WM > GM > CSF, tumour dark; T1ce: bright rim, dark
necrosis; T2: CSF and edema bright; FLAIR: CSF dark, edema bright), so site B stays segmentable.
Its contrast, noise, bias, blur and through-plane resolution still differ enough to be a real
domain shift. Because the 2 mm slices cover the same brain, a site-B brain takes up about half as
many slices as a site-A brain of the same ``shape``.
``site_table_markdown()`` regenerates the two tables above from ``SITES``, and a test keeps them
in step.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from raysemi.atomic import atomic_path, atomic_write_json
from raysemi.errors import ConfigError, DataError

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Internal labels (on disk, ET is written as 4).
BACKGROUND, NECROSIS, EDEMA, ENHANCING = 0, 1, 2, 3
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TISSUES: tuple[str, ...] = ("csf", "gm", "wm", "necrosis", "enhancing", "edema")

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# nilearn's own load_mni152_brain_mask threshold: 0.2 of the template's maximum.
_BRAIN_THRESHOLD = 0.2
# Fraction of the field of view the brain may fill before the pose's scale and translation.
_FILL_FRACTION = 0.8
# Relative amplitude of the noise that makes a tumour core's boundary irregular.
_CORE_ROUGHNESS = 0.18


def _check_spacing(spacing: Sequence[float], what: str) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ConfigError(f"{what} must be three positive numbers (mm), got {spacing!r}")
    return values  # type: ignore[return-value]


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(n) for n in shape)
    if len(values) != 3 or any(n < 16 for n in values) or values != tuple(shape):
        raise ConfigError(f"shape must be three integers >= 16, got {shape!r}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Site profiles
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TissueContrast:
    """Noise-free intensity of each tissue in one modality, relative to white matter."""

    csf: float
    gm: float
    wm: float
    necrosis: float
    enhancing: float
    edema: float

    def as_array(self) -> np.ndarray:
        """The six intensities as float32, in ``TISSUES`` order."""
        return np.array([getattr(self, name) for name in TISSUES], dtype=np.float32)


@dataclass(frozen=True)
class SiteProfile:
    """How one acquisition site (scanner + protocol) renders the same anatomy.

    Attributes:
        name: site name, recorded in every case's ``<id>_site.json``.
        description: one line for tables.
        contrast: ``{modality: TissueContrast}`` for exactly the four modalities.
        noise_std: Rician noise standard deviation, as a fraction of the modality's WM intensity.
        bias_strength: standard deviation of the log bias field (0 = no bias).
        blur_sigma_mm: Gaussian point-spread function, in anatomy mm (0 = none): on a phantom
            shrunk to fit a small grid the blur shrinks with it, so it looks the same at any size.
        spacing: default voxel size (x, y, z) in mm.
        gain: scanner gain: arbitrary intensity units per unit of relative intensity.
    """

    name: str
    description: str
    contrast: dict[str, TissueContrast]
    noise_std: float
    bias_strength: float
    blur_sigma_mm: float
    spacing: tuple[float, float, float]
    gain: float

    def __post_init__(self) -> None:
        if tuple(sorted(self.contrast)) != tuple(sorted(MODALITIES)):
            raise ConfigError(
                f"site {self.name!r}: contrast must have exactly the modalities {MODALITIES}, "
                f"got {tuple(self.contrast)}"
            )
        for modality, table in self.contrast.items():
            if not np.all(table.as_array() > 0):
                raise ConfigError(f"site {self.name!r}: contrast[{modality!r}] must be all > 0, got {table}")
        for field in ("noise_std", "bias_strength", "blur_sigma_mm"):
            if getattr(self, field) < 0:
                raise ConfigError(f"site {self.name!r}: {field} must be >= 0, got {getattr(self, field)}")
        _check_spacing(self.spacing, f"site {self.name!r}: spacing")
        if self.gain <= 0:
            raise ConfigError(f"site {self.name!r}: gain must be > 0, got {self.gain}")


SITES: dict[str, SiteProfile] = {
    "A": SiteProfile(
        name="A",
        description="3T research protocol: isotropic 1 mm, strong contrast, bias-corrected",
        contrast={
            "t1": TissueContrast(csf=0.30, gm=0.65, wm=1.00, necrosis=0.35, enhancing=0.60, edema=0.55),
            "t1ce": TissueContrast(csf=0.30, gm=0.65, wm=1.00, necrosis=0.30, enhancing=1.70, edema=0.55),
            "t2": TissueContrast(csf=2.40, gm=1.30, wm=1.00, necrosis=2.10, enhancing=1.40, edema=1.90),
            "flair": TissueContrast(csf=0.25, gm=1.15, wm=1.00, necrosis=0.80, enhancing=1.40, edema=1.90),
        },
        noise_std=0.03,
        bias_strength=0.08,
        blur_sigma_mm=0.0,
        spacing=(1.0, 1.0, 1.0),
        gain=1000.0,
    ),
    "B": SiteProfile(
        name="B",
        description=(
            "1.5T clinical protocol: 2 mm slices, weaker GM/WM and enhancement contrast, "
            "noisier, residual bias"
        ),
        contrast={
            "t1": TissueContrast(csf=0.45, gm=0.80, wm=1.00, necrosis=0.50, enhancing=0.75, edema=0.70),
            "t1ce": TissueContrast(csf=0.45, gm=0.80, wm=1.00, necrosis=0.50, enhancing=1.40, edema=0.75),
            "t2": TissueContrast(csf=1.90, gm=1.15, wm=1.00, necrosis=1.70, enhancing=1.30, edema=1.55),
            "flair": TissueContrast(csf=0.45, gm=1.06, wm=1.00, necrosis=0.95, enhancing=1.30, edema=1.50),
        },
        noise_std=0.06,
        bias_strength=0.25,
        blur_sigma_mm=1.0,
        spacing=(1.0, 1.0, 2.0),
        gain=400.0,
    ),
}


def site_table_markdown(sites: Mapping[str, SiteProfile] | None = None) -> str:
    """The contrast and acquisition tables of the module docstring, generated from ``sites``."""
    sites = SITES if sites is None else sites
    lines = ["| site | modality | " + " | ".join(TISSUES) + " |", "|---" * (2 + len(TISSUES)) + "|"]
    for site in sites.values():
        for modality in MODALITIES:
            values = " | ".join(f"{v:.2f}" for v in site.contrast[modality].as_array())
            lines.append(f"| {site.name} | {modality} | {values} |")
    lines += [
        "",
        "Acquisition parameters:",
        "",
        "| site | noise_std | bias_strength | blur_sigma_mm | spacing (mm) | gain | description |",
        "|---|---|---|---|---|---|---|",
    ]
    for site in sites.values():
        spacing = " x ".join(f"{s:.1f}" for s in site.spacing)
        lines.append(
            f"| {site.name} | {site.noise_std:.2f} | {site.bias_strength:.2f} | {site.blur_sigma_mm:.1f} "
            f"| {spacing} | {site.gain:.0f} | {site.description} |"
        )
    return "\n".join(lines)


def _resolve_site(site: str | SiteProfile) -> SiteProfile:
    if isinstance(site, SiteProfile):
        return site
    if site not in SITES:
        raise ConfigError(f"unknown site {site!r}; built-in sites are {sorted(SITES)}")
    return SITES[site]


# --------------------------------------------------------------------------------------------
# MNI152 template (loaded once per process)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Template:
    """The MNI152 maps cropped to the brain, in template voxels (= mm).

    Attributes:
        maps: ``(4, X, Y, Z)`` float32: CSF, GM, WM fractions and the brain mask (0/1).
        surface_distance_mm: ``(X, Y, Z)`` distance to the outside of the brain mask.
        brain_center: centre of the brain's bounding box, in voxels.
        brain_extent: size of the brain's bounding box, in mm.
    """

    maps: np.ndarray
    surface_distance_mm: np.ndarray
    brain_center: np.ndarray
    brain_extent: np.ndarray


def _template_dir() -> Path:
    # find_spec locates the wheel without importing nilearn (which would pull in scikit-learn).
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo phantoms need the MNI152 templates of the 'nilearn' package: pip install nilearn")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def _load_template() -> _Template:
    folder = _template_dir()
    raw = {}
    for key, name in _TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"MNI152 template {path} not found; reinstall nilearn (it ships this file)")
        raw[key] = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    t1 = raw["t1"]
    brain = t1 > _BRAIN_THRESHOLD * t1.max()
    gm = np.clip(raw["gm"] / 255.0, 0.0, 1.0) * brain
    wm = np.clip(raw["wm"] / 255.0, 0.0, 1.0) * brain
    # The probability maps are separately smoothed and may sum above 1 at tissue borders.
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(brain - gm - wm, 0.0, 1.0)

    # Crop to the brain with a zero margin. The template cuts the brainstem at its lowest slice,
    # and the margin makes that cut count as brain surface for the distance map too.
    margin = 4
    maps = np.pad(np.stack([csf, gm, wm, brain.astype(np.float32)]), [(0, 0)] + [(margin, margin)] * 3)
    corners = np.argwhere(maps[3] > 0)
    low, high = corners.min(0) - margin, corners.max(0) + 1 + margin
    maps = maps[(slice(None),) + tuple(slice(lo, hi) for lo, hi in zip(low, high))]
    return _Template(
        maps=np.ascontiguousarray(maps, dtype=np.float32),
        surface_distance_mm=ndimage.distance_transform_edt(maps[3] > 0).astype(np.float32),
        brain_center=(np.array(maps.shape[1:]) - 1) / 2.0,
        brain_extent=np.array(maps.shape[1:], dtype=np.float64) - 2 * margin,
    )


@functools.lru_cache(maxsize=4)
def _template_maps_lowpassed(sigma_voxels: tuple[float, float, float]) -> np.ndarray:
    """Template maps, Gaussian-filtered against aliasing when sampled on a coarser grid."""
    maps = _load_template().maps
    if max(sigma_voxels) == 0:
        return maps
    return np.stack([ndimage.gaussian_filter(m, sigma_voxels, mode="constant") for m in maps])


# --------------------------------------------------------------------------------------------
# One phantom in memory
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phantom:
    """One synthetic case, before it is written.

    Attributes:
        images: ``(4, X, Y, Z)`` float32 in ``MODALITIES`` order, 0 outside the brain.
        labels: ``(X, Y, Z)`` uint8 internal labels (0 background, 1 NCR/NET, 2 ED, 3 ET).
        tissue: ``(3, X, Y, Z)`` float32 healthy-tissue fractions (CSF, GM, WM) before the
            tumour replaced them; the anatomical ground truth, for tests and plots.
        brain_mask: ``(X, Y, Z)`` bool.
        affine: ``(4, 4)`` voxel-to-RAS-mm matrix.
        metadata: what ``<id>_site.json`` records.
    """

    images: np.ndarray
    labels: np.ndarray
    tissue: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    metadata: dict[str, Any]


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles about x, y, z."""
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels: np.ndarray) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation, clipped to ±2."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_voxels, mode="wrap")
    field /= max(float(field.std()), 1e-6)
    return np.clip(field, -2.0, 2.0)


def _resample_anatomy(
    shape: tuple[int, int, int], spacing: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Pose the template and sample it on the output grid.

    Returns:
        tissue ``(3, X, Y, Z)`` CSF/GM/WM fractions (summing to 1 in the brain), brain mask
        ``(X, Y, Z)``, distance to the brain surface in anatomy mm ``(X, Y, Z)``, anatomy scale.
    """
    template = _load_template()
    field_of_view = np.asarray(shape) * spacing
    fit = _FILL_FRACTION * float(np.min(field_of_view / template.brain_extent))
    base_scale = min(1.0, fit)
    scale = base_scale * rng.uniform(0.9, 1.1)
    rotation = _rotation(np.deg2rad(rng.uniform(-10.0, 10.0, size=3)))
    translation = rng.uniform(-0.03, 0.03, size=3) * field_of_view

    # Output voxel i sits at p = (i - (n-1)/2) * spacing mm; the template point shown there is
    # q = centre + R^T (p - t) / scale (template voxels are 1 mm).
    inverse = rotation.T / scale
    axes = [(np.arange(n) - (n - 1) / 2.0) * s - t for n, s, t in zip(shape, spacing, translation)]
    grids = [a.reshape([-1 if k == j else 1 for k in range(3)]) for j, a in enumerate(axes)]
    coords = np.empty((3, *shape), dtype=np.float32)
    for k in range(3):
        coords[k] = template.brain_center[k] + sum(inverse[k, j] * grids[j] for j in range(3))

    # Anti-aliasing: one output voxel spans about spacing/scale template voxels. The filter is
    # set by the scale before its random factor, so that one data set shares one filtered template.
    step = spacing / base_scale
    sigma = tuple(round(0.5 * math.sqrt(max(s * s - 1.0, 0.0)) * 4) / 4 for s in step)
    maps = _template_maps_lowpassed(sigma)
    sampled = [ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=0.0, prefilter=False) for m in maps]
    csf, gm, wm, brain_fraction = sampled
    distance = ndimage.map_coordinates(
        template.surface_distance_mm, coords, order=1, mode="constant", cval=0.0, prefilter=False
    )
    brain = brain_fraction > 0.5
    tissue = np.stack([csf, gm, wm])
    total = tissue.sum(0)
    tissue = np.where(brain & (total > 1e-3), tissue / np.maximum(total, 1e-3), 0.0).astype(np.float32)
    # Voxels of the mask whose fractions all vanished (filtering at the very edge) count as CSF.
    tissue[0][brain & (total <= 1e-3)] = 1.0
    return tissue, brain, distance.astype(np.float32), scale


def _place_tumour(
    labels: np.ndarray,
    tissue: np.ndarray,
    brain: np.ndarray,
    surface_distance: np.ndarray,
    voxel_mm: np.ndarray,
    rng: np.random.Generator,
) -> bool:
    """Draw one tumour and paint it into ``labels`` (in place).

    Returns False, leaving ``labels`` untouched, when there was no room or the draw came out
    without one of its three compartments (possible only on very coarse grids).

    All sizes are in anatomy mm (template mm), converted with ``voxel_mm`` = spacing / scale.
    """
    # Floors in voxels keep every compartment visible on coarse grids (small test volumes).
    coarsest, finest = float(voxel_mm.max()), float(voxel_mm.min())
    radius = max(rng.uniform(12.0, 24.0), 3.0 * finest, 1.5 * coarsest)
    axes = rng.uniform(0.75, 1.25, size=3)
    rim = min(max(rng.uniform(2.0, 4.0), 1.5 * finest), 0.5 * radius)
    edema_reach = max(rng.uniform(3.0, 10.0), 1.5 * coarsest)
    orientation = _rotation(rng.uniform(-np.pi, np.pi, size=3))

    # Centre: in white matter, the whole core inside the brain, away from earlier tumours.
    # The rough boundary reaches at most radius / (1 - 2 * roughness) along the longest axis.
    core_reach = radius * float(axes.max()) / (1.0 - 2.0 * _CORE_ROUGHNESS)
    occupied = labels > 0
    if occupied.any():
        gap = ndimage.distance_transform_edt(~occupied, sampling=voxel_mm)
        free = gap > core_reach + 5.0
    else:
        free = np.ones_like(brain)
    candidates = np.flatnonzero((surface_distance > core_reach + 3.0) & (tissue[2] > 0.5) & free)
    if candidates.size == 0:  # small grids: the deepest free places in the brain
        depth = np.where(brain & free, surface_distance, 0.0)
        if depth.max() <= 0:
            return False
        candidates = np.flatnonzero(depth >= 0.8 * depth.max())
    centre = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], labels.shape))

    # Work in a box around the centre that holds core and edema.
    half = np.ceil((core_reach + 1.3 * edema_reach * 1.3 + 2 * coarsest) / voxel_mm).astype(int)
    low = np.maximum(centre - half, 0)
    high = np.minimum(centre + half + 1, labels.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    box_shape = tuple(int(h - l) for l, h in zip(low, high))
    offsets = [(np.arange(l, h) - c) * v for l, h, c, v in zip(low, high, centre, voxel_mm)]
    grids = [o.reshape([-1 if k == j else 1 for k in range(3)]) for j, o in enumerate(offsets)]
    local = [sum(orientation[j, k] * grids[j] for j in range(3)) for k in range(3)]
    radial = np.sqrt(sum((local[k] / (radius * axes[k])) ** 2 for k in range(3)))

    roughness_sigma = 4.0 / voxel_mm  # irregularity on a ~4 mm scale
    brain_box = brain[box]
    core = (radial * (1.0 + _CORE_ROUGHNESS * _smooth_noise(rng, box_shape, roughness_sigma)) < 1.0) & brain_box
    core = _largest_component(core)  # one connected core per tumour: no stray enhancing specks
    inner = ndimage.binary_erosion(core, iterations=1)  # keeps a rim of at least one voxel
    necrotic_radius = 1.0 - rim / radius
    necrosis = (radial * (1.0 + 0.15 * _smooth_noise(rng, box_shape, roughness_sigma)) < necrotic_radius) & inner
    necrosis = _largest_component(necrosis)

    # Edema: distance from the core, allowed to reach 0.3x as far in GM and up to 1.3x in WM,
    # so it fingers out along white matter; not into CSF spaces (ventricles, sulci).
    distance_to_core = ndimage.distance_transform_edt(~core, sampling=voxel_mm)
    wm_local = ndimage.gaussian_filter(tissue[2][box], 1.0)
    reach = edema_reach * (0.3 + 1.0 * wm_local) * (1.0 + 0.3 * _smooth_noise(rng, box_shape, roughness_sigma))
    edema = (distance_to_core < reach) & ~core & brain_box & (tissue[0][box] < 0.6)

    painted = labels[box].copy()
    new_edema = edema & (painted == BACKGROUND)  # an earlier tumour's core wins over this edema
    painted[new_edema] = EDEMA
    painted[core] = ENHANCING
    painted[necrosis] = NECROSIS
    if not (necrosis.any() and (painted[core] == ENHANCING).any() and new_edema.any()):
        return False
    labels[box] = painted
    return True


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes))


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """``exp(strength * f)`` with ``f`` a random quadratic polynomial of unit std over the grid."""
    if strength == 0:
        return np.ones(shape, dtype=np.float32)
    x, y, z = [np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if k == j else 1 for k in range(3)])
               for j, n in enumerate(shape)]
    terms = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    field = sum(rng.standard_normal() * t for t in terms)
    field = np.broadcast_to(field, shape).astype(np.float32)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return np.exp(strength * field)


def render_phantom(
    shape: Sequence[int],
    spacing: Sequence[float] | None,
    seed: int,
    site: str | SiteProfile = "A",
) -> Phantom:
    """Render one phantom in memory.

    The anatomy and tumours come from one random stream and the acquisition (texture, bias,
    noise) from another. The same seed at two sites therefore gives the same patient scanned
    twice.

    Args:
        shape: output grid ``(X, Y, Z)``, each >= 16.
        spacing: voxel size in mm; None uses the site's spacing.
        seed: non-negative integer; same seed, same arrays.
        site: a name in ``SITES`` or a ``SiteProfile``.

    Returns:
        The phantom; see ``Phantom``.
    """
    profile = _resolve_site(site)
    shape = _check_shape(shape)
    spacing_mm = np.array(_check_spacing(profile.spacing if spacing is None else spacing, "spacing"))
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    anatomy_rng, acquisition_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))

    tissue, brain, surface_distance, scale = _resample_anatomy(shape, spacing_mm, anatomy_rng)
    voxel_mm = spacing_mm / scale
    labels = np.zeros(shape, dtype=np.uint8)
    tumours = 2 if anatomy_rng.uniform() < 0.35 else 1
    placed = 0
    for _ in range(tumours):
        # Redraw a few times: a failed draw is rare, and deterministic given the seed.
        placed += any(_place_tumour(labels, tissue, brain, surface_distance, voxel_mm, anatomy_rng) for _ in range(5))
    if placed == 0:
        raise DataError(f"seed {seed}: could not place a complete tumour in a {shape} grid; use a larger shape")

    # Partial volume at compartment borders: soft memberships from lightly smoothed one-hot labels.
    soft = np.stack([ndimage.gaussian_filter((labels == k).astype(np.float32), 0.5) for k in (1, 3, 2)])
    healthy = np.clip(1.0 - soft.sum(0), 0.0, 1.0)
    textures = [1.0 + 0.08 * _smooth_noise(anatomy_rng, shape, 2.0 / voxel_mm) for _ in range(3)]

    images = np.empty((len(MODALITIES), *shape), dtype=np.float32)
    for m, modality in enumerate(MODALITIES):
        table = profile.contrast[modality].as_array()  # csf, gm, wm, necrosis, enhancing, edema
        clean = healthy * np.tensordot(table[:3], tissue, axes=1)
        for k in range(3):
            clean += soft[k] * table[3 + k] * textures[k]
        if profile.blur_sigma_mm > 0:
            clean = ndimage.gaussian_filter(clean, profile.blur_sigma_mm / voxel_mm, mode="nearest")
        clean *= _bias_field(acquisition_rng, shape, profile.bias_strength) * profile.gain
        sigma = profile.noise_std * table[2] * profile.gain
        real = clean + sigma * acquisition_rng.standard_normal(shape, dtype=np.float32)
        imaginary = sigma * acquisition_rng.standard_normal(shape, dtype=np.float32)
        magnitude = np.sqrt(real * real + imaginary * imaginary)
        # Strictly positive inside the brain, so that "non-zero" means "brain" downstream.
        images[m] = np.where(brain, np.maximum(magnitude, 1e-3 * profile.gain), 0.0)

    affine = np.diag([*spacing_mm, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * spacing_mm
    metadata = {
        "site": profile.name,
        "seed": int(seed),
        "shape": list(shape),
        "spacing": [float(s) for s in spacing_mm],
        "anatomy_scale": float(scale),
        "tumours": placed,
        "profile": dataclasses.asdict(profile),
        "generator": "raysemi.data.synth",
    }
    return Phantom(images=images, labels=labels, tissue=tissue, brain_mask=brain, affine=affine, metadata=metadata)


# --------------------------------------------------------------------------------------------
# Writing cases and data sets
# --------------------------------------------------------------------------------------------
def _save_nifti(array: np.ndarray, affine: np.ndarray, target: Path, dtype: type) -> None:
    image = nib.Nifti1Image(array.astype(dtype), affine)
    image.header.set_data_dtype(dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(target) as tmp:
        nib.save(image, tmp)


def write_phantom(phantom: Phantom, out_dir: str | Path, case_id: str, labeled: bool = True) -> Path:
    """Write ``phantom`` as ``<out_dir>/<case_id>/`` in the BraTS 2021 layout; returns that folder."""
    _check_case_id(case_id)
    case_dir = Path(out_dir) / case_id
    for m, modality in enumerate(MODALITIES):
        _save_nifti(phantom.images[m], phantom.affine, case_dir / f"{case_id}_{modality}.nii.gz", np.float32)
    if labeled:
        on_disk = np.where(phantom.labels == ENHANCING, 4, phantom.labels)
        _save_nifti(on_disk, phantom.affine, case_dir / f"{case_id}_seg.nii.gz", np.uint8)
    atomic_write_json(case_dir / f"{case_id}_site.json", {**phantom.metadata, "labeled": labeled})
    return case_dir


def _check_case_id(case_id: str) -> None:
    if not isinstance(case_id, str) or not CASE_ID_PATTERN.fullmatch(case_id):
        raise ConfigError(f"case id {case_id!r} must match {CASE_ID_PATTERN.pattern}")


def synth_case(
    out_dir: str | Path,
    case_id: str,
    shape: Sequence[int],
    spacing: Sequence[float] | None,
    seed: int,
    site: str | SiteProfile = "A",
    labeled: bool = True,
) -> Path:
    """Render one phantom and write it to ``<out_dir>/<case_id>/``.

    Args:
        out_dir: data set folder.
        case_id: folder and file prefix; must match ``[A-Za-z0-9][A-Za-z0-9._-]*``.
        shape: output grid ``(X, Y, Z)``.
        spacing: voxel size in mm; None uses the site's spacing.
        seed: case seed; same seed, same arrays.
        site: a name in ``SITES`` or a ``SiteProfile``.
        labeled: False leaves out ``<id>_seg.nii.gz`` (a scan nobody annotated).

    Returns:
        The case folder.
    """
    _check_case_id(case_id)
    return write_phantom(render_phantom(shape, spacing, seed, site), out_dir, case_id, labeled)


def case_seed(seed: int, site: str, index: int) -> int:
    """Seed of the ``index``-th case of ``site`` in a data set made with ``seed``.

    Derived with ``numpy.random.SeedSequence``, so a case does not change when more cases or
    more sites are generated.
    """
    site_key = zlib.crc32(site.encode("utf-8"))
    state = np.random.SeedSequence(int(seed), spawn_key=(site_key, int(index))).generate_state(2, dtype=np.uint32)
    return (int(state[0]) & 0x7FFFFFFF) << 32 | int(state[1])  # 63 bits: fits a signed int64 anywhere


def _plan(cases: int | None, sites: Sequence[str] | Mapping[str, int]) -> list[tuple[str, int]]:
    """``(site, index within site)`` for every case, in generation order."""
    if isinstance(sites, Mapping):
        counts = {name: int(n) for name, n in sites.items()}
        if any(n < 0 for n in counts.values()):
            raise ConfigError(f"site counts must be >= 0, got {dict(sites)}")
        if cases is not None and cases != sum(counts.values()):
            raise ConfigError(f"cases={cases} disagrees with the site counts {counts} (sum {sum(counts.values())})")
        return [(name, i) for name, n in counts.items() for i in range(n)]
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise ConfigError("sites must name at least one site")
    if cases is None or cases < 0:
        raise ConfigError(f"cases must be a non-negative integer when sites is a list, got {cases!r}")
    return [(names[i % len(names)], i // len(names)) for i in range(cases)]


def _synth_one(job: tuple[Path, str, tuple[int, int, int], Sequence[float] | None, int, str, bool]) -> Path:
    out_dir, case_id, shape, spacing, seed, site, png = job
    case_dir = synth_case(out_dir, case_id, shape, spacing, seed, site)
    if png:
        montage_png(case_dir, case_dir / f"{case_id}_montage.png")
    return case_dir


def synth_dataset(
    out_dir: str | Path,
    cases: int | None,
    shape: Sequence[int],
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    sites: Sequence[str] | Mapping[str, int] = ("A",),
    png: bool = False,
    workers: int = 1,
) -> list[Path]:
    """Write a labeled multi-site data set of phantoms.

    Cases are named ``SYNTH_<site>_<index:05d>``, with the index counted per site. The seed of
    case ``(site, index)`` is ``case_seed(seed, site, index)``, whatever else is generated.

    Args:
        out_dir: data set folder (created).
        cases: number of cases, shared round-robin over ``sites`` when it is a list (A, B, A, B,
            ...). With a ``{site: count}`` mapping, pass None (or the sum of the counts).
        shape: output grid ``(X, Y, Z)``.
        spacing: voxel size in mm for all sites; None uses each site's own spacing.
        seed: data set seed.
        sites: site names, or ``{site name: number of cases}``.
        png: also write ``<id>_montage.png`` for every case.
        workers: processes to use (more than 1 uses a spawn-started process pool).

    Returns:
        The case folders, in generation order.
    """
    plan = _plan(cases, sites)
    for name, _ in plan:
        _resolve_site(name)  # fail before any work on an unknown site
    shape = _check_shape(shape)
    jobs = [
        (Path(out_dir), f"SYNTH_{name}_{index:05d}", shape, spacing, case_seed(seed, name, index), name, png)
        for name, index in plan
    ]
    if workers <= 1 or len(jobs) <= 1:
        return [_synth_one(job) for job in jobs]
    # spawn, not fork: the caller may hold threads (torch, Ray) that fork would copy half-way.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_synth_one, jobs))


# --------------------------------------------------------------------------------------------
# Montage
# --------------------------------------------------------------------------------------------
#: Overlay colours (RGB): NCR/NET red, ED green, ET yellow, as in the BraTS papers' figures.
LABEL_COLOURS = {NECROSIS: (1.0, 0.0, 0.0), EDEMA: (0.0, 0.8, 0.0), ENHANCING: (1.0, 0.9, 0.0)}


def _read_case(case_dir: Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    case_id = case_dir.name
    volumes = []
    for modality in MODALITIES:
        path = case_dir / f"{case_id}_{modality}.nii.gz"
        if not path.is_file():
            raise DataError(f"case {case_id}: missing {path.name} in {case_dir}")
        image = nib.load(path)
        volumes.append(np.asarray(image.dataobj, dtype=np.float32))
    seg_path = case_dir / f"{case_id}_seg.nii.gz"
    labels = np.asarray(nib.load(seg_path).dataobj).astype(np.uint8) if seg_path.is_file() else None
    return np.stack(volumes), labels, np.asarray(image.header.get_zooms()[:3], dtype=float)


def montage_png(
    case: str | Path | Phantom | tuple[np.ndarray, np.ndarray | None],
    out_png: str | Path,
    title: str | None = None,
) -> Path:
    """Plot the four modalities on the axial slice with the most tumour, plus the labels.

    Args:
        case: a case folder (BraTS 2021 names), a ``Phantom``, or ``(images, labels)`` with images
            ``(4, X, Y, Z)`` and labels ``(X, Y, Z)`` (on-disk 0/1/2/4 or internal 0..3) or None.
        out_png: target PNG, written atomically.
        title: figure title; defaults to the case folder's name.

    Returns:
        ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spacing = np.ones(3)
    if isinstance(case, Phantom):
        images, labels, spacing = case.images, case.labels, np.abs(np.diag(case.affine)[:3])
    elif isinstance(case, (str, Path)):
        images, labels, spacing = _read_case(Path(case))
        title = title if title is not None else Path(case).name
    else:
        images, labels = case
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[0] != len(MODALITIES):
        raise DataError(f"montage: images must be (4, X, Y, Z), got {images.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != images.shape[1:]:
            raise DataError(f"montage: labels shape {labels.shape} does not match images {images.shape[1:]}")
        tumour_per_slice = (labels > 0).sum(axis=(0, 1))
    else:
        tumour_per_slice = np.zeros(images.shape[-1])
    # Most tumour; with no tumour (or no labels), the slice with the most brain.
    brain_per_slice = (images[0] > 0).sum(axis=(0, 1))
    z = int(np.argmax(tumour_per_slice)) if tumour_per_slice.max() > 0 else int(np.argmax(brain_per_slice))

    panels = len(MODALITIES) + (labels is not None)
    figure, axes = plt.subplots(1, panels, figsize=(3.0 * panels, 3.4), facecolor="black")
    aspect = spacing[1] / spacing[0]
    for ax, modality, volume in zip(axes, MODALITIES, images):
        brain_values = volume[volume > 0]
        top = float(np.percentile(brain_values, 99.5)) if brain_values.size else 1.0
        ax.imshow(volume[:, :, z].T, origin="lower", cmap="gray", vmin=0, vmax=top, aspect=aspect)
        ax.set_title(modality.upper(), color="white")
    if labels is not None:
        ax = axes[-1]
        ax.imshow(images[3][:, :, z].T, origin="lower", cmap="gray", aspect=aspect,
                  vmin=0, vmax=float(np.percentile(images[3][images[3] > 0], 99.5)) if (images[3] > 0).any() else 1)
        overlay = np.zeros((*labels.shape[:2], 4), dtype=np.float32)
        slice_labels = labels[:, :, z]
        for label, colour in LABEL_COLOURS.items():
            hit = slice_labels == label
            if label == ENHANCING:
                hit |= slice_labels == 4  # on-disk ET
            overlay[hit] = (*colour, 0.6)
        ax.imshow(overlay.transpose(1, 0, 2), origin="lower", aspect=aspect)
        ax.set_title("NCR red  ED green  ET yellow", color="white", fontsize=8)
    for ax in axes:
        ax.axis("off")
    figure.suptitle(f"{title or 'phantom'}  (axial z={z})", color="white")
    figure.tight_layout()
    out_png = Path(out_png)
    try:
        with atomic_path(out_png) as tmp:
            figure.savefig(tmp, format="png", dpi=100, facecolor="black")
    finally:
        plt.close(figure)
    return out_png
