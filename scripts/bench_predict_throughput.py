"""Prediction throughput over a folder of scans: ``unet predict`` against ``nnUNetv2_predict``.

One model architecture and plan on both sides: a unetcli run and an nnU-Net v2 ``3d_fullres`` model
trained on the same dataset (``scripts/bench_robustness.py --nnunet-python`` trains both; unetcli's
plan is nnU-Net's). Two input folders:

* ``octants``: every held-out scan of the robustness benchmark (25 small volumes, ~40 x 49 x 42 at
  2 mm: per-case overheads dominate);
* ``brains``: the benchmark's whole-brain scan (Colin27, 91 x 109 x 91 at 2 mm) copied under 20
  names (sliding windows dominate).

Commands, all without test-time augmentation, on the CPU with ``--threads`` threads (nnU-Net's
predictor sets torch to the machine's core count on the CPU: use that count for a like-for-like run):

* ``unetcli``: ``unet predict RUN IN OUT --no-mirror --qc off`` (reading ahead and writing behind;
  ``--precision auto``: bf16 where the CPU has it natively);
* ``unetcli fp32``: the same in fp32, as nnU-Net computes on a CPU;
* ``unetcli sequential``: the same with ``--no-overlap``;
* ``unetcli + qc``: the default ``--qc on`` (the quality report) with overlap;
* ``nnU-Net v2``: ``nnUNetv2_predict -i IN -o OUT -d ID -c 3d_fullres -f all -tr TRAINER --disable_tta
  -device cpu`` with ``-npp`` / ``-nps`` at their defaults (3 / 3).

Each runs ``--repeats`` times, the commands alternating; a command's figure is its median wall time
(the whole command: start-up, model loading, all cases) as cases per minute, and the largest summed
resident memory of its process tree (sampled every 0.1 s).

    python scripts/bench_predict_throughput.py DATA RUN --nnunet-work NNUNET_WORK \\
        --nnunet-python /path/to/nnunet-venv/bin/python --out /tmp/bench_throughput --threads 2

Results accumulate in ``OUT/results.json`` per input folder (``--sets brains --copies 6 --repeats 1``
adds a shorter whole-brain run to an earlier octants run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch
from benchlib.machine import load_note, machine_info, print_machine
from benchlib.runs import unet_cmd
from benchlib.scoring import ROBUST_IMAGES


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, MiB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in (Path("/proc") / str(current) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak summed RSS MiB of the process tree) of one command; exits on failure."""
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def watch() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mib(proc.pid))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return wall, peak[0]


def input_sets(data: Path, out: Path, copies: int) -> dict[str, Path]:
    """The two input folders (the whole-brain one made under ``out``)."""
    brains = out / "inputs" / "brains"
    if len(list(brains.glob("*.nii.gz"))) != copies:  # made again when --copies changes
        shutil.rmtree(brains, ignore_errors=True)
        brains.mkdir(parents=True)
        source = data / ROBUST_IMAGES / "colin27__colin27_0000.nii.gz"
        for i in range(copies):
            shutil.copyfile(source, brains / f"brain{i:03d}_0000.nii.gz")
    return {"octants": data / ROBUST_IMAGES, "brains": brains}


def commands(args: argparse.Namespace, folder: Path, pred: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    base = ["predict", args.run, folder]
    common = ["--no-mirror", "--num-threads", threads, "--overwrite", "--device", "cpu"]
    work = args.nnunet_work
    nn_env = {**env, "nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
              "nnUNet_results": str(work / "nnUNet_results"), "nnUNet_compile": "f"}
    tool = str(Path(args.nnunet_python).parent / "nnUNetv2_predict")
    return {
        "unetcli": (unet_cmd(*base, pred / "unetcli", *common, "--qc", "off"), env),
        "unetcli fp32": (unet_cmd(*base, pred / "fp32", *common, "--qc", "off", "--precision", "fp32"), env),
        "unetcli sequential": (unet_cmd(*base, pred / "sequential", *common, "--qc", "off", "--no-overlap"), env),
        "unetcli + qc": (unet_cmd(*base, pred / "qc", *common), env),
        "nnU-Net v2": ([tool, "-i", str(folder), "-o", str(pred / "nnunet"), "-d", str(args.dataset_id), "-c", "3d_fullres",
                        "-f", "all", "-tr", args.trainer, "-chk", "checkpoint_final.pth", "--disable_tta", "-device", "cpu"],
                       nn_env),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="folder written by scripts/prepare_robustness_data.py")
    p.add_argument("run", type=Path, help="unetcli run trained on DATA")
    p.add_argument("--nnunet-work", type=Path, required=True, help="nnU-Net work folder of scripts/nnunet_reference.py")
    p.add_argument("--nnunet-python", required=True, help="python of the nnU-Net virtualenv")
    p.add_argument("--dataset-id", type=int, default=993)
    p.add_argument("--trainer", default="nnUNetTrainer_BenchRef")
    p.add_argument("--out", type=Path, default=Path("bench_throughput_out"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--copies", type=int, default=20, help="whole-brain scans in the 'brains' folder")
    p.add_argument("--sets", default="octants,brains", help="which input folders, comma-separated (default both)")
    args = p.parse_args()
    print_machine(machine_info(torch.device("cpu")))
    results_path = args.out / "results.json"
    results: dict[str, dict[str, dict[str, float]]] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    chosen = args.sets.split(",")
    for name, folder in input_sets(args.data, args.out, args.copies).items():
        if name not in chosen:
            continue
        cases = len(list(folder.glob("*.nii.gz")))
        runs = commands(args, folder, args.out / "pred" / name)
        walls: dict[str, list[float]] = {k: [] for k in runs}
        peaks: dict[str, list[float]] = {k: [] for k in runs}
        for round_ in range(args.repeats):
            for key in (list(runs) if round_ % 2 == 0 else list(reversed(runs))):
                wall, peak = timed(*runs[key])
                walls[key].append(wall)
                peaks[key].append(peak)
        results[name] = {k: {"cases": cases, "wall_s": statistics.median(walls[k]), "walls": walls[k],
                             "cases_per_min": 60 * cases / statistics.median(walls[k]), "peak_rss_mib": max(peaks[k])}
                         for k in runs}
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))  # each input folder as it finishes
    print(load_note())
    print(f"\n{args.threads} thread(s), no test-time augmentation; median of {args.repeats} alternating runs\n")
    print("| input | command | cases | wall (s) | cases / min | vs nnU-Net v2 | peak RSS (MiB) |\n|---|---|---|---|---|---|---|")
    for name, res in results.items():
        ref = res["nnU-Net v2"]["cases_per_min"]
        for key, r in res.items():
            print(f"| {name} | {key} | {r['cases']} | {r['wall_s']:.1f} | {r['cases_per_min']:.1f} | "
                  f"x{r['cases_per_min'] / ref:.2f} | {r['peak_rss_mib']:.0f} |")
    print(f"\nwritten: {results_path}")


if __name__ == "__main__":
    main()
