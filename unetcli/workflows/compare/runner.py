"""``unet compare``, the runner: train, predict and score every run of a plan, then write the report.

The study folder ``DIR`` holds:

- ``runs/{variant}_seed{s}/``: a normal run folder plus ``predictions/`` and ``eval/``
  (``metrics.csv``, ``summary.json``); a run counts as finished once ``eval/summary.json`` exists
  (and ``study.json`` says this plan started it);
- ``study.json``: the plan (variants, seeds, data, config) and every run's status, duration,
  parameter count and thread count; the variant statistics once the study is complete;
- ``report.md`` with ``comparison.png`` (bars with CIs), ``comparison.csv``, ``curves.png``
  (validation Dice per epoch, mean over seeds with a min-max band) and ``overlays/CASE.png``
  (one column per variant, plus a zoom) for the cases where the variants differ most in surface Dice.

Rerunning the same command skips finished runs; a run left half-trained continues from its
``checkpoints/last.pt`` (``resume_training``), or is trained again from scratch if that fails.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetcli.atomic import atomic_write_text
from unetcli.config import RunConfig, config_from_dict
from unetcli.errors import Interrupted, OutputError, TrainingError, UnetCliError
from unetcli.evaluation.labels import eval_label_values, metadata_label_names
from unetcli.evaluation.scoring import evaluate
from unetcli.evaluation.stats import Comparison, comparison_csv_text, write_comparison_chart
from unetcli.evaluation.summary import write_json, write_reports
from unetcli.inference.predict import predict
from unetcli.models import build_model, count_parameters
from unetcli.checkpoint import load_checkpoint, resolve_checkpoint
from unetcli.training.resume import resume_training, run_progress
from unetcli.training.trainer import train
from unetcli.workflows.compare.figures import write_case_grids, write_curves
from unetcli.workflows.compare.study import RunSpec, StudyData, Study
from unetcli.workflows.compare.report import REPORT_METRICS, Report, build_report, read_scores, report_markdown, results_record

log = logging.getLogger("unetcli")

STUDY_VERSION = 1


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60:02d}:{seconds % 60:02d}"


def _write_state(out: Path, state: dict[str, Any]) -> None:
    write_json(out / "study.json", state)


def _load_state(out: Path, plan: Study, overwrite: bool) -> dict[str, Any]:
    """The study's record: continue it if the plan matches, refuse if not (unless ``overwrite``)."""
    fingerprint = plan.fingerprint()
    fresh = {"version": STUDY_VERSION, "plan": fingerprint,
             "runs": {s.name: {"variant": s.variant, "seed": s.seed, "status": "pending"} for s in plan.runs()}}
    path = out / "study.json"
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder", hint="choose another --out")
    if path.is_file():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            if not overwrite:
                raise OutputError(f"{path}: not readable ({exc})", hint="pass --overwrite to start the study again") from exc
            return fresh
        if overwrite:
            return fresh
        if not isinstance(state, dict) or state.get("plan") != fingerprint:
            old = state.get("plan", {}) if isinstance(state, dict) else {}
            differs = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise OutputError(f"{out}: holds a study with another plan (differs in: {', '.join(differs) or 'format'})",
                              hint="rerun with the same options to continue it, choose another --out, "
                                   "or pass --overwrite to train every run again")
        for spec in plan.runs():
            state["runs"].setdefault(spec.name, fresh["runs"][spec.name])
        return state
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: folder is not empty and holds no study.json", hint="choose another --out or pass --overwrite")
    return fresh


def execute_run(spec: RunSpec, cfg: RunConfig, data: StudyData, run_dir: Path, fresh_start: bool,
                progress: bool) -> None:
    """Train one run (from scratch, or on from its checkpoint unless ``fresh_start``), predict the
    held-out cases, score them."""
    (run_dir / "eval" / "summary.json").unlink(missing_ok=True)  # the finished-marker goes last
    trained = "none" if fresh_start else run_progress(run_dir)
    if trained == "partial":
        log.info("%s: continuing the half-trained run from checkpoints/last.pt", spec.name)
        try:
            resume_training(run_dir, data.train, {"train.device": cfg.train.device, "train.num_threads": cfg.train.num_threads,
                                                  "train.num_workers": cfg.train.num_workers}, progress=progress)
            trained = "finished"
        except UnetCliError as exc:
            if isinstance(exc, (Interrupted, TrainingError)):
                raise
            log.warning("%s: cannot continue (%s); training it again from scratch", spec.name, exc.message)
            trained = "none"
    if trained != "finished":
        train(data.train, copy.deepcopy(cfg), run_dir, overwrite=True, progress=progress)
    predict(run_dir, data.test_images, run_dir / "predictions", device_name=cfg.train.device, overwrite=True,
            progress=progress)
    meta = load_checkpoint(resolve_checkpoint(run_dir))["metadata"]
    result = evaluate(run_dir / "predictions", data.test_labels, labels=eval_label_values(meta),
                      label_names=metadata_label_names(meta, run_dir))
    write_reports(result, run_dir / "eval")


