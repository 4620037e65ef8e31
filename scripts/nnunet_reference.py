#!/usr/bin/env python
"""nnU-Net v2 reference run for a dataset made by ``scripts/prepare_thick_slice_data.py``.

Run with the *nnU-Net* virtualenv, not unetcli's (this file never imports unetcli)::

    /path/to/nnunet-venv/bin/python scripts/nnunet_reference.py DATASET_DIR --work-dir WORK \\
        [--dataset-id 990] [--name MNIThick114] [--train-iterations 20] [--tta] \\
        [--pred-dir PRED] [--summary-json FILE]

Steps (each can also be called from Python: ``import nnunet_reference as ref``):

1. :func:`make_raw_dataset` copies DATASET_DIR (``imagesTr``, ``labelsTr``, ``imagesTs``,
   ``dataset.json``) into ``WORK/nnUNet_raw/DatasetXXX_Name``; :func:`nnunet_env` points
   ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` at subfolders of WORK and
   sets ``nnUNet_compile=f`` (no torch.compile on the CPU), ``nnUNet_n_proc_DA`` and
   ``OMP_NUM_THREADS`` (default 2 threads, 1 augmentation worker: sized for a 2-core machine).
2. :func:`plan_and_preprocess` runs ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres
   -np 1 -npfp 1 --verify_dataset_integrity``; :func:`summarize_plans` extracts, for 2d,
   3d_fullres and 3d_lowres (where planned): spacing, median image shape, patch size, batch
   size, features per stage, kernel sizes, strides, normalisation schemes, use_mask_for_norm.
   nnU-Net lists these in its *array* axis order (SimpleITK order, i.e. reversed NIfTI voxel
   axes, then ``transpose_forward``); the summary also gives ``axes_as_nifti_voxel_axes`` (for
   the RAS training cases 0 = x, 1 = y, 2 = z).
3. With ``--train-iterations N``, :func:`train` trains ``3d_fullres`` fold ``all`` on the CPU for
   exactly N iterations with the trainer ``nnUNetTrainer_BenchRef`` (written by
   :func:`install_trainer` into the nnU-Net package's trainer folder so that training *and*
   prediction can find it by name). Its epochs / iterations per epoch / validation iterations
   come from environment variables set here: iterations per epoch = the largest divisor of N
   that is <= 50 (or ``--iterations-per-epoch``), epochs = N / that, 5 validation iterations per
   epoch. The trainer records the start time of every training iteration, so the summary has
   seconds per iteration (median and mean over iterations 2..N, data loading included) next to
   the wall time of the whole ``nnUNetv2_train`` call and the per-epoch times of nnU-Net's log, plus
   the CPU seconds of that call (user + system, children included) and the load average at its
   end: on a shared 2-core machine wall times grow with other load, CPU seconds much less.
   nnU-Net's final validation pass over the training cases is skipped unless
   ``--final-validation``.
4. :func:`predict` runs ``nnUNetv2_predict -device cpu`` (``--disable_tta`` unless ``--tta``) on
   every ``imagesTs*`` folder (``imagesTs``, ``imagesTs_reoriented``, ``imagesTs_robust``, ...) into
   ``PRED/<folder>``, and scores the predictions against the matching ``labelsTs*`` folder (Dice per
   class), when it exists.
   :func:`nnunet_view` records, per test image, the array shape and spacing nnU-Net reads and the
   shape it feeds the network (nnU-Net does not reorient: a test case stored with the thick axis
   elsewhere is resampled per array axis to the plan's spacing, i.e. in the wrong directions).

A JSON summary (plans, timings, prediction folders, Dice) is printed and written to
``--summary-json`` (default ``WORK/nnunet_reference_summary.json``). Logs of every nnU-Net
command go to ``WORK/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRAINER_NAME = "nnUNetTrainer_BenchRef"
TRAINER_SUBDIR = ("training", "nnUNetTrainer", "variants", "benchmark_reference")
CONFIGS = ("2d", "3d_fullres", "3d_lowres")
LAST_CPU_S = [0.0]  # CPU seconds of the last run_logged command (robust to other load on the machine)

TRAINER_SOURCE = '''"""Written by unetcli's scripts/nnunet_reference.py: a fixed-iteration-budget nnU-Net trainer.

