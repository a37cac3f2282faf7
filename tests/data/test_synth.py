"""Tests of the demo phantoms: BraTS layout, determinism, labels, tissue contrasts, sites, geometry, montage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from raysemi.data import synth
from raysemi.errors import ConfigError

SHAPE = (64, 64, 48)
MODALITIES = ("t1", "t1ce", "t2", "flair")
ONE_TUMOUR_SEED, TWO_TUMOUR_SEED = 0, 4


def _load(case_dir: Path, suffix: str) -> nib.Nifti1Image:
    return nib.load(case_dir / f"{case_dir.name}_{suffix}.nii.gz")


def _images(case_dir: Path) -> np.ndarray:
    return np.stack([np.asarray(_load(case_dir, m).dataobj) for m in MODALITIES])


def _neighbour_noise(image: np.ndarray, mask: np.ndarray) -> float:
    """Noise std relative to the mean, from differences of x-neighbours both inside ``mask``.

    Independent of the generator: for white noise of std s, I[x+1] - I[x] has std s * sqrt(2),
    and the smooth anatomy and bias field inside pure white matter hardly change between neighbours.
    """
    pairs = mask[1:] & mask[:-1]
    differences = (image[1:] - image[:-1])[pairs]
    return float(differences.std() / np.sqrt(2) / image[mask].mean())


def _healthy(phantom: synth.Phantom) -> np.ndarray:
    """Brain voxels at least 2 voxels away from any tumour label."""
    return phantom.brain_mask & ~ndimage.binary_dilation(phantom.labels > 0, iterations=2)


@pytest.fixture(scope="module")
def phantoms() -> dict[str, synth.Phantom]:
    """The same seed rendered at both built-in sites, each at its own spacing."""
    return {site: synth.render_phantom(SHAPE, None, TWO_TUMOUR_SEED, site) for site in ("A", "B")}


@pytest.mark.parametrize("labeled", [True, False])
def test_case_files_follow_the_brats_2021_layout(tmp_path: Path, labeled: bool) -> None:
    case_dir = synth.synth_case(tmp_path, "SYNTH_A_00001", SHAPE, None, seed=1, labeled=labeled)

    assert case_dir == tmp_path / "SYNTH_A_00001"
    expected = {f"SYNTH_A_00001_{m}.nii.gz" for m in MODALITIES} | {"SYNTH_A_00001_site.json"}
    if labeled:
        expected.add("SYNTH_A_00001_seg.nii.gz")
    assert {p.name for p in case_dir.iterdir()} == expected  # also: no temporary files left behind
    for modality in MODALITIES:
        assert _load(case_dir, modality).get_data_dtype() == np.float32
    assert json.loads((case_dir / "SYNTH_A_00001_site.json").read_text())["labeled"] is labeled


def test_same_seed_gives_identical_arrays_and_another_seed_differs(tmp_path: Path) -> None:
    first = synth.synth_case(tmp_path / "run1", "c", SHAPE, None, seed=7, site="B")
    again = synth.synth_case(tmp_path / "run2", "c", SHAPE, None, seed=7, site="B")
    other = synth.synth_case(tmp_path / "run3", "c", SHAPE, None, seed=8, site="B")

    for suffix in (*MODALITIES, "seg"):
        a, b, c = (np.asarray(_load(d, suffix).dataobj) for d in (first, again, other))
        assert np.array_equal(a, b), suffix
        assert not np.array_equal(a, c), suffix


@pytest.mark.parametrize("seed", [ONE_TUMOUR_SEED, TWO_TUMOUR_SEED])
def test_seg_uses_brats_labels_and_every_tumour_has_all_three_compartments(tmp_path: Path, seed: int) -> None:
    case_dir = synth.synth_case(tmp_path, "case", SHAPE, None, seed=seed, site="A")
    seg_image = _load(case_dir, "seg")
    seg = np.asarray(seg_image.dataobj)
    tumours = json.loads((case_dir / "case_site.json").read_text())["tumours"]

    assert seg_image.get_data_dtype() == np.uint8
    assert set(np.unique(seg)) == {0, 1, 2, 4}
    cores, count = ndimage.label(np.isin(seg, (1, 4)))
    assert count == tumours
    if seed == TWO_TUMOUR_SEED:
        assert count == 2, "this seed no longer draws two tumours; pick another TWO_TUMOUR_SEED"
    for index in range(1, count + 1):
        core = cores == index
        assert (seg[core] == 1).any() and (seg[core] == 4).any()
        assert (seg[ndimage.binary_dilation(core)] == 2).any(), "each core is surrounded by some edema"


def test_images_are_zero_outside_the_brain_positive_inside_and_finite(tmp_path: Path) -> None:
    phantom = synth.render_phantom(SHAPE, None, 3, "B")
    case_dir = synth.write_phantom(phantom, tmp_path, "case")
    images = _images(case_dir)
    seg = np.asarray(_load(case_dir, "seg").dataobj)

    assert np.isfinite(images).all()
    assert phantom.brain_mask.any() and (~phantom.brain_mask).any()
    for volume in images:
        assert np.array_equal(volume != 0, phantom.brain_mask)  # skull-stripped: support == brain
        assert (volume[phantom.brain_mask] > 0).all()
    assert not seg[~phantom.brain_mask].any(), "tumour labels only inside the brain"


@pytest.mark.parametrize("site", ["A", "B"])
def test_tissue_contrasts_follow_the_mri_physics(phantoms: dict[str, synth.Phantom], site: str) -> None:
    phantom = phantoms[site]
    healthy = _healthy(phantom)
    csf, gm, wm = phantom.tissue
    regions = {
        "csf": healthy & (csf > 0.7),
        "gm": healthy & (gm > 0.8),
        "wm": healthy & (wm > 0.9),
        "necrosis": phantom.labels == 1,
        "edema": phantom.labels == 2,
        "enhancing": phantom.labels == 3,
    }
    assert all(mask.sum() >= 20 for mask in regions.values()), {k: int(m.sum()) for k, m in regions.items()}
    mean = {
        modality: {name: float(phantom.images[m][mask].mean()) for name, mask in regions.items()}
        for m, modality in enumerate(MODALITIES)
    }

    assert mean["t1"]["wm"] > mean["t1"]["gm"] > mean["t1"]["csf"]
    assert mean["t1"]["edema"] < mean["t1"]["wm"]
    assert mean["t1ce"]["enhancing"] > mean["t1ce"]["wm"]
    assert mean["t1ce"]["enhancing"] > mean["t1ce"]["necrosis"]
    assert mean["t1ce"]["enhancing"] > mean["t1ce"]["edema"]
    assert mean["t2"]["csf"] > mean["t2"]["gm"] > mean["t2"]["wm"]
    assert mean["t2"]["edema"] > mean["t2"]["wm"]
    assert mean["flair"]["csf"] < mean["flair"]["wm"]
    assert mean["flair"]["edema"] > mean["flair"]["gm"]
    assert mean["flair"]["edema"] > mean["flair"]["wm"]


@pytest.mark.parametrize("site", ["A", "B"])
def test_edema_stays_in_brain_tissue_and_prefers_white_matter(phantoms: dict[str, synth.Phantom], site: str) -> None:
    phantom = phantoms[site]
    csf, _, wm = phantom.tissue
    edema = phantom.labels == 2

    assert (csf[edema] < 0.5).mean() > 0.9
    assert wm[edema].mean() > wm[phantom.brain_mask].mean() + 0.15


def test_site_json_names_the_site_and_its_parameters(tmp_path: Path) -> None:
    case_dir = synth.synth_case(tmp_path, "case", SHAPE, None, seed=11, site="B")
    record = json.loads((case_dir / "case_site.json").read_text())

    assert record["site"] == "B"
    assert record["seed"] == 11
    assert record["spacing"] == [1.0, 1.0, 2.0]
    assert record["profile"]["noise_std"] == synth.SITES["B"].noise_std
    assert record["profile"]["contrast"]["t1ce"]["enhancing"] == synth.SITES["B"].contrast["t1ce"].enhancing


@pytest.mark.parametrize("noise_std", [0.02, 0.08])
def test_measured_white_matter_noise_matches_the_configured_noise_std(noise_std: float) -> None:
    profile = dataclasses.replace(synth.SITES["A"], name="test", noise_std=noise_std, bias_strength=0.0)
    phantom = synth.render_phantom(SHAPE, None, 2, profile)
    pure_wm = _healthy(phantom) & (phantom.tissue[2] > 0.97)

    measured = [_neighbour_noise(volume, pure_wm) for volume in phantom.images]

    assert np.mean(measured) == pytest.approx(noise_std, rel=0.15)


def test_sites_a_and_b_differ_as_configured(phantoms: dict[str, synth.Phantom]) -> None:
    a, b = phantoms["A"], phantoms["B"]
    noise = {}
    contrast = {}
    for name, phantom in (("A", a), ("B", b)):
        pure_wm = _healthy(phantom) & (phantom.tissue[2] > 0.97)
        noise[name] = np.mean([_neighbour_noise(volume, pure_wm) for volume in phantom.images])
        t1ce = phantom.images[1]
        contrast[name] = t1ce[phantom.labels == 3].mean() / t1ce[phantom.labels == 2].mean()

    configured_ratio = synth.SITES["B"].noise_std / synth.SITES["A"].noise_std
    assert noise["B"] / noise["A"] == pytest.approx(configured_ratio, rel=0.25)
    assert contrast["A"] > contrast["B"] * 1.2  # enhancing vs edema on T1ce: weaker at site B
    # Different scanner gain: raw intensities are on different scales.
    assert np.median(a.images[0][a.brain_mask]) > 1.5 * np.median(b.images[0][b.brain_mask])


def _template_brain_extent_mm() -> np.ndarray:
    """Bounding box of the MNI152 brain, read straight from the nilearn file."""
    folder = Path(synth._template_dir())
    t1 = np.asarray(nib.load(folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").dataobj)
    corners = np.argwhere(t1 > 0.2 * t1.max())
    return (corners.max(0) - corners.min(0) + 1).astype(float)  # template voxels are 1 mm


def test_spacing_and_affine_are_written_as_requested_and_physical(tmp_path: Path) -> None:
    spacing = (1.5, 1.25, 2.5)
    case_dir = synth.synth_case(tmp_path, "case", SHAPE, spacing, seed=5, site="A")
    image = _load(case_dir, "flair")
    anatomy_scale = json.loads((case_dir / "case_site.json").read_text())["anatomy_scale"]

    assert image.header.get_zooms() == pytest.approx(spacing)
    assert np.allclose(image.affine[:3, :3], np.diag(spacing))
    centre = nib.affines.apply_affine(image.affine, (np.array(SHAPE) - 1) / 2)
    assert np.allclose(centre, 0.0), "the field of view is centred on world (0, 0, 0)"
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    assert np.array_equal(_load(case_dir, "seg").affine, image.affine)

    # The brain spans the template's brain size in every direction, whatever the spacing
    # (within the ±10° rotation and the partial-volume edge).
    brain = np.asarray(image.dataobj) > 0
    voxels = np.array([np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != k))).size for k in range(3)])
    extent_anatomy_mm = voxels * np.array(spacing) / anatomy_scale
    assert extent_anatomy_mm == pytest.approx(_template_brain_extent_mm(), rel=0.15)


def test_default_spacing_is_the_site_spacing(tmp_path: Path) -> None:
    case_dir = synth.synth_case(tmp_path, "case", SHAPE, None, seed=5, site="B")
    assert _load(case_dir, "t2").header.get_zooms() == pytest.approx((1.0, 1.0, 2.0))


def test_synth_dataset_names_cases_per_site_and_seeds_do_not_depend_on_the_count(tmp_path: Path) -> None:
    shape = (32, 32, 32)
    counted = synth.synth_dataset(tmp_path / "counted", None, shape, seed=3, sites={"A": 1, "B": 2})
    round_robin = synth.synth_dataset(tmp_path / "rr", 2, shape, seed=3, sites=("B", "A"))

    assert [p.name for p in counted] == ["SYNTH_A_00000", "SYNTH_B_00000", "SYNTH_B_00001"]
    assert [p.name for p in round_robin] == ["SYNTH_B_00000", "SYNTH_A_00000"]
    for name in ("SYNTH_A_00000", "SYNTH_B_00000"):
        assert np.array_equal(_images(tmp_path / "counted" / name), _images(tmp_path / "rr" / name))
    records = [json.loads((p / f"{p.name}_site.json").read_text()) for p in counted]
    assert [r["site"] for r in records] == ["A", "B", "B"]
    assert len({r["seed"] for r in records}) == 3


def test_synth_dataset_with_worker_processes_writes_the_same_files_as_serial(tmp_path: Path) -> None:
    serial = synth.synth_dataset(tmp_path / "serial", 2, (24, 24, 24), seed=9, sites=("A", "B"))
    parallel = synth.synth_dataset(tmp_path / "parallel", 2, (24, 24, 24), seed=9, sites=("A", "B"), workers=2)

    assert [p.name for p in parallel] == [p.name for p in serial]
    for one, two in zip(serial, parallel):
        for suffix in (*MODALITIES, "seg"):
            name = f"{one.name}_{suffix}.nii.gz"
            assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_synth_dataset_rejects_a_case_count_that_disagrees_with_site_counts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="disagrees"):
        synth.synth_dataset(tmp_path, 5, (32, 32, 32), sites={"A": 1, "B": 1})


def _coloured_pixels(rgb: np.ndarray, colour: str) -> int:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    tests = {
        "red": (r > g + 0.3) & (r > b + 0.3),
        "green": (g > r + 0.2) & (g > b + 0.2),
        "yellow": (r > b + 0.3) & (g > b + 0.3) & (abs(r - g) < 0.2),
    }
    return int(tests[colour].sum())


def test_montage_png_shows_four_modalities_and_a_brats_coloured_overlay(tmp_path: Path) -> None:
    [case_dir] = synth.synth_dataset(tmp_path, 1, SHAPE, seed=4, sites=("A",), png=True)
    png = case_dir / "SYNTH_A_00000_montage.png"

    rgb = matplotlib.image.imread(png)[..., :3]
    assert rgb.shape[1] > 4 * rgb.shape[0], "five panels side by side"
    assert (rgb.max(-1) > 0.2).mean() > 0.1, "brain slices are visible"
    assert _coloured_pixels(rgb, "green") > 50  # edema
    assert _coloured_pixels(rgb, "red") + _coloured_pixels(rgb, "yellow") > 20  # core


def test_montage_of_an_unlabeled_case_has_no_overlay(tmp_path: Path) -> None:
    case_dir = synth.synth_case(tmp_path, "case", SHAPE, None, seed=4, labeled=False)
    png = synth.montage_png(case_dir, tmp_path / "montage.png")

    rgb = matplotlib.image.imread(png)[..., :3]
    assert rgb.shape[1] < 4.5 * rgb.shape[0], "four panels"
    assert _coloured_pixels(rgb, "green") == 0 and _coloured_pixels(rgb, "red") == 0


def test_module_docstring_tables_match_the_sites() -> None:
    assert synth.site_table_markdown() in synth.__doc__


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda out: synth.synth_case(out, "case", SHAPE, None, 0, site="C"), "unknown site 'C'"),
        (lambda out: synth.synth_case(out, "../escape", SHAPE, None, 0), "case id"),
        (lambda out: synth.synth_case(out, "case", (64, 64), None, 0), "shape"),
        (lambda out: synth.synth_case(out, "case", SHAPE, (1.0, 0.0, 1.0), 0), "spacing"),
        (lambda out: synth.synth_case(out, "case", SHAPE, None, -1), "seed"),
    ],
)
def test_bad_arguments_raise_config_errors_that_name_the_argument(tmp_path: Path, call, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call(tmp_path)
    assert not any(tmp_path.iterdir()), "nothing written"


def test_a_site_profile_must_cover_all_four_modalities() -> None:
    contrast = dict(synth.SITES["A"].contrast)
    del contrast["flair"]
    with pytest.raises(ConfigError, match="modalities"):
        dataclasses.replace(synth.SITES["A"], contrast=contrast)
