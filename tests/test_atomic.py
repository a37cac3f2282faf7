"""Atomic writes (raysemi/atomic.py): a write that dies half way leaves the previous version.

The interruption test runs one writer in a child process (this module, run as
``python -m tests.test_atomic WRITER FOLDER``) that rewrites its target again and again. Inside
each atomic block the bytes go to disk in slow chunks, so a SIGKILL lands mid-write; before the
first chunk the child records the checksum of the bytes it is about to write. The parent kills
the child while a temporary file is less than half written, then checks that the target holds
exactly the version before the interrupted one and still loads.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from raysemi.atomic import atomic_path, atomic_write_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
CHUNKS, CHUNK_PAUSE_S = 40, 0.025  # about one second per file: the kill has time to land mid-write
INTENDED_LOG = "intended.log"  # "<temp file name> <sha256> <size>" per write, logged before its first byte
POOL_RECORDS = 3000
_intended_log: Path | None = None  # set in the child: <the child's folder>/../intended.log


# -- the child process: one writer, rewriting its target until killed ------------------------------


def _slow_write(path: Path, data: bytes) -> None:
    """Record what is about to be written (durably), then write it in slow chunks."""
    with open(_intended_log, "a") as handle:
        handle.write(f"{path.name} {hashlib.sha256(data).hexdigest()} {len(data)}\n")
        handle.flush()
        os.fsync(handle.fileno())
    chunk = max(1, -(-len(data) // CHUNKS))
    with open(path, "wb") as handle:
        for start in range(0, len(data), chunk):
            handle.write(data[start : start + chunk])
            handle.flush()
            time.sleep(CHUNK_PAUSE_S)


def _pool_record(index: int):
    from raysemi.semi.pool import PoolRecord

    confidence = (index % 997) / 997
    return PoolRecord(
        case_id=f"CASE_{index:05d}",
        confidence=confidence,
        initial_confidence=confidence,
        label_path=f"pseudo/v1/CASE_{index:05d}_label.nii.gz",
        uncertainty_path=f"pseudo/v1/CASE_{index:05d}_uncertainty.nii.gz",
        mask_path=f"pseudo/v1/CASE_{index:05d}_mask.nii.gz",
    )


def _bytes_versions(out: Path) -> None:
    import pathlib

    pathlib.Path.write_bytes = lambda self, data: _slow_write(self, data)
    for version in range(10_000):
        atomic_write_bytes(out / "blob.bin", random.Random(version).randbytes(2 * 1024**2))


def _checkpoint_versions(out: Path) -> None:
    import torch

    from raysemi.config import RaysemiConfig
    from raysemi.model import build_model_from_config
    from raysemi.train.checkpoint import TrainState, save_checkpoint

    torch_save = torch.save

    def slow_torch_save(obj, path) -> None:
        buffer = io.BytesIO()
        torch_save(obj, buffer)
        _slow_write(Path(path), buffer.getvalue())

    torch.save = slow_torch_save
    cfg = RaysemiConfig.from_dict({"model": {"preset": "tiny"}})
    model = build_model_from_config(cfg.model)
    for version in range(10_000):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)  # every version has other weights, so other bytes
        save_checkpoint(out / "checkpoint", model, None, None, TrainState(epoch=version), {"role": "teacher"})


def _pool_snapshot_versions(out: Path) -> None:
    import pathlib

    from raysemi.atomic import atomic_write_json
    from raysemi.semi.curriculum import CurriculumSchedule
    from raysemi.semi.pool import PseudoLabelPool

    schedule = CurriculumSchedule(stages=2)
    in_memory = PseudoLabelPool(None, schedule)
    for index in range(POOL_RECORDS):
        in_memory.add(_pool_record(index))
    atomic_write_json(out / "snapshot.json", in_memory.to_dict())  # the big first version, written fast
    pool = PseudoLabelPool.restore(out / "snapshot.json", schedule)
    pathlib.Path.write_bytes = lambda self, data: _slow_write(self, data)
    for index in range(POOL_RECORDS, POOL_RECORDS + 10_000):
        pool.add(_pool_record(index))


def _pseudo_label_versions(out: Path) -> None:
    import nibabel

    from raysemi.data.transforms import PreprocessedCase
    from raysemi.inference.outputs import write_pseudo_label

    def slow_nifti_save(image, filename) -> None:
        data = image.to_bytes()
        if str(filename).endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        _slow_write(Path(filename), data)

    nibabel.save = slow_nifti_save
    full, box = (64, 64, 64), ((4, 4, 4), (60, 60, 60))
    inner = tuple(end - start for start, end in zip(*box))
    for version in range(10_000):
        rng = np.random.default_rng(version)
        case = PreprocessedCase(
            case_id="CASE_1", image=np.zeros((4, *inner), np.float32), label=None,
            brain=np.ones(inner, bool), box_start=box[0], box_end=box[1], full_shape=full,
            affine=np.diag([2.0, 2.0, 2.0, 1.0]), spacing=(2.0, 2.0, 2.0),
        )
        labels = rng.integers(0, 4, inner).astype(np.uint8)
        write_pseudo_label(case, out / "pseudo", labels, rng.random(inner, dtype=np.float32), rng.integers(0, 3, inner))


CHILD_WRITERS: dict[str, Callable[[Path], None]] = {
    "bytes": _bytes_versions,
    "checkpoint": _checkpoint_versions,
    "pool_snapshot": _pool_snapshot_versions,
    "pseudo_label": _pseudo_label_versions,
}


# -- the parent: kill mid-write, then check the target -----------------------------------------------


def _load_bytes(path: Path) -> None:
    assert len(path.read_bytes()) == 2 * 1024**2


def _load_checkpoint(path: Path) -> None:
    import torch

    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    assert state_dict and all(isinstance(v, torch.Tensor) for v in state_dict.values())


def _load_pool_snapshot(path: Path) -> None:
    from raysemi.semi.curriculum import CurriculumSchedule
    from raysemi.semi.pool import PseudoLabelPool

    assert len(PseudoLabelPool.restore(path, CurriculumSchedule(stages=2))) > POOL_RECORDS


def _load_pseudo_label(path: Path) -> None:
    import nibabel as nib

    labels = np.asarray(nib.load(path).dataobj)
    assert labels.shape == (64, 64, 64) and set(np.unique(labels)) <= {0, 1, 2, 4}


# writer -> (target relative to the child's folder, loader that must accept the surviving file)
TARGETS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "bytes": ("out/blob.bin", _load_bytes),
    "checkpoint": ("out/checkpoint/model.pt", _load_checkpoint),
    "pool_snapshot": ("out/snapshot.json", _load_pool_snapshot),
    "pseudo_label": ("out/pseudo/CASE_1_label.nii.gz", _load_pseudo_label),
}


def _intended(folder: Path, target: Path) -> list[tuple[str, str, int]]:
    """(temp name, sha256, size) of every write of ``target`` the child started, in order."""
    log = folder / INTENDED_LOG
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
    return [(name, sha, int(size)) for name, sha, size in rows if name.startswith(f".{target.name}.")]


def _half_written_temp(target: Path, started: list[tuple[str, str, int]]) -> Path | None:
    """The temp file of the last started write, if it is less than half written."""
    if not started:
        return None
    name, _, size = started[-1]
    temp = target.parent / name
    try:
        return temp if temp.stat().st_size < size / 2 else None
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("writer", sorted(CHILD_WRITERS))
def test_kill_mid_write_leaves_previous_version(tmp_path, writer):
    relative, load = TARGETS[writer]
    target = tmp_path / relative
    (tmp_path / "out").mkdir()
    # A different, reproducible pause per writer after the first complete version, so the kill does
    # not always hit the same point of the write loop.
    pause_s = random.Random(writer).uniform(0.0, 1.5)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.test_atomic", writer, str(tmp_path / "out")],
        cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline, kill_after = time.time() + 400, None
        while True:
            assert time.time() < deadline, "the child never reached a mid-write point"
            assert child.poll() is None, f"writer {writer} died:\n{child.stdout.read().decode()[-3000:]}"
            started = _intended(tmp_path, target)
            if kill_after is None and len(started) >= 2:  # version 1 complete, version 2 under way
                kill_after = time.time() + pause_s
            if kill_after is not None and time.time() >= kill_after:
                temp = _half_written_temp(target, started)
                if temp is not None:
                    # Freeze the child and look again, so that what we see is what the kill interrupts
                    # (on a loaded machine it could otherwise finish this write between look and kill).
                    os.kill(child.pid, signal.SIGSTOP)
                    temp = _half_written_temp(target, _intended(tmp_path, target))
                    if temp is not None:
                        os.kill(child.pid, signal.SIGKILL)
                        child.wait()
                        break
                    os.kill(child.pid, signal.SIGCONT)
            time.sleep(0.005)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()

    started = _intended(tmp_path, target)
    interrupted_name, _, interrupted_size = started[-1]
    # The kill did land mid-write: the interrupted temp file is still there, and partial.
    assert temp.name == interrupted_name
    assert temp.stat().st_size < interrupted_size
    # The final name holds exactly the version before the interrupted one, complete.
    _, previous_sha, previous_size = started[-2]
    content = target.read_bytes()
    assert len(content) == previous_size
    assert hashlib.sha256(content).hexdigest() == previous_sha
    load(target)


# -- in-process behaviour -------------------------------------------------------------------------------


def test_exception_inside_block_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text('{"version": 1}')
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as temp:
            temp.write_text('{"version": 2, "trunc')
            assert temp.parent == target.parent and temp != target
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_exception_on_first_write_leaves_no_file(tmp_path):
    target = tmp_path / "sub" / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temp:
            temp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_temp_file_keeps_the_target_suffix(tmp_path):
    with atomic_path(tmp_path / "case_label.nii.gz") as temp:
        # nibabel picks the format (and gzip) from the extension
        assert temp.name.endswith(".nii.gz")
        temp.write_bytes(b"x")
    assert (tmp_path / "case_label.nii.gz").read_bytes() == b"x"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_written_files_get_umask_permissions_like_open(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "atomic.bin", b"data")
        with open(tmp_path / "plain.bin", "wb") as handle:  # the reference: what open() gives
            handle.write(b"data")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "atomic.bin").stat().st_mode)
    assert mode == 0o666 & ~umask  # e.g. 0o644 under umask 022, not mkstemp's 0o600
    assert mode == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode)


if __name__ == "__main__":
    out_folder = Path(sys.argv[2])
    _intended_log = out_folder.parent / INTENDED_LOG
    CHILD_WRITERS[sys.argv[1]](out_folder)