Budget from environment variables (read at construction; defaults = nnUNetTrainer's):
NNUNET_REF_NUM_EPOCHS, NNUNET_REF_ITERS_PER_EPOCH, NNUNET_REF_VAL_ITERS, NNUNET_REF_FINAL_VALIDATION (0/1).
Records the start time of every training iteration and the duration of every train_step in
<output_folder>/iteration_times.json.
"""
import json
import os
from os.path import join
from time import perf_counter

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_BenchRef(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("NNUNET_REF_NUM_EPOCHS", self.num_epochs))
        self.num_iterations_per_epoch = int(os.environ.get("NNUNET_REF_ITERS_PER_EPOCH", self.num_iterations_per_epoch))
        self.num_val_iterations_per_epoch = int(os.environ.get("NNUNET_REF_VAL_ITERS", self.num_val_iterations_per_epoch))
        self._ref_final_validation = os.environ.get("NNUNET_REF_FINAL_VALIDATION", "1") == "1"
        # a checkpoint every N epochs (nnU-Net: 50) so that a stopped run can continue with --c
        self.save_every = int(os.environ.get("NNUNET_REF_SAVE_EVERY", self.save_every))
        self._ref_iter_starts = []
        self._ref_step_seconds = []

    def train_step(self, batch: dict) -> dict:
        t0 = perf_counter()
        self._ref_iter_starts.append(t0)
        out = super().train_step(batch)
        self._ref_step_seconds.append(perf_counter() - t0)
        return out

    def on_train_end(self):
        end = perf_counter()
        if self.local_rank == 0:
            with open(join(self.output_folder, "iteration_times.json"), "w") as f:
                json.dump({"num_epochs": self.num_epochs,
                           "num_iterations_per_epoch": self.num_iterations_per_epoch,
                           "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                           "iteration_starts": self._ref_iter_starts,
                           "train_step_seconds": self._ref_step_seconds,
                           "train_end": end}, f)
        super().on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self._ref_final_validation:
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file("final validation skipped (NNUNET_REF_FINAL_VALIDATION=0)", also_print_to_console=True)
'''


# ================================================================= environment
def venv_bin() -> Path:
    """Folder of the running interpreter's console scripts (the nnU-Net venv's bin/)."""
    return Path(sys.executable).parent


def nnunet_tool(name: str) -> str:
    exe = venv_bin() / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {sys.executable} or on PATH: run this with the nnU-Net venv's python")
    return found


def nnunet_env(work_dir: Path, threads: int = 2, da_workers: int = 1, extra: dict | None = None) -> dict:
    """Environment for nnU-Net subprocesses: data folders under ``work_dir``, CPU-friendly defaults."""
    env = dict(os.environ)
    for key, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"), ("nnUNet_results", "nnUNet_results")):
        path = work_dir / sub
        path.mkdir(parents=True, exist_ok=True)
        env[key] = str(path)
    env["nnUNet_compile"] = "f"
    env["nnUNet_n_proc_DA"] = str(da_workers)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(key, str(threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("MPLBACKEND", "Agg")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_logged(cmd: list[str], env: dict, log: Path, verbose: bool = False) -> float:
    """Run ``cmd`` with output to ``log`` (and the console if verbose); return wall seconds.

    The CPU seconds (user + system) of the command and its reaped children are left in ``LAST_CPU_S[0]``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    t0, c0 = time.perf_counter(), children_cpu_s()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if verbose:
                sys.stdout.write(line)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    LAST_CPU_S[0] = children_cpu_s() - c0
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"command failed (exit {rc}) after {wall:.1f} s: {' '.join(cmd)}\n--- last lines of {log} ---\n{tail}")
    return wall


