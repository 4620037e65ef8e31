"""Prediction over many cases: ``--part I/N`` shares them out over jobs, ``--continue`` resumes an
interrupted prediction without redoing finished cases."""

from __future__ import annotations

from pathlib import Path

from helpers import error_lines, invoke, make_blobs

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
