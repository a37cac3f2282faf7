"""Ray Data training stream on a real local Ray cluster and real generated NIfTI cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysemi.data.brats import discover_cases
from raysemi.data.nifti import load_case_arrays, write_ras
from raysemi.data.pipeline import PatchSpec, TrainingItem, training_dataset
from raysemi.data.transforms import MASK_HIGH, MASK_LOW

PATCH = (32, 32, 32)


def _collect(dataset) -> list[dict[str, np.ndarray]]:
    return [
        {k: v.numpy() for k, v in batch.items()}
        for batch in dataset.iter_torch_batches(batch_size=4, drop_last=False)
    ]


def _spec(ratio: float, seed: int = 0, per_volume: int = 4, augment: bool = True) -> PatchSpec:
    return PatchSpec(patch_size=PATCH, patches_per_volume=per_volume, foreground_ratio=ratio, augment=augment, seed=seed)


@pytest.fixture(scope="module")
def cases(synth_root):
    return discover_cases(synth_root)[:3]


def test_patches_have_configured_shape_labels_and_count(ray_cluster, cases):
    items = [TrainingItem(c) for c in cases]
    # No augmentation here: intensity shifts would move the zero padding checked below.
    batches = _collect(training_dataset(items, _spec(0.5, augment=False), repeats=2))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    masks = np.concatenate([b["mask"] for b in batches])
    # 3 cases x 2 repeats x 4 patches per volume
    assert images.shape == (24, 4, *PATCH)
    assert images.dtype == np.float32
    assert labels.shape == (24, *PATCH)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    assert 3 in set(np.unique(labels)), "on-disk label 4 must arrive as internal 3"
    # Labeled patches are all "learn" (1); only padding added to reach the patch size is 0 (ignored),
    # and padding is background in the image too.
    assert set(np.unique(masks)) <= {0, MASK_HIGH}
    assert np.all(images.transpose(1, 0, 2, 3, 4)[:, masks == 0] == 0)
    assert not np.concatenate([b["is_pseudo"] for b in batches]).any()


def test_foreground_oversampling_rate(ray_cluster, cases):
    items = [TrainingItem(c) for c in cases]
    all_fg = np.concatenate([b["label"] for b in _collect(training_dataset(items, _spec(1.0, per_volume=8), 1))])
    share_all = np.mean([(patch > 0).any() for patch in all_fg])
    assert share_all == 1.0, "foreground_ratio=1 centres every patch on tumour"

    half = np.concatenate([b["label"] for b in _collect(training_dataset(items, _spec(0.5, per_volume=16), 1))])
    share_half = np.mean([(patch > 0).any() for patch in half])
    # At least the positive half contains tumour; negative patches may catch some tumour too.
    assert share_half >= 0.5 - 1e-9
    none = np.concatenate([b["label"] for b in _collect(training_dataset(items, _spec(0.0, per_volume=16), 1))])
    tumour_voxels_none = np.mean([(patch > 0).mean() for patch in none])
    tumour_voxels_all = np.mean([(patch > 0).mean() for patch in all_fg])
    assert tumour_voxels_none < tumour_voxels_all


def test_same_seed_same_patches_new_seed_new_patches(ray_cluster, cases):
    items = [TrainingItem(c) for c in cases[:2]]

    def fingerprint(seed: int) -> list[float]:
        batches = _collect(training_dataset(items, _spec(0.5, seed=seed, per_volume=2), 1))
        return sorted(float(np.round(image.sum(), 3)) for b in batches for image in b["image"])

    assert fingerprint(3) == fingerprint(3)
    assert fingerprint(3) != fingerprint(4)


def test_pseudo_label_and_mask_travel_with_the_patch(ray_cluster, cases, tmp_path):
    case = cases[0]
    arrays = load_case_arrays(case, with_seg=False)
    shape = arrays.image.shape[1:]
    # A hand-made pseudo-label: everything inside the brain is edema (2), the rest background;
    # the mask marks the left half "low" and the right half "high".
    brain = np.any(arrays.image != 0, axis=0)
    pseudo = np.where(brain, 2, 0).astype(np.uint8)
    mask = np.full(shape, MASK_HIGH, dtype=np.uint8)
    mask[: shape[0] // 2] = MASK_LOW
    write_ras(pseudo, arrays.affine, tmp_path / "label.nii.gz", dtype=np.uint8)
    write_ras(mask, arrays.affine, tmp_path / "mask.nii.gz", dtype=np.uint8)
    item = TrainingItem(case, str(tmp_path / "label.nii.gz"), str(tmp_path / "mask.nii.gz"))
    batches = _collect(training_dataset([item], _spec(1.0, augment=False), 1))
    labels = np.concatenate([b["label"] for b in batches])
    masks = np.concatenate([b["mask"] for b in batches])
    assert np.concatenate([b["is_pseudo"] for b in batches]).all()
    assert set(np.unique(labels)) <= {0, 2}
    assert set(np.unique(masks)) <= {MASK_HIGH, MASK_LOW}
    assert (labels == 2).any()


def test_batches_convert_to_torch_for_training(ray_cluster, cases):
    dataset = training_dataset([TrainingItem(cases[0])], _spec(0.5, per_volume=2), 1)
    batch = next(iter(dataset.iter_torch_batches(batch_size=2)))
    assert isinstance(batch["image"], torch.Tensor) and batch["image"].shape == (2, 4, *PATCH)
    assert batch["is_pseudo"].dtype == torch.bool


def test_balance_labeled_repeats_ground_truth_to_the_share(cases):
    from raysemi.data.pipeline import balance_labeled

    labeled = [TrainingItem(cases[0])]
    pseudo = [TrainingItem(cases[1], "l.nii.gz", "m.nii.gz")] * 3
    # share 0.5 with 1 labeled vs 3 pseudo: the labeled case is needed 3 times
    mixed = balance_labeled(labeled, pseudo, 0.5)
    assert sum(not item.pseudo_label for item in mixed) == 3 and len(mixed) == 6
    # share 0.2: 1 of 4 is already 25 % >= 20 %
    assert balance_labeled(labeled, pseudo, 0.2) == labeled + pseudo
    assert balance_labeled(labeled, pseudo, None) == labeled + pseudo
    assert balance_labeled(labeled, [], 0.5) == labeled
