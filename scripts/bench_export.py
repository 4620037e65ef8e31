#!/usr/bin/env python
"""Exported models against their run folder: the same predictions, and ONNX Runtime's speed.

For each demo (``--kinds 2d,3d``) a short fp32 run is trained on the shipped data (U-Net
16-32-64-128, the demo's settings otherwise; agreement, not quality, is the point) unless
``--run-2d`` / ``--run-3d`` names an existing one. Its ``best.pt`` is exported to ONNX and to
TorchScript with ``unet export``'s code, and the held-out inputs (2D: the 15 test slices; 3D:
``imagesTs``) are predicted from all three, in fp32:

* labels: ``unet predict``'s own function (labels output), written files compared voxel by
  voxel; for NIfTI also shape, affine, qform/sform codes and dtype;
* probabilities: the float32 class probabilities (``--probabilities`` path, before the float16
  ``.npz``), max |p_exported - p_run| over every voxel and class.

Speed (``--time``, 3D only): the held-out volume predicted end to end (preprocessing, sliding
window, mapping back; labels output, fp32) from the run folder (PyTorch, BatchNorm folded) and
from the ONNX file (onnxruntime, CPU, as many intra-op threads as torch), alternately, in this
process, ``--rounds`` times after a warm-up; the network's share is timed by a wrapper around it.
Ratio = PyTorch time / ONNX time (> 1: ONNX Runtime is faster).

    python scripts/bench_export.py --num-threads 2 --json export.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from benchlib.machine import load_note, machine_info, median, print_machine, print_table, spread, write_json
from PIL import Image

from unetcli.config import RunConfig, apply_overrides
from unetcli.inference.export import export_run
from unetcli.inference.predict import LoadedModel, load_model, predict, predict_png, predict_volume, window_settings
from unetcli.training.trainer import train
from unetcli.workflows.demo import DEMOS, demo_data_dir, demo_label_names

CPU = torch.device("cpu")
SHORT = {"2d": {"train.epochs": 2, "train.iterations_per_epoch": 5},
         "3d": {"train.epochs": 2, "train.iterations_per_epoch": 5}}


def held_out_inputs(kind: str) -> Path:
    return demo_data_dir(kind) / DEMOS[kind].test_images


def train_short(kind: str, out: Path, threads: int) -> Path:
    overrides = {**DEMOS[kind].overrides, **SHORT[kind], "train.precision": "fp32", "train.num_threads": threads,
                 "train.num_workers": 0, "data.label_names": demo_label_names(kind)}
    tick = time.perf_counter()
    train(demo_data_dir(kind) / DEMOS[kind].train, apply_overrides(RunConfig(), overrides), out, progress=False)
    print(f"  trained {kind} run in {time.perf_counter() - tick:.0f} s")
    return out


def read_labels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj) if path.name.endswith((".nii.gz", ".nii")) else np.asarray(Image.open(path))


def geometry(path: Path) -> tuple:
    image = nib.load(str(path))
    return (image.shape, image.affine.tobytes(), int(image.header["qform_code"]), int(image.header["sform_code"]),
            str(image.get_data_dtype()))


def fp32_probabilities(source: Path, inputs: Path, out: Path) -> list[np.ndarray]:
    loaded = load_model(source, CPU)
    window = window_settings(loaded, CPU, "fp32", None)
    fn = predict_volume if loaded.metadata["file_format"] == "nifti" else predict_png
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if loaded.metadata["file_format"] == "nifti" else ".png"
    return [fn(loaded, [p], out / f"case{suffix}", window, keep_probabilities=True) for p in sorted(inputs.iterdir())]


def agreement(kind: str, sources: dict[str, Path], tmp: Path) -> list[list[str]]:
    inputs = held_out_inputs(kind)
    written = {name: predict(src, inputs, tmp / kind / name, "cpu", "fp32", progress=False) for name, src in sources.items()}
    probs = {name: fp32_probabilities(src, inputs, tmp / kind / f"{name}_p") for name, src in sources.items()}
    rows = []
    for name in ("onnx", "torchscript"):
        same = total = 0
        same_geometry = True
        for ours, theirs in zip(written["run"], written[name]):
            a, b = read_labels(ours), read_labels(theirs)
            same, total = same + int((a == b).sum()), total + a.size
            same_geometry &= kind != "3d" or geometry(ours) == geometry(theirs)
        dp = max(float(np.abs(p - q).max()) for p, q in zip(probs["run"], probs[name]))
        rows.append([kind, name, f"{total:,}", f"{100 * same / total:.4f} %", f"{dp:.1e}",
                     ("identical" if same_geometry else "DIFFERENT") if kind == "3d" else "-"])
    return rows


class Timed(torch.nn.Module):
    """The network behind a timer: how much of a prediction is the forward pass."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.margin, self.seconds = network, network.margin, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tick = time.perf_counter()
        y = self.network(x)
        self.seconds += time.perf_counter() - tick
        return y


def timing(sources: dict[str, Path], rounds: int, tmp: Path) -> dict[str, dict[str, list[float]]]:
    path = sorted(held_out_inputs("3d").iterdir())[0]
    models: dict[str, LoadedModel] = {name: load_model(sources[name], CPU) for name in ("run", "onnx", "torchscript")}
    times: dict[str, dict[str, list[float]]] = {name: {"total": [], "network": []} for name in models}
    for loaded in models.values():
        loaded.model = Timed(loaded.model)
    for r in range(rounds + 1):  # round 0 warms up
        for name in (list(models) if r % 2 else list(models)[::-1]):
            loaded, timer = models[name], models[name].model
            timer.seconds = 0.0
            tick = time.perf_counter()
            predict_volume(loaded, [path], tmp / f"time_{name}.nii.gz", window_settings(loaded, CPU, "fp32", None))
            if r:
                times[name]["total"].append(time.perf_counter() - tick)
                times[name]["network"].append(timer.seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="2d,3d")
    parser.add_argument("--run-2d", type=Path)
    parser.add_argument("--run-3d", type=Path)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    info = machine_info(CPU)
    print_machine(info)
    print(load_note())
    rows, times = [], None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for kind in args.kinds.split(","):
            run = getattr(args, f"run_{kind}") or train_short(kind, tmp / f"run_{kind}", args.num_threads)
            sources = {"run": run}
            for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
                sources[fmt] = export_run(run, tmp / f"{kind}_{name}", fmt).path
            rows += agreement(kind, sources, tmp)
            if kind == "3d":
                times = timing(sources, args.rounds, tmp)
    print()
    print_table(["data", "exported as", "voxels", "same label", "max |dp| (fp32)", "NIfTI geometry"], rows)
    if times:
        report_timing(times)
    print(load_note())
    if args.json:
        write_json(args.json, {"machine": info, "agreement": rows, "timing": times})


def report_timing(times: dict[str, dict[str, list[float]]]) -> None:
    print("\nheld-out 3D volume, end to end (labels, fp32); median of rounds [spread]:")
    rows = []
    for name, t in times.items():
        rows.append([name, f"{median(t['total']):.2f} s [{spread(t['total']):.0%}]", f"{median(t['network']):.2f} s",
                     f"{median(times['run']['total']) / median(t['total']):.2f}x",
                     f"{median(times['run']['network']) / median(t['network']):.2f}x"])
    print_table(["model", "whole prediction", "network", "ratio PyTorch/this", "network ratio"], rows)


if __name__ == "__main__":
    main()