# ================================================================= 1. raw dataset
def dataset_name(dataset_id: int, name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9]", "", name) or "Data"
    return f"Dataset{dataset_id:03d}_{clean}"


def make_raw_dataset(dataset_dir: Path, work_dir: Path, dataset_id: int, name: str) -> Path:
    """Copy a prepare_thick_slice_data.py folder into ``WORK/nnUNet_raw/DatasetXXX_Name`` (replacing it)."""
    dataset_dir = Path(dataset_dir)
    ds = json.loads((dataset_dir / "dataset.json").read_text())
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in ds:
            raise SystemExit(f"{dataset_dir}/dataset.json lacks {key!r}")
    raw_root = work_dir / "nnUNet_raw"
    for old in raw_root.glob(f"Dataset{dataset_id:03d}_*"):  # one name per id, or nnU-Net refuses
        shutil.rmtree(old)
    target = raw_root / dataset_name(dataset_id, name)
    target.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        if (dataset_dir / sub).is_dir():
            shutil.copytree(dataset_dir / sub, target / sub)
    n_tr = len(list((target / "labelsTr").glob("*" + ds["file_ending"])))
    if n_tr != ds["numTraining"]:
        raise SystemExit(f"numTraining {ds['numTraining']} but {n_tr} files in labelsTr")
    ds_out = {k: ds[k] for k in ("channel_names", "labels", "numTraining", "file_ending")}
    ds_out.update({k: v for k, v in ds.items() if k not in ds_out})
    (target / "dataset.json").write_text(json.dumps(ds_out, indent=2) + "\n")
    return target