@dataclass
class StudyResult:
    out: Path
    report: Path
    comparison: Comparison
    table: str
    """The markdown result table (as in ``report.md``)."""
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def run_study(plan: Study, out: Path, overwrite: bool = False, progress: bool = True) -> StudyResult:
    """Run every unfinished run of ``plan`` into ``out/runs/``, then write the report.

    A run is finished when its ``eval/summary.json`` exists and ``study.json`` says this plan
    started it (so that runs of an earlier plan, left by an interrupted ``--overwrite``, are not
    taken for finished ones); a started, unfinished run continues from its checkpoint.
    """
    state = _load_state(out, plan, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _write_state(out, state)
    specs = plan.runs()

    def started(spec: RunSpec) -> bool:
        return state["runs"][spec.name].get("status") in ("running", "finished")

    def finished(spec: RunSpec) -> bool:
        return started(spec) and (out / "runs" / spec.name / "eval" / "summary.json").is_file()

    todo = sum(1 for spec in specs if not finished(spec))
    ran: list[str] = []
    skipped: list[str] = []
    for index, spec in enumerate(specs, 1):
        run_dir = out / "runs" / spec.name
        record = state["runs"][spec.name]
        if finished(spec):
            skipped.append(spec.name)
            log.info("run %d/%d (%s, seed %d): finished earlier, skipping", index, len(specs), spec.variant, spec.seed)
            if record.get("status") != "finished":
                record.update(_run_record(run_dir, None))
                _write_state(out, state)
            continue
        done = [float(r["seconds"]) for r in state["runs"].values() if r.get("status") == "finished" and r.get("seconds")]
        eta = _fmt_duration(float(np.mean(done)) * (todo - len(ran))) if done else "--:--"
        log.info("run %d/%d (%s, seed %d) ... ETA %s", index, len(specs), spec.variant, spec.seed, eta)
        fresh_start = not started(spec)
        record["status"] = "running"
        _write_state(out, state)
        start = time.perf_counter()
        try:
            execute_run(spec, plan.run_config(spec), plan.data, run_dir, fresh_start, progress)
        except Interrupted as exc:
            finished_runs = sum(1 for r in state["runs"].values() if r.get("status") == "finished")
            raise Interrupted(f"study interrupted in run {index}/{len(specs)} ({spec.name}); {finished_runs} run(s) "
                              f"finished, a checkpoint of {spec.name} is saved", exc.signum,
                              hint="rerun the same `unet compare` command (without --overwrite) to continue: finished "
                                   f"runs are skipped and {spec.name} continues from its checkpoint") from exc
        record.update(_run_record(run_dir, time.perf_counter() - start))
        _write_state(out, state)
        ran.append(spec.name)
    report = write_report(plan, out, state)
    return StudyResult(out, out / "report.md", report.comparison, report.table, ran, skipped)


def _run_record(run_dir: Path, seconds: float | None) -> dict[str, Any]:
    cfg = config_from_dict(load_checkpoint(resolve_checkpoint(run_dir))["config"])
    record: dict[str, Any] = {"status": "finished", "parameters": count_parameters(build_model(cfg.model))}
    if seconds is not None:
        record.update(seconds=round(seconds, 2), torch_threads=torch.get_num_threads())
    return record


def write_report(plan: Study, out: Path, state: dict[str, Any]) -> Report:
    """``report.md`` with its figures and ``comparison.csv``; the results go into ``study.json``."""
    scores = read_scores(plan, out, state)
    overlay_cases = write_case_grids(plan, out, scores)
    atomic_write_text(out / "comparison.csv", comparison_csv_text(scores.comparison))
    write_comparison_chart(scores.comparison, out / "comparison.png", REPORT_METRICS)
    write_curves(plan, out, scores.histories)
    report = build_report(plan, out, scores, overlay_cases)
    state["results"] = results_record(report)
    _write_state(out, state)
    atomic_write_text(out / "report.md", report_markdown(plan, report))
    return report
