"""Data generators and CLI helpers shared by the tests (tiny, seeded, exact)."""

from __future__ import annotations

import json
import locale
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image
from typer.testing import CliRunner

from unetcli.cli import app


def invoke(*args: object, quiet: bool = False) -> Any:
    """Run ``unet ARGS`` in-process (``unet -q ARGS`` with ``quiet``). Torch's thread count is put
    back here, not only by conftest, because module-scoped fixtures train runs too."""
    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(app, (["-q"] if quiet else []) + [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def invoke_quiet(*args: object) -> Any:
    return invoke(*args, quiet=True)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def make_blobs(root: Path, n: int = 10, size: int = 32, seed: int = 0, binary_255: bool = False) -> Path:
    """Images with a bright disc (class 1) and a dark square (class 2) on noise."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, 7))]
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        if not binary_255:
            y0, x0 = rng.integers(0, size - 8, 2)
            mask[y0:y0 + 6, x0:x0 + 6] = np.where(mask[y0:y0 + 6, x0:x0 + 6] == 0, 2, mask[y0:y0 + 6, x0:x0 + 6])
        image = 100 + rng.normal(0, 12, (size, size))
        image[mask == 1] += 80
        image[mask == 2] -= 70
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray((mask * 255).astype(np.uint8) if binary_255 else mask).save(root / "masks" / f"case{i:02d}.png")
    return root


def make_volume(rng: np.random.Generator, shape=(24, 24, 16)) -> tuple[np.ndarray, np.ndarray]:
    """A head-like blob (non-zero brain) holding a bright sphere (1) and a brighter box (2)."""
    label = np.zeros(shape, np.uint8)
    grid = np.indices(shape).astype(np.float32)
    centre = np.asarray(shape, np.float32)[:, None, None, None] / 2
    brain = (((grid - centre) / (np.asarray(shape)[:, None, None, None] * 0.45)) ** 2).sum(0) <= 1
    c = rng.integers(7, np.asarray(shape) - 7)
    label[(((grid - c[:, None, None, None]) ** 2).sum(0) <= 16) & brain] = 1
    b = rng.integers(5, np.asarray(shape) - 9)
    box = np.zeros(shape, bool)
    box[b[0]:b[0] + 5, b[1]:b[1] + 5, b[2]:b[2] + 4] = True
    label[box & brain & (label == 0)] = 2
    image = np.where(brain, 100 + rng.normal(0, 8, shape), 0).astype(np.float32)
    image[label == 1] += 60
    image[label == 2] += 130
    return image, label


def lps_affine(spacing=(1.0, 1.0, 2.0)) -> np.ndarray:
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]) + np.array([[0, 0, 0, 20], [0, 0, 0, 30], [0, 0, 0, -10], [0, 0, 0, 0]])


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def make_nnunet(root: Path, n: int = 5, seed: int = 0, flip_first: bool = False) -> Path:
    """An nnU-Net raw dataset of :func:`make_volume` cases at 1 x 1 x 2 mm."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    ras = np.diag([1.0, 1.0, 2.0, 1.0])
    for i in range(n):
        image, label = make_volume(rng)
        affine = ras
        if flip_first and i == 0:  # the same kind of data stored in LPS: the pipeline must not care
            image, label, affine = image[::-1, ::-1].copy(), label[::-1, ::-1].copy(), lps_affine()
        save_nifti(image, affine, root / "imagesTr" / f"case{i}_0000.nii.gz")
        save_nifti(label, affine, root / "labelsTr" / f"case{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "sphere": 1, "box": 2},
        "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def run_demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    """``unet demo --out OUT ARGS`` through the real entry point, as a user runs it: torch picks its own
    thread count (the suite pins one thread). A 30-minute --time lifts the demo's 150 s cap, so the
    checks are about learning, not speed (a 10-minute cap on a starved machine once stopped the 2D check
    at step 63 of 120, at Dice 0.77, and the 3D one after 4 of 15 epochs)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-m", "unetcli", "demo", "--out", str(out), "--time", "30m", *args],
                          capture_output=True, text=True, timeout=1800, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str], cwd: Path, n: int = 2, env_of_rank: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen]:
    """``n`` processes of ``python -m unetcli ARGS`` joined like torchrun's workers (RANK, WORLD_SIZE, ... set)."""
    port, procs = str(free_port()), []
    for rank in range(n):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "OMP_NUM_THREADS": "1", **(env_of_rank or {}).get(rank, {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "unetcli", *args], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    """Each process's exit code and standard error, in rank order."""
    return [(p.wait(timeout=timeout), p.communicate()[1]) for p in procs]


def with_batch_norm_statistics(net: torch.nn.Module, shape: tuple[int, ...], passes: int = 3) -> torch.nn.Module:
    """``net`` in eval mode after a few training-mode passes over random inputs of ``shape``, so that
    its BatchNorm running statistics are not the trivial 0 / 1 (folding tests would pass trivially)."""
    net.train()
    with torch.no_grad():
        for _ in range(passes):
            net(torch.randn(shape) * 3 + 1)
    return net.eval()


def tilted_affine(spacing: tuple[float, float, float] = (0.9, 0.8, 2.0)) -> np.ndarray:
    a = 0.3
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return affine


def write_dicom_series(volume_xyz: np.ndarray, affine: np.ndarray, folder: Path, uid: str, number: int = 1,
                 skip: tuple[int, ...] = (), prefix: str = "slice") -> list[Path]:
    """``(X, Y, Z)`` voxels with a voxel -> RAS affine as one DICOM file per z slice, ``skip`` left out
    (SimpleITK's "Dicom Series From Array" recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    LPS = np.diag([-1.0, -1.0, 1.0])
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(volume_xyz)).astype(np.int16))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = LPS @ affine[:3, :3] / spacing
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin((LPS @ affine[:3, 3]).tolist())
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer, files = sitk.ImageFileWriter(), []
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        if z in skip:
            continue
        piece = image[:, :, z]
        position = "\\".join(f"{v:.10f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z)))
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.7"), ("0020|000e", uid),
                           ("0020|0011", str(number)), ("0020|0013", str(z + 1)), ("0020|0032", position),
                           ("0020|0037", orientation), ("0018|0050", f"{spacing[2]:.6f}")):
            piece.SetMetaData(tag, value)
        files.append(folder / f"{prefix}{z:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        saved = locale.setlocale(locale.LC_ALL)
        try:
            writer.Execute(piece)
        finally:  # GDCM's writer switches the process to the "C" locale (ASCII file reading for later tests)
            locale.setlocale(locale.LC_ALL, saved)
    return files