# ================================================================= 2. planning
def plan_and_preprocess(dataset_id: int, env: dict, work_dir: Path, verbose: bool = False) -> tuple[dict, float]:
    """Fingerprint, plan (all configurations) and preprocess 3d_fullres; return (plans, wall seconds)."""
    pre = Path(env["nnUNet_preprocessed"])
    for old in pre.glob(f"Dataset{dataset_id:03d}_*"):
        shutil.rmtree(old)
    cmd = [nnunet_tool("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
           "-np", "1", "-npfp", "1", "--verify_dataset_integrity"]
    wall = run_logged(cmd, env, work_dir / "logs" / "plan_and_preprocess.log", verbose)
    plans_file = next(pre.glob(f"Dataset{dataset_id:03d}_*/nnUNetPlans.json"))
    return json.loads(plans_file.read_text()), wall


def summarize_plans(plans: dict) -> dict:
    """The planning decisions of interest, per configuration (nnU-Net array axis order)."""
    tf = plans.get("transpose_forward", [0, 1, 2])
    out: dict = {
        "dataset_name": plans.get("dataset_name"),
        "image_reader_writer": plans.get("image_reader_writer"),
        "transpose_forward": tf,
        # array axis m after transpose = SimpleITK array axis tf[m] = NIfTI voxel axis 2 - tf[m]
        "axes_as_nifti_voxel_axes": [2 - int(t) for t in tf],
        "original_median_spacing_after_transp": plans.get("original_median_spacing_after_transp"),
        "original_median_shape_after_transp": plans.get("original_median_shape_after_transp"),
        "configurations": {},
    }
    for cfg in CONFIGS:
        c = plans["configurations"].get(cfg)
        if c is None:
            continue
        arch = c.get("architecture", {})
        kw = arch.get("arch_kwargs", {})
        out["configurations"][cfg] = {
            "spacing": [round(float(s), 4) for s in c["spacing"]],
            "median_image_size_in_voxels": [round(float(s), 1) for s in c["median_image_size_in_voxels"]],
            "patch_size": list(c["patch_size"]),
            "batch_size": c["batch_size"],
            "network_class_name": arch.get("network_class_name"),
            "n_stages": kw.get("n_stages"),
            "features_per_stage": kw.get("features_per_stage"),
            "kernel_sizes": kw.get("kernel_sizes"),
            "strides": kw.get("strides"),
            "n_conv_per_stage": kw.get("n_conv_per_stage"),
            "normalization_schemes": c.get("normalization_schemes"),
            "use_mask_for_norm": c.get("use_mask_for_norm"),
            "resampling_fn_data_kwargs": c.get("resampling_fn_data_kwargs"),
        }
    return out


def format_plan(summary: dict) -> str:
    lines = [f"plans for {summary['dataset_name']} (reader {summary['image_reader_writer']}, transpose_forward {summary['transpose_forward']}, "
             f"array axes = NIfTI voxel axes {summary['axes_as_nifti_voxel_axes']})"]
    for cfg, c in summary["configurations"].items():
        lines.append(f"  [{cfg}] spacing {c['spacing']}  median shape {c['median_image_size_in_voxels']}  "
                     f"patch {c['patch_size']}  batch {c['batch_size']}")
        lines.append(f"      features {c['features_per_stage']}")
        lines.append(f"      kernels {c['kernel_sizes']}")
        lines.append(f"      strides {c['strides']}")
        lines.append(f"      normalization {c['normalization_schemes']}  use_mask_for_norm {c['use_mask_for_norm']}")
    return "\n".join(lines)


# ================================================================= 3. training
def install_trainer() -> Path:
    """Write ``nnUNetTrainer_BenchRef`` into the installed nnunetv2 package (idempotent)."""
    import nnunetv2  # only the package location; cheap

    folder = Path(nnunetv2.__path__[0]).joinpath(*TRAINER_SUBDIR)
    folder.mkdir(parents=True, exist_ok=True)
    init = folder / "__init__.py"
    if not init.exists():
        init.write_text("")
    path = folder / f"{TRAINER_NAME}.py"
    if not path.exists() or path.read_text() != TRAINER_SOURCE:
        path.write_text(TRAINER_SOURCE)
    return path


def split_budget(n: int, per_epoch: int | None = None, max_per_epoch: int = 50) -> tuple[int, int]:
    """(epochs, iterations per epoch) with epochs * iterations == n."""
    if n < 1:
        raise ValueError("--train-iterations must be >= 1")
    if per_epoch is None:
        per_epoch = max(d for d in range(1, min(n, max_per_epoch) + 1) if n % d == 0)
    if n % per_epoch:
        raise ValueError(f"--iterations-per-epoch {per_epoch} does not divide --train-iterations {n}")
    return n // per_epoch, per_epoch


def parse_epoch_times(log_dir: Path) -> list[float]:
    times: list[float] = []
    for log in sorted(log_dir.glob("training_log_*.txt")):
        times += [float(m) for m in re.findall(r"Epoch time: ([0-9.]+) s", log.read_text(errors="replace"))]
    return times


def train(dataset_id: int, env: dict, work_dir: Path, iterations: int, per_epoch: int | None = None, val_iters: int = 5,
          final_validation: bool = False, verbose: bool = False, resume: bool = False) -> dict:
    """Train 3d_fullres fold 'all' on the CPU for exactly ``iterations`` iterations; return timings.

    With ``resume`` a run that was stopped continues from its last epoch (``nnUNetv2_train --c``;
    a checkpoint is written after every epoch) and a finished one is kept; the wall and CPU times
    are summed over the sittings that ran to their end (a killed sitting's epochs still count in
    ``epoch_times_s``), the per-iteration times come from the last sitting."""
    install_trainer()
    epochs, ipe = split_budget(iterations, per_epoch)
    env = dict(env, NNUNET_REF_NUM_EPOCHS=str(epochs), NNUNET_REF_ITERS_PER_EPOCH=str(ipe), NNUNET_REF_SAVE_EVERY="1",
               NNUNET_REF_VAL_ITERS=str(val_iters), NNUNET_REF_FINAL_VALIDATION="1" if final_validation else "0")
    results = Path(env["nnUNet_results"])
    found = list(results.glob(f"Dataset{dataset_id:03d}_*/{TRAINER_NAME}__nnUNetPlans__3d_fullres/fold_all"))
    cmd = [nnunet_tool("nnUNetv2_train"), str(dataset_id), "3d_fullres", "all", "-tr", TRAINER_NAME, "-device", "cpu"]
    sittings_file = work_dir / "logs" / "train_sittings.json"
    sittings = json.loads(sittings_file.read_text()) if resume and found and sittings_file.is_file() else []
    if resume and found and (found[0] / "checkpoint_final.pth").is_file():
        print(f"reusing the finished nnU-Net run {found[0]}", flush=True)
    else:
        if resume and found and (found[0] / "checkpoint_latest.pth").is_file():
            print(f"continuing the stopped nnU-Net run {found[0]}", flush=True)
            cmd.append("--c")
        else:
            for old in found:
                shutil.rmtree(old.parent)
            sittings = []
        earlier = len(list((work_dir / "logs").glob("train*.log"))) if "--c" in cmd else 0  # a killed sitting's log stays
        wall = run_logged(cmd, env, work_dir / "logs" / f"train{earlier or ''}.log", verbose)
        sittings.append({"wall_s": wall, "cpu_s": LAST_CPU_S[0]})
        sittings_file.write_text(json.dumps(sittings))
    wall, cpu = sum(x["wall_s"] for x in sittings), sum(x["cpu_s"] for x in sittings)
    out_dir = next(results.glob(f"Dataset{dataset_id:03d}_*/{TRAINER_NAME}__nnUNetPlans__3d_fullres"))
    fold_dir = out_dir / "fold_all"
    it = json.loads((fold_dir / "iteration_times.json").read_text())
    starts, steps = it["iteration_starts"], it["train_step_seconds"]
    # full iteration = from one train_step start to the next within an epoch (includes waiting for data)
    full = [b - a for i, (a, b) in enumerate(zip(starts, starts[1:])) if (i + 1) % ipe != 0]
    steady_steps = steps[1:] if len(steps) > 1 else steps
    epoch_times = parse_epoch_times(fold_dir)
    return {
        "iterations": iterations,
        "epochs": epochs,
        "iterations_per_epoch": ipe,
        "val_iterations_per_epoch": val_iters,
        "final_validation": final_validation,
        "train_command_wall_s": round(wall, 2),
        "sittings": len(sittings),
        "wall_s_per_iteration": round(wall / iterations, 3),
        "train_command_cpu_s": round(cpu, 1),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "epoch_times_s": epoch_times,
        "epoch_time_s_per_train_iteration": round(sum(epoch_times) / iterations, 3) if epoch_times else None,
        "train_step_s_median_excl_first": round(statistics.median(steady_steps), 3),
        "train_step_s_mean_excl_first": round(statistics.fmean(steady_steps), 3),
        "first_train_step_s": round(steps[0], 3),
        "iteration_s_median_incl_data": round(statistics.median(full), 3) if full else None,
        "model_folder": str(out_dir),
        "checkpoint": str(fold_dir / "checkpoint_final.pth"),
    }


# ================================================================= 4. prediction
def predict(dataset_id: int, env: dict, work_dir: Path, inputs: list[Path], pred_dir: Path, tta: bool = False,
            verbose: bool = False) -> dict:
    """Predict every folder in ``inputs`` into ``pred_dir/<folder name>``; return {folder: (output, seconds)}."""
    out = {}
    for src in inputs:
        dst = pred_dir / src.name
        if dst.exists():
            shutil.rmtree(dst)
        cmd = [nnunet_tool("nnUNetv2_predict"), "-i", str(src), "-o", str(dst), "-d", str(dataset_id), "-c", "3d_fullres",
               "-f", "all", "-tr", TRAINER_NAME, "-p", "nnUNetPlans", "-chk", "checkpoint_final.pth", "-device", "cpu",
               "-npp", "1", "-nps", "1", "--disable_progress_bar"]
        if not tta:
            cmd.append("--disable_tta")
        wall = run_logged(cmd, env, work_dir / "logs" / f"predict_{src.name}.log", verbose)
        out[src.name] = {"input": str(src), "output": str(dst), "wall_s": round(wall, 2), "cpu_s": round(LAST_CPU_S[0], 1), "tta": tta}
    return out


def nnunet_view(folder: Path, env: dict, plans_file: Path, dataset_json: Path, configuration: str = "3d_fullres") -> dict:
    """How nnU-Net's preprocessing sees each image in ``folder``: array shape and spacing as read, shape fed to the network.

    nnU-Net does not reorient images: it reads the stored array (SimpleITK order) with its spacing and resamples each
    array axis to the plan's spacing for that axis, so a case stored in another orientation is resampled differently.
    """
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(plans_file))
    cm = pm.get_configuration(configuration)
    dj = json.loads(Path(dataset_json).read_text())
    out = {}
    for f in sorted(folder.glob("*" + dj["file_ending"])):
        data, _, props = DefaultPreprocessor(verbose=False).run_case([str(f)], None, pm, cm, dj)
        out[f.name] = {
            "read_shape": [int(v) for v in props["shape_before_cropping"]],
            "read_spacing": [float(v) for v in props["spacing"]],
            "network_input_shape": [int(v) for v in data.shape[1:]],
            "plan_spacing": [float(v) for v in cm.spacing],
        }
    return out


