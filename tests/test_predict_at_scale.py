"""Prediction over many cases: ``--part I/N`` shares them out over jobs, ``--continue`` resumes an
interrupted prediction without redoing finished cases."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from helpers import error_lines, finish, invoke, make_blobs, start_ranks
from PIL import Image

TINY = ["--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=2", "--batch-size", "2",
        "--precision", "fp32", "--device", "cpu", "--num-threads", "1", "--set", "train.num_workers=0"]


def test_parts_cover_every_case_once_and_continue_writes_only_the_missing(tmp_path: Path) -> None:
    data = make_blobs(tmp_path / "data", n=6)
    run = tmp_path / "run"
    trained = invoke("train", data, "--out", run, "--epochs", "1", *TINY)
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "preds"
    written: list[str] = []
    for i in (1, 2, 3):
        result = invoke("predict", run, data / "images", out, "--device", "cpu", "--part", f"{i}/3")
        assert result.exit_code == 0, result.output
        written += [line for line in result.output.split() if line.endswith(".png")]
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(p.name for p in (data / "images").glob("*.png"))  # 6 cases, each once
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / names[2]).unlink()
    (out / names[4]).unlink()
    again = invoke("predict", run, data / "images", out, "--device", "cpu", "--continue")
    assert again.exit_code == 0 and "wrote 2 mask(s)" in again.output, again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name not in (names[2], names[4])} == \
        {n: t for n, t in stamps.items() if n not in (names[2], names[4])}
    refused = invoke("predict", run, data / "images", out, "--device", "cpu")
    assert refused.exit_code == 2 and "already exists" in error_lines(refused.output)[0]
    bad = invoke("predict", run, data / "images", out, "--part", "4/3")
    assert bad.exit_code == 2 and "--part 4/3" in error_lines(bad.output)[0]


def test_ranks_started_by_torchrun_share_the_cases_and_write_one_report(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m unetcli predict``: every case written once, the same masks as one
    process, one ``predictions.csv`` with every case, and one summary (rank 0's)."""
    data = make_blobs(tmp_path / "data", n=5)
    run = tmp_path / "run"
    assert invoke("train", data, "--out", run, "--epochs", "1", *TINY).exit_code == 0
    single = invoke("predict", run, data / "images", tmp_path / "one", "--device", "cpu")
    assert single.exit_code == 0, single.output
    procs = start_ranks(["predict", str(run), str(data / "images"), "shared", "--device", "cpu"], tmp_path)
    outputs = [(p.wait(timeout=240), *p.communicate()) for p in procs]
    assert [code for code, _, _ in outputs] == [0, 0], outputs
    assert "wrote 5 mask(s)" in outputs[0][1] and outputs[1][1].strip() == ""
    shared = tmp_path / "shared"
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert sorted(p.name for p in shared.glob("*.png")) == names
    for name in names:
        assert np.array_equal(np.asarray(Image.open(shared / name)), np.asarray(Image.open(tmp_path / "one" / name)))
    assert sorted(p.name for p in shared.glob("*.csv")) == ["predictions.csv"]
    with open(shared / "predictions.csv", newline="") as handle:
        assert sorted(row["case"] for row in csv.DictReader(handle)) == [Path(n).stem for n in names]


def test_part_under_torchrun_is_one_clear_error(tmp_path: Path) -> None:
    data = make_blobs(tmp_path / "data", n=2)
    procs = start_ranks(["predict", str(tmp_path / "run"), str(data / "images"), "out", "--part", "1/2"], tmp_path)
    results = finish(procs, timeout=120)
    assert all(code == 2 for code, _ in results), results
    errors = [line for _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--part 1/2 under torchrun: the processes already share the cases" in errors[0], errors
