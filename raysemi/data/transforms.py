"""Preprocessing and patch sampling (plain numpy + MONAI transforms, no Ray).

One case goes through the same steps everywhere (training, validation, pseudo-labeling, predict):

1. read the four modalities in RAS orientation (:func:`raysemi.data.nifti.load_case_arrays`);
2. crop to the brain bounding box (the brain is every voxel where any modality is non-zero,
   as in skull-stripped BraTS);
3. z-score each modality over its brain voxels (MONAI ``NormalizeIntensity(nonzero=True)``).

The crop box is kept, so a prediction on the cropped volume is pasted back into the full RAS
frame (:func:`paste_back`) and from there written in the source orientation.

Training patches come from MONAI ``RandCropByPosNegLabeld`` (foreground oversampling) followed by
flips and intensity jitter. Each sampler is seeded from (seed, case id, repeat) so that a run is
reproducible and every epoch sees new patches.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    NormalizeIntensity,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from monai.transforms.utils import generate_spatial_bounding_box

from raysemi.data.brats import CaseRecord
from raysemi.data.nifti import load_case_arrays, load_ras

# Values of the per-voxel training mask that travels with every patch.
MASK_IGNORE, MASK_HIGH, MASK_LOW = 0, 1, 2


@dataclass
class PreprocessedCase:
    """A case ready for the network.

    Attributes:
        case_id: the case.
        image: (4, x, y, z) float32, z-scored over brain voxels, cropped to the brain box.
        label: (x, y, z) uint8 internal labels (0..3), cropped, or None when the case has none.
        brain: (x, y, z) bool brain mask (any modality non-zero before normalisation).
        box_start, box_end: the crop box in the full RAS frame (end exclusive).
        full_shape: spatial shape of the full RAS volume.
        affine: the RAS affine of the full volume.
        spacing: voxel size in mm along the RAS axes.
        extra: other cropped arrays that travel with the case (pseudo-label, mask, truth).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    brain: np.ndarray
    box_start: tuple[int, int, int]
    box_end: tuple[int, int, int]
    full_shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def crop(self, full: np.ndarray) -> np.ndarray:
        """Crop a full-frame array (..., X, Y, Z) to this case's brain box."""
        (x0, y0, z0), (x1, y1, z1) = self.box_start, self.box_end
        return full[..., x0:x1, y0:y1, z0:z1]


def preprocess_case(
    case: CaseRecord, with_seg: bool = True, extra_paths: dict[str, str] | None = None
) -> PreprocessedCase:
    """Read, crop and normalise one case.

    Args:
        case: the case record.
        with_seg: read the ground-truth seg when the case has one.
        extra_paths: name -> NIfTI path of label-like arrays in the case's frame (pseudo-label, mask),
            cropped with the same box.
    """
    arrays = load_case_arrays(case, with_seg=with_seg)
    brain_full = np.any(arrays.image != 0, axis=0)
    if brain_full.any():
        start, end = generate_spatial_bounding_box(brain_full[None])
    else:  # an all-zero scan: keep the full frame, the model sees zeros
        start, end = [0, 0, 0], list(brain_full.shape)
    start, end = tuple(int(s) for s in start), tuple(int(e) for e in end)
    box = (slice(start[0], end[0]), slice(start[1], end[1]), slice(start[2], end[2]))
    image = arrays.image[(slice(None),) + box]
    brain = brain_full[box]
    image = np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(image), dtype=np.float32)
    label = arrays.seg[box] if arrays.seg is not None else None
    extra = {}
    for name, path in (extra_paths or {}).items():
        data, _ = load_ras(path)
        if data.shape != brain_full.shape:
            raise ValueError(
                f"case {case.case_id}: {name} file {path} has shape {data.shape}, expected {brain_full.shape}"
            )
        extra[name] = np.asarray(data[box])
    return PreprocessedCase(
        case_id=case.case_id,
        image=image,
        label=label,
        brain=brain,
        box_start=start,
        box_end=end,
        full_shape=tuple(int(s) for s in brain_full.shape),
        affine=arrays.affine,
        spacing=tuple(float(s) for s in arrays.spacing),
        extra=extra,
    )


def paste_back(cropped: np.ndarray, case: PreprocessedCase, fill: float = 0) -> np.ndarray:
    """Put a cropped array (..., x, y, z) back into the full RAS frame (..., X, Y, Z)."""
    full = np.full(cropped.shape[:-3] + case.full_shape, fill, dtype=cropped.dtype)
    (x0, y0, z0), (x1, y1, z1) = case.box_start, case.box_end
    full[..., x0:x1, y0:y1, z0:z1] = cropped
    return full


def case_seed(seed: int, case_id: str, repeat: int) -> int:
    """A stable 32-bit seed from (seed, case id, repeat); Python's hash() is salted per process."""
    return int(np.random.SeedSequence([seed, zlib.crc32(case_id.encode()), repeat]).generate_state(1)[0])


def patch_sampler(
    patch_size: tuple[int, int, int], num_patches: int, foreground_ratio: float, augment: bool
) -> Compose:
    """MONAI chain: pad to the patch size, foreground-oversampled random crops, flips, intensity jitter.

    Keys: ``image`` (4, x, y, z) float32, ``label`` (1, x, y, z) and ``mask`` (1, x, y, z).
    The label that guides foreground sampling is the ground truth for labeled cases and the
    pseudo-label for pseudo-labeled ones.
    """
    keys = ["image", "label", "mask"]
    steps: list[Any] = [
        SpatialPadd(keys, spatial_size=patch_size),
        RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=patch_size,
            pos=foreground_ratio,
            neg=1.0 - foreground_ratio,
            num_samples=num_patches,
            allow_smaller=False,
        ),
    ]
    if augment:
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
        steps += [
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    return Compose(steps)


def sample_patches(
    case: PreprocessedCase,
    label: np.ndarray,
    mask: np.ndarray,
    patch_size: tuple[int, int, int],
    num_patches: int,
    foreground_ratio: float,
    augment: bool,
    seed: int,
) -> list[dict[str, np.ndarray]]:
    """Draw ``num_patches`` training patches from a preprocessed case.

    Args:
        case: the preprocessed case (its image is used).
        label: (x, y, z) internal labels that the patches carry (truth or pseudo-label).
        mask: (x, y, z) uint8 training mask (MASK_HIGH / MASK_LOW / MASK_IGNORE).
        seed: seeds the crop positions and augmentation.

    Returns:
        dicts with ``image`` (4, P, P, P) float32, ``label`` (P, P, P) uint8, ``mask`` (P, P, P) uint8.
    """
    sampler = patch_sampler(patch_size, num_patches, foreground_ratio, augment)
    sampler.set_random_state(seed=seed)
    # MONAI warns and samples background only when a label has no foreground; that is what we want.
    out = sampler({"image": case.image, "label": label[None], "mask": mask[None]})
    patches = []
    for item in out:
        patches.append(
            {
                "image": np.ascontiguousarray(np.asarray(item["image"], dtype=np.float32)),
                "label": np.ascontiguousarray(np.asarray(item["label"][0], dtype=np.uint8)),
                "mask": np.ascontiguousarray(np.asarray(item["mask"][0], dtype=np.uint8)),
            }
        )
    return patches