def dice_scores(pred_dir: Path, label_dir: Path, labels: dict) -> dict:
    """Per-case and mean Dice per foreground class (nibabel; arrays compared voxel for voxel)."""
    import nibabel as nib
    import numpy as np

    classes = {name: int(v) for name, v in labels.items() if int(v) != 0}
    cases = {}
    for ref_path in sorted(label_dir.glob("*.nii.gz")):
        pred_path = pred_dir / ref_path.name
        if not pred_path.exists():
            continue
        ref_img, pred_img = nib.load(str(ref_path)), nib.load(str(pred_path))
        ref, pred = np.asarray(ref_img.dataobj), np.asarray(pred_img.dataobj)
        if ref.shape != pred.shape or not np.allclose(ref_img.affine, pred_img.affine, atol=1e-3):
            cases[ref_path.name] = {"error": f"geometry differs: {ref.shape} vs {pred.shape}"}
            continue
        d = {}
        for name, v in classes.items():
            a, b = ref == v, pred == v
            denom = a.sum() + b.sum()
            d[name] = round(float(2 * (a & b).sum() / denom), 4) if denom else None
        cases[ref_path.name] = d
    mean = {}
    for name in classes:
        vals = [c[name] for c in cases.values() if isinstance(c.get(name), float)]
        mean[name] = round(sum(vals) / len(vals), 4) if vals else None
    return {"cases": cases, "mean": mean}


