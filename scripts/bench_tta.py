"""Mirror test-time augmentation: held-out Dice gained against prediction time, on the robustness benchmark.

For each trained run, ``unet predict`` writes every held-out scan of a dataset made by
``scripts/prepare_robustness_data.py`` twice: with ``--no-mirror`` and with ``--mirror`` (the
average over the flips of every combination of spatial axes: 8 passes in 3D, as nnU-Net's default).
Both are scored with the same scorer (mean of grey and white matter per case, then over the set);
the time is the whole ``unet predict`` command (``--qc off``), the two settings alternating
``--repeats`` times, median taken.

    python scripts/bench_tta.py /tmp/robust222 RUN [RUN ...] --out /tmp/bench_tta --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchlib.machine import load_note, machine_info, print_machine
from benchlib.runs import unet
from benchlib.scoring import ROBUST_IMAGES, dice_per_set, perturbed_mean

import torch

SETTINGS = {"no TTA": "--no-mirror", "mirror TTA": "--mirror"}


def measure(run: Path, data: Path, out: Path, threads: int, repeats: int) -> dict[str, dict[str, object]]:
    """Dice per set and predict wall seconds (median of ``repeats``) of each setting for ``run``."""
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(repeats):
        for name, flag in SETTINGS.items():
            pred = out / run.name / name.replace(" ", "_")
            seconds[name].append(unet("predict", run, data / ROBUST_IMAGES, pred, flag, "--qc", "off", "--overwrite",
                                      "--num-threads", threads))
    return {name: {"seconds": statistics.median(seconds[name]),
                   "dice": dice_per_set(out / run.name / name.replace(" ", "_"), data)} for name in SETTINGS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="folder written by scripts/prepare_robustness_data.py")
    p.add_argument("runs", type=Path, nargs="+", help="run folders trained on DATA (e.g. by scripts/bench_robustness.py)")
    p.add_argument("--out", type=Path, default=Path("bench_tta_out"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    print_machine(machine_info(torch.device("cpu")))
    print(load_note())
    results = {str(run): measure(run, args.data, args.out, args.threads, args.repeats) for run in args.runs}
    cases = len(list((args.data / ROBUST_IMAGES).glob("*.nii.gz")))
    print(f"\n{cases} held-out scans, {args.threads} thread(s); Dice = mean of GM and WM; time = whole `unet predict`\n")
    print("| run | set | no TTA | mirror TTA | gain |\n|---|---|---|---|---|")
    for run, res in results.items():
        plain, tta = res["no TTA"]["dice"], res["mirror TTA"]["dice"]
        for s in plain:
            print(f"| {Path(run).name} | {s} | {plain[s]['mean']:.3f} | {tta[s]['mean']:.3f} | {tta[s]['mean'] - plain[s]['mean']:+.3f} |")
        gain = perturbed_mean(tta) - perturbed_mean(plain)
        print(f"| {Path(run).name} | **mean of the changed sets** | **{perturbed_mean(plain):.3f}** | **{perturbed_mean(tta):.3f}** "
              f"| **{gain:+.3f}** |")
        t0, t1 = res["no TTA"]["seconds"], res["mirror TTA"]["seconds"]
        print(f"| {Path(run).name} | predict wall (s) | {t0:.1f} | {t1:.1f} | x{t1 / t0:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