# ================================================================= driver
def run(dataset_dir: Path, work_dir: Path, dataset_id: int = 990, name: str | None = None, train_iterations: int = 0,
        iterations_per_epoch: int | None = None, val_iterations: int = 5, final_validation: bool = False, tta: bool = False,
        pred_dir: Path | None = None, threads: int = 2, da_workers: int = 1, verbose: bool = False,
        resume: bool = False) -> dict:
    dataset_dir, work_dir = Path(dataset_dir).resolve(), Path(work_dir).resolve()
    name = name or dataset_dir.name
    env = nnunet_env(work_dir, threads, da_workers)
    t_all = time.perf_counter()
    raw = make_raw_dataset(dataset_dir, work_dir, dataset_id, name)
    plans, plan_wall = plan_and_preprocess(dataset_id, env, work_dir, verbose)
    plan_summary = summarize_plans(plans)
    print(format_plan(plan_summary), flush=True)
    summary: dict = {
        "dataset_dir": str(dataset_dir),
        "raw_dataset": str(raw),
        "work_dir": str(work_dir),
        "env": {k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_compile", "nnUNet_n_proc_DA", "OMP_NUM_THREADS")},
        "plan_and_preprocess_wall_s": round(plan_wall, 2),
        "plans": plan_summary,
    }
    if train_iterations:
        summary["train"] = train(dataset_id, env, work_dir, train_iterations, iterations_per_epoch, val_iterations,
                                 final_validation, verbose, resume)
        inputs = sorted(d for d in dataset_dir.glob("imagesTs*") if d.is_dir())
        pred_dir = Path(pred_dir).resolve() if pred_dir else work_dir / "predictions"
        preds = predict(dataset_id, env, work_dir, inputs, pred_dir, tta, verbose)
        labels = json.loads((dataset_dir / "dataset.json").read_text())["labels"]
        plans_file = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{dataset_id:03d}_*/nnUNetPlans.json"))
        for folder, info in preds.items():
            info["nnunet_view"] = nnunet_view(Path(info["input"]), env, plans_file, raw / "dataset.json")
            label_dir = dataset_dir / folder.replace("images", "labels", 1)
            if label_dir.is_dir():
                info["dice"] = dice_scores(Path(info["output"]), label_dir, labels)
        summary["predictions"] = preds
    summary["total_wall_s"] = round(time.perf_counter() - t_all, 2)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="nnU-Net v2 reference plan/train/predict for a thick-slice benchmark dataset.",
                                epilog="Run with the nnU-Net venv's python (e.g. /path/to/nnunet-venv/bin/python).")
    p.add_argument("dataset_dir", type=Path, help="folder written by scripts/prepare_thick_slice_data.py")
    p.add_argument("--work-dir", type=Path, required=True, help="holds nnUNet_raw/, nnUNet_preprocessed/, nnUNet_results/, logs/")
    p.add_argument("--dataset-id", type=int, default=990, help="nnU-Net dataset id (default 990)")
    p.add_argument("--name", default=None, help="nnU-Net dataset name (default: the folder name, letters and digits only)")
    p.add_argument("--train-iterations", type=int, default=0,
                   help="train 3d_fullres fold 'all' for N iterations, then predict (default 0: plan only)")
    p.add_argument("--iterations-per-epoch", type=int, default=None, help="default: largest divisor of N that is <= 50")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="continue a stopped training under WORK from its last epoch, keep a finished one")
    p.add_argument("--val-iterations", type=int, default=5, help="validation iterations per epoch (default 5)")
    p.add_argument("--final-validation", action="store_true", help="run nnU-Net's full validation pass after training (slow on CPU)")
    p.add_argument("--tta", action="store_true", help="predict with mirroring test-time augmentation (default: --disable_tta)")
    p.add_argument("--pred-dir", type=Path, default=None, help="predictions go to PRED_DIR/imagesTs[_reoriented] (default WORK/predictions)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="OMP/MKL threads for nnU-Net processes (default min(2, cores))")
    p.add_argument("--da-workers", type=int, default=1, help="nnUNet_n_proc_DA: data-augmentation worker processes (default 1)")
    p.add_argument("--summary-json", type=Path, default=None, help="default WORK/nnunet_reference_summary.json")
    p.add_argument("--verbose", action="store_true", help="stream nnU-Net's output to the console")
    args = p.parse_args(argv)

    summary = run(args.dataset_dir, args.work_dir, args.dataset_id, args.name, args.train_iterations, args.iterations_per_epoch,
                  args.val_iterations, args.final_validation, args.tta, args.pred_dir, args.threads, args.da_workers, args.verbose,
                  args.resume)
    text = json.dumps(summary, indent=2)
    out = args.summary_json or Path(summary["work_dir"]) / "nnunet_reference_summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    print(f"summary written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
