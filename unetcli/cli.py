"""The ``unet`` command: parse options, load the config, call one function, print the result.

Every :class:`~unetcli.errors.UnetCliError` raised below is turned into one message and an
exit code here, in :class:`ErrorHandlingGroup`, and nowhere else.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from unetcli import __version__
from unetcli.config import ConfigSources, parse_duration, parse_set_option
from unetcli.errors import ConfigError, UnetCliError

err_console = Console(stderr=True)
console = Console()
log = logging.getLogger("unetcli")


_state: dict[str, bool] = {"debug": os.environ.get("UNETCLI_DEBUG") == "1", "quiet": False}


def handle_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn project errors into ``error: ...`` + a hint on stderr and their exit code, with no
    traceback (``--debug`` shows it). Every command goes through here and nowhere else."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except UnetCliError as exc:
            if _state["debug"]:
                raise
            if exc.quiet:
                raise typer.Exit(exc.exit_code) from None
            rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""
            for line in exc.message.splitlines() or [exc.message]:
                if rank and not line.startswith("rank "):
                    line = rank + line
                err_console.print(f"[bold red]error:[/bold red] {escape(line)}", highlight=False, soft_wrap=True, markup=True)
            if exc.hint:  # escaped: text such as pip install 'unetcli[mlflow]' is not markup
                err_console.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/bold red]")
            raise typer.Exit(130) from None
        except Exception as exc:  # a bug: say so plainly, keep the traceback behind --debug
            if _state["debug"] or isinstance(exc, (typer.Exit, typer.Abort)):
                raise
            err_console.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
            err_console.print("[yellow]hint:[/yellow] run again with `unet --debug ...` for the traceback, and report it")
            raise typer.Exit(1) from None

    return wrapper


if hasattr(typer.core.TyperOption, "display_type_rich"):  # typer >= 0.20 prints a type column, "<bool>" for every flag
    _display_type = typer.core.TyperOption.display_type_rich
    typer.core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _display_type(self, ctx)  # type: ignore[method-assign]

app = typer.Typer(
    help="Train, apply and score U-Net segmentation models on 2D PNG images and 3D NIfTI MRI.\n\n"
    "Quick start: `unet demo` trains on real MRI slices shipped with the package, predicts held-out "
    "slices and scores them.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _examples(*lines: str) -> str:
    """A command's epilog: one example per line (Typer keeps paragraph breaks)."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def _version(value: bool) -> None:
    if value:
        console.print(f"unetcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bars.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = None,
) -> None:
    _state["debug"] = debug or _state["debug"]
    _state["quiet"] = quiet
    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False, rich_tracebacks=False)
    # --quiet quiets the terminal only: a run's log.txt handler still gets every INFO record.
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    log.handlers = [h for h in log.handlers if not isinstance(h, RichHandler)] + [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    warnings.showwarning = _warning_as_log_line


def _warning_as_log_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                         file: Any = None, line: Optional[str] = None) -> None:
    """A library's warning as one log line (``UserWarning: ...``), not Python's raw two-line form
    with a source path, which would precede and obscure a clean ``error:`` line."""
    log.warning("%s: %s", category.__name__, " ".join(str(message).split()))


def _progress() -> bool:
    return not _state["quiet"] and sys.stderr.isatty()


def _ints(text: Optional[str], name: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} '{text}' is not a comma-separated list of integers", hint=f"e.g. {name} 128,128") from None


def _floats(text: Optional[str], name: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} '{text}' is not a comma-separated list of numbers", hint=f"e.g. {name} 1.0,1.0") from None


def _use_threads(num_threads: Optional[int]) -> None:
    """--num-threads of a command that computes outside a training run (plan, predict)."""
    if num_threads is None:
        return
    if num_threads < 1:
        raise ConfigError(f"--num-threads must be at least 1, got {num_threads}", hint="e.g. --num-threads 2")
    from unetcli.runtime import configure_threads

    configure_threads(num_threads)


def _duration(text: Optional[str]) -> Optional[float]:
    return None if text is None else parse_duration(text)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/png2d.yaml); flags override it.")]
EpochsOpt = Annotated[Optional[int], typer.Option(
    help="Epochs (each = train.iterations_per_epoch iterations + validation).", show_default="30, train.epochs")]
TimeOpt = Annotated[Optional[str], typer.Option("--time", metavar="DURATION", help=(
    "Train for this long (e.g. 90s, 45m, 2h, 1h30m; validation included): the learning-rate schedule runs over the time, "
    "the run ends with its last validation and checkpoint inside it. With --epochs too, whichever ends first."))]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N | mps (default: auto, a GPU where there is one).")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="auto | fp32 | bf16 | fp16. auto uses bf16 only where the hardware runs it natively.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed (split, sampling, initialisation).")]
LrOpt = Annotated[Optional[float], typer.Option(help="Peak learning rate.", show_default="3e-3, train.lr")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Any config key: --set section.key=value (repeatable), e.g. --set model.features=[16,32,64,128].")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs instead of refusing.")]
LogToOpt = Annotated[Optional[str], typer.Option("--log-to", metavar="TRACKERS", help=(
    "Experiment trackers, comma-separated: tensorboard (RUN/tensorboard/), mlflow (MLFLOW_TRACKING_URI or ./mlruns), wandb "
    "(WANDB_MODE, e.g. offline); each is an extra: pip install 'unetcli[mlflow]'. See docs/tracking.md."))]


def _trackers(text: Optional[str]) -> Optional[list[str]]:
    """--log-to: the tracker names, refused early (one error line) when unknown or not installed."""
    if text is None:
        return None
    from unetcli.tracking import parse_trackers, require_installed

    names = parse_trackers(text)
    require_installed(names)
    return names


ResumeOpt = Annotated[Optional[Path], typer.Option(
    "--resume", metavar="RUN",
    help="Continue the run in folder RUN from checkpoints/last.pt (after a crash, kill or Ctrl-C), with its own config; "
         "with a larger --epochs or --time, train a finished run longer. Only --epochs, --time, --device, --precision, "
         "--num-threads and --set train.checkpoint_interval / train.num_workers may change.")]
InitOpt = Annotated[Optional[str], typer.Option("--init", metavar="RUN", help=(
    "Fine-tune: start from this run folder's (best.pt) or checkpoint's weights; tensors that fit are loaded, the first "
    "convolution is adapted to other input channels, the head re-initialised for other classes."))]
FreezeEncoderOpt = Annotated[Optional[int], typer.Option("--freeze-encoder", metavar="EPOCHS", help=(
    "With --init: keep the encoder (stem + down blocks) fixed for the first EPOCHS epochs."))]
GpusOpt = Annotated[Optional[int], typer.Option(
    help="Train one run on N GPUs of this machine: runs this same command under torchrun with N processes "
         "(--batch-size stays the global batch). Several nodes or CPU processes: torchrun, see docs/architecture.md.",
    show_default=False)]


TrainConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="A plan configuration (2d | 3d_fullres | 3d_lowres; default: 3d_fullres for volumes, 2d for "
                           "images) or a YAML config file (see configs/png2d.yaml); flags override it.")]
PlanOpt = Annotated[Optional[Path], typer.Option("--plan", help="Use this plans.yaml (from `unet plan`, possibly edited) instead of "
                                                                "planning the data now.")]
PresetOpt = Annotated[Optional[str], typer.Option(help="Network preset to plan for: plain | resenc-m | resenc-l (residual encoders).")]
NoPlanOpt = Annotated[bool, typer.Option("--no-plan", help="Do not plan: fixed built-in defaults (32-256 features, 3x3(x3) "
                                                           "kernels, 2x pooling, median-shape patch) plus your config. A 3D "
                                                           "thick-slice run of at most 1,000 iterations trains these by itself.")]


@app.command(epilog=_examples("unet train data/ --epochs 20 --out runs/tissue",
                              "unet train data/ --time 45m --out runs/tissue        (a time budget)",
                              "unet plan data/ --out plans.yaml; unet train data/ --plan plans.yaml --config 3d_fullres",
                              "unet train --resume runs/tissue                      (continue a stopped run)",
                              "unet train --resume runs/tissue --epochs 40          (train a finished run longer)"))
@handle_errors
def train(
    data: Annotated[Optional[Path], typer.Argument(help="Folder with images/ + masks/ (PNG), or imagesTr/ + labelsTr/ (nnU-Net layout). "
                                                        "With --resume: optional, default the run's own data folder.",
                                                   show_default=False)] = None,
    config: TrainConfigOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder to create (default: runs/DATA-NAME_TIMESTAMP).")] = None,
    epochs: EpochsOpt = None,
    time_: TimeOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Patches per training step (default: the plan's).")] = None,
    lr: LrOpt = None,
    patch_size: Annotated[Optional[str], typer.Option(help="Training patch per axis, e.g. 128,128 (default: the plan's).")] = None,
    model_skip: Annotated[Optional[str], typer.Option(help="Skip connections: concat | add | none.")] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    num_threads: ThreadsOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = None,
    init: InitOpt = None,
    freeze_encoder: FreezeEncoderOpt = None,
    gpus: GpusOpt = None,
    plan: PlanOpt = None,
    preset: PresetOpt = None,
    no_plan: NoPlanOpt = False,
    log_to: LogToOpt = None,
) -> None:
    """Train a U-Net on a folder of images + masks; writes config, plan, checkpoints, metrics and curves to a run folder.

    Without --plan the data is planned first (as `unet plan` does); keys you give in a config file, --set or flags win.
    Ctrl-C or SIGTERM saves a checkpoint and stops (exit 130/143); `unet train --resume RUN` continues exactly where it stopped.
    """
    from unetcli.workflows.train import ConfigSources, PlanChoice, resume_run, train_new_run

    if gpus is not None:
        from unetcli.training.distributed import launch_on_gpus

        raise typer.Exit(launch_on_gpus(gpus, _argv_without_option(sys.argv[1:], "--gpus")))
    flags = {"train.epochs": epochs, "train.time_limit": _duration(time_), "train.batch_size": batch_size, "train.lr": lr,
             "train.patch_size": _ints(patch_size, "--patch-size"), "model.skip": model_skip,
             "train.device": device, "train.precision": precision, "train.seed": seed, "train.num_threads": num_threads,
             "train.init": init, "train.freeze_encoder_epochs": freeze_encoder, "train.trackers": _trackers(log_to)}
    if resume is not None:
        refused = [name for name, given in (
            ("--config", config), ("--batch-size", batch_size), ("--lr", lr), ("--patch-size", patch_size),
            ("--model-skip", model_skip), ("--seed", seed), ("--overwrite", overwrite or None),
            ("--out", out if out is not None and out.resolve() != resume.resolve() else None), ("--init", init),
            ("--freeze-encoder", freeze_encoder), ("--plan", plan), ("--preset", preset), ("--no-plan", no_plan or None),
        ) if given is not None]
        result, out = resume_run(resume, data, refused, set_ or [], flags, _progress()), resume
    else:
        out = out or Path("runs") / f"{(data or Path('.')).resolve().name}_{time.strftime('%Y%m%d-%H%M%S')}"
        result = train_new_run(data, ConfigSources(config, set_ or [], flags), PlanChoice(plan, preset, no_plan), out,
                               overwrite, _progress())
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line, from rank 0
        console.print(f"best validation Dice [bold]{result.best_dice:.4f}[/bold] at epoch {result.best_epoch}/{result.epochs} "
                      f"({result.seconds:.0f} s, {result.parameters:,} parameters); run folder: {out}")


def _argv_without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` less ``option VALUE`` / ``option=VALUE`` (to re-run the same command under torchrun)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


@app.command("plan", epilog=_examples("unet plan data/ --out plans.yaml",
                                      "unet train data/ --plan plans.yaml --config 3d_fullres",
                                      "unet plan data/ --time 30m                (iterations each configuration fits)"))
@handle_errors
def plan_(
    data: Annotated[Path, typer.Argument(help="Dataset folder, as for `unet train`.")],
    out: Annotated[Optional[Path], typer.Option(help="Write the plan to this YAML file (e.g. plans.yaml); without it, only print it.")] = None,
    memory: Annotated[Optional[float], typer.Option("--memory", metavar="GB", help=(
        "Memory budget of a training step in GB (default: 85 % of the GPU's memory on CUDA; on a CPU nnU-Net's 8 GB "
        "reference, so that the plan is the same on every machine)."))] = None,
    step_seconds: Annotated[Optional[float], typer.Option(help=(
        "Size the patch for a training step of this many seconds on this CPU instead (the plan then follows the "
        "machine's measured speed, and its load while measuring)."))] = None,
    time_: Annotated[Optional[str], typer.Option("--time", metavar="DURATION", help=(
        "The training time you have (e.g. 30m): the table adds how many iterations each configuration fits in it "
        "at this machine's estimated speed."))] = None,
    remeasure: Annotated[bool, typer.Option("--remeasure", help=(
        "Measure this CPU's speed again for the seconds-per-step estimate (the reading is cached per machine; one taken "
        "while other jobs ran is too low). The plan itself does not depend on it."))] = False,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    num_threads: ThreadsOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Plan training from the data, as nnU-Net does: fingerprint the dataset (spacing, shapes, intensities, classes), then
    per configuration (2d, 3d_fullres, 3d_lowres) the target spacing, network topology (per-axis kernels and pooling),
    patch and batch size for the budget, and normalisation. Prints the plan; --out writes plans.yaml for `unet train --plan`."""
    from unetcli.planning.apply import check_planning_keys, plan_dataset
    from unetcli.planning.plan_file import check_plan_output, write_plan
    from unetcli.planning.report import fingerprint_table, plan_table

    check_planning_keys(parse_set_option(item)[0] for item in set_ or [])
    cfg = ConfigSources(config, set_ or [], {"train.device": device, "train.precision": precision,
                                             "train.num_threads": num_threads}).resolve()
    _use_threads(cfg.train.num_threads)
    if out is not None:
        check_plan_output(out, overwrite)
    plan = plan_dataset(data, cfg, memory_gb=memory, step_seconds=step_seconds, preset=preset or "plain", remeasure=remeasure)
    console.print(fingerprint_table(plan))
    console.print(plan_table(plan, _duration(time_)))
    if out is not None:
        write_plan(plan, out, f"unet plan {data} (budget: {plan.budget})")
        console.print(f"wrote {out}; train with: unet train {data} --plan {out} [--config {' | '.join(plan.configurations)}]")


@app.command(epilog=_examples("unet cv data/ --folds 5 --out cv/ --time 4h",
                              "unet predict cv/ scans/ predictions/                (the folds' ensemble)",
                              "unet cv data/ --out cv/ --group-by '^(sub-[0-9]+)'   (a patient's scans in one fold)",
                              "unet cv data/ --out cv/ --fold 2                    (one fold per machine)"))
@handle_errors
def cv(
    data: Annotated[Path, typer.Argument(help="Dataset folder, as for `unet train`.")],
    out: Annotated[Path, typer.Option(help="Cross-validation folder; rerun the same command to continue an interrupted one.")],
    folds: Annotated[int, typer.Option(help="Number of folds.")] = 5,
    fold: Annotated[Optional[int], typer.Option(help="Train and predict only this fold (0-based); scoring runs once every fold is done.")] = None,
    parallel: Annotated[Optional[int], typer.Option(help="Run N folds at once (N processes; one GPU each where there are GPUs, "
                                                         "else the CPU cores shared out).")] = None,
    group_by: Annotated[Optional[str], typer.Option(help="Regular expression; cases with the same match (first group) stay in one fold.")] = None,
    splits: Annotated[Optional[Path], typer.Option(help="Your own folds: splits.json ({\"folds\": [{\"train\": [...], \"val\": [...]}]}) "
                                                        "or nnU-Net's splits_final.json.")] = None,
    config: TrainConfigOpt = None,
    configs: Annotated[Optional[str], typer.Option(help="Compare plan configurations on the same folds, e.g. 2d,3d_fullres: each "
                                                        "into CV/NAME/, then CV/comparison.json names the winner.")] = None,
    plan: PlanOpt = None,
    preset: PresetOpt = None,
    no_plan: NoPlanOpt = False,
    epochs: EpochsOpt = None,
    time_: Annotated[Optional[str], typer.Option("--time", metavar="DURATION", help=(
        "Time for the whole cross-validation (e.g. 2h), shared out over the folds (and configurations) to train; "
        "folds run side by side with --parallel share a slot."))] = None,
    time_per_fold: Annotated[Optional[str], typer.Option("--time-per-fold", metavar="DURATION", help=(
        "Time budget of each fold's training (e.g. 20m), as `unet train --time`."))] = None,
    lr: LrOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the folds and of every fold's training.")] = None,
    num_threads: ThreadsOpt = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again: replace an earlier cross-validation in --out.")] = False,
    log_to: LogToOpt = None, no_scoring: Annotated[bool, typer.Option("--no-scoring", hidden=True)] = False,
) -> None:
    """K-fold cross-validation: train every fold (normal run folders, resumable), predict each fold's held-out cases,
    score all out-of-fold predictions together (per class mean with 95 % bootstrap CIs, per fold), and choose the
    postprocessing (largest connected component) on them. `unet predict CV IN OUT` then predicts with the folds' ensemble."""
    from unetcli.workflows.cv.report import cv_table
    from unetcli.workflows.cv.runner import CVOptions, run_cv
    from unetcli.workflows.train import PlanChoice, planned_config

    flags = {"train.epochs": epochs, "train.time_limit": _fold_seconds(time_, time_per_fold, folds, fold, parallel, configs),
             "train.lr": lr, "train.device": device, "train.precision": precision, "train.seed": seed, "train.num_threads": num_threads,
             "train.trackers": _trackers(log_to)}
    CVOptions(folds=folds, group_by=group_by, splits_file=splits, only_fold=fold).check(parallel)  # before planning
    if configs:
        return _cv_configurations(data, out, configs, config, set_, flags, plan, preset, no_plan,
                                  dict(folds=folds, group_by=group_by, splits_file=splits, only_fold=fold), overwrite)
    cfg, run_files, explicit = planned_config(data, ConfigSources(config, set_ or [], flags), PlanChoice(plan, preset, no_plan))
    options = CVOptions(folds=folds, seed=cfg.train.seed, group_by=group_by, splits_file=splits, only_fold=fold, score=not no_scoring)
    if parallel is not None and fold is None:
        from unetcli.workflows.cv.parallel import run_cv_in_parallel

        result = run_cv_in_parallel(data, cfg, out, options, explicit, overwrite, parallel, num_threads, _progress(), run_files)
    else:
        result = run_cv(data, cfg, out, options, explicit, overwrite=overwrite, progress=_progress(), run_files=run_files)
    if result.oof is None:
        console.print(f"trained fold(s) {result.trained or '-'} (done earlier: {result.skipped or '-'}); scoring runs once "
                      f"every fold is done; folder: {out}")
        return
    console.print(cv_table(result))
    console.print(f"out-of-fold scores: {out}/summary.json, {out}/metrics.csv; postprocessing: {result.postprocessing['choice']}; "
                  f"predict with the ensemble: unet predict {out} IN OUT")


def _fold_seconds(total: Optional[str], per_fold: Optional[str], folds: int, fold: Optional[int], parallel: Optional[int],
                  configs: Optional[str]) -> Optional[float]:
    from unetcli.workflows.cv.runner import fold_time_budget

    return fold_time_budget(_duration(total), _duration(per_fold), folds, fold, parallel, len(configs.split(",")) if configs else 1)


def _cv_configurations(data: Path, out: Path, configs: str, config: Optional[Path], sets: Optional[list[str]],
                       flags: dict[str, Any], plan: Optional[Path], preset: Optional[str], no_plan: bool,
                       options: dict[str, Any], overwrite: bool) -> None:
    from unetcli.evaluation.stats import comparison_table
    from unetcli.workflows.cv.runner import cv_configurations
    from unetcli.workflows.train import PlanChoice

    if config is not None or no_plan:
        raise ConfigError(f"--configs '{configs}' compares plan configurations: it cannot be combined with --config or --no-plan",
                          hint="e.g. --configs 2d,3d_fullres")
    result = cv_configurations(data, out, configs, ConfigSources(None, sets or [], flags), PlanChoice(plan, preset), options,
                               overwrite, _progress())
    if result.comparison is None:
        console.print(f"scoring and comparison run once every fold of every configuration is done; folder: {out}")
        return
    console.print(comparison_table(result.comparison, metrics=("dice",)))
    first, *others = (result.winner or "").split("+")  # "A+B": the pair's ensemble won
    command = f"unet predict {out}/{first} IN OUT" + "".join(f" --ensemble-with {out}/{o}" for o in others)
    console.print(f"winner: [bold]{result.winner}[/bold] (highest out-of-fold mean Dice); {out}/comparison.json; "
                  f"predict with it: {command}")


@app.command(epilog=_examples("unet predict runs/tissue scans/ predictions/",
                              "unet predict tissue.onnx scans/ predictions/          (an exported model)",
                              "unet predict runs/tissue scans/ preds/ --part 2/4     (job 2 of 4; add --continue to resume)",
                              "torchrun --standalone --nproc-per-node 4 -m unetcli predict runs/tissue scans/ preds/  (4 processes)"))
@handle_errors
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder written by `unet train` (uses checkpoints/best.pt), a `unet cv` folder (the "
                                             "ensemble of its folds' last checkpoints), a checkpoint .pt file, "
                                             "or a file written by `unet export` (.onnx needs unetcli[onnx]; TorchScript .pt).")],
    input: Annotated[Path, typer.Argument(help="An image file or a folder of images (PNG; or NIfTI, MetaImage, NRRD, TIFF "
                                               "volumes; or a folder of DICOM series, one mask per series).")],
    output: Annotated[Path, typer.Argument(help="Folder for the masks (same names as the inputs); never an input folder.")],
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    num_threads: ThreadsOpt = None,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write NAME_probabilities.npz (float16, classes first).")] = False,
    mirror: Annotated[Optional[bool], typer.Option("--mirror/--no-mirror", help="Average over flipped inputs (slower, often better).",
                                                   show_default="the model's infer.mirror, off unless set")] = None,
    overwrite: OverwriteOpt = False,
    postprocessing: Annotated[bool, typer.Option("--postprocessing/--no-postprocessing", help=(
        "With a `unet cv` folder: apply the postprocessing it chose (default) or not."))] = True,
    ensemble_with: Annotated[Optional[list[Path]], typer.Option("--ensemble-with", help=(
        "Another model (run, cv folder, checkpoint or export) to average with RUN; repeatable. Configurations may "
        "differ (e.g. 2d and 3d_fullres: averaged on each file's grid)."))] = None,
    continue_: Annotated[bool, typer.Option("--continue", help=(
        "Skip cases whose output is already there (outputs are written atomically, so they are complete): rerun an "
        "interrupted prediction with the same command plus --continue."))] = False,
    part: Annotated[Optional[str], typer.Option("--part", metavar="I/N", help=(
        "Predict share I of N (every N-th case by name): N jobs with --part 1/N .. N/N cover every case once."))] = None,
    output_format: Annotated[Optional[str], typer.Option("--output-format", metavar="nii.gz|nii|mha|nrrd", help=(
        "File format of 3D masks (default: the input's own; NIfTI for DICOM series). Every format keeps the scan's "
        "spacing, origin and direction."))] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", metavar="best|last", help=(
        "Which checkpoint of a run folder (default best) or of each fold of a `unet cv` folder (default last)."))] = None,
    folds: Annotated[Optional[str], typer.Option("--folds", metavar="0,2", help=(
        "With a `unet cv` folder: ensemble these folds only (default: all)."))] = None,
    overlap: Annotated[bool, typer.Option("--overlap/--no-overlap", help=(
        "Read the next case and write the previous one while the network runs (same outputs; --no-overlap holds "
        "fewer cases in memory)."))] = True,
    qc: Annotated[str, typer.Option("--qc", metavar="on|off", help=(
        "Quality check: OUT/predictions.csv (predictions.partIofN.csv with --part) with every case's volumes, "
        "predicted Dice and the signals behind it (uncertainty, distance from the training cases); the cases to "
        "check are listed at the end. See docs/quality.md."))] = "on",
) -> None:
    """Write a mask for every input image, at the input's size. RUN may be a `unet cv` folder: the ensemble of its folds."""
    from unetcli.inference.predict import parse_part
    from unetcli.workflows.predict import predict_folder

    if qc not in ("on", "off"):
        raise ConfigError(f"--qc '{qc}' is not on or off", hint="--qc on (the default) or --qc off")
    _use_threads(num_threads)
    shares = parse_part(part) if part else None
    result = predict_folder([run, *(ensemble_with or [])], input, output, device_name=device or "auto", precision_name=precision,
                            probabilities=probabilities, overwrite=overwrite, mirror=mirror, progress=_progress(),
                            postprocessing=postprocessing, part=shares, resume=continue_,
                            output_format=output_format, checkpoint=_checkpoint_name(checkpoint),
                            folds=_fold_list(folds), overlap=overlap, qc=qc == "on")
    if not result.is_main:  # under torchrun, rank 0 speaks for all
        return
    console.print(f"wrote {len(result.written)} mask(s) to {output}")
    if qc == "on":
        _print_review(result.quality_csv, result.written)


def _print_review(report: Path, written: list[Path]) -> None:
    """The cases of this call flagged for review, one line per case and reason."""
    from unetcli.inference.quality_report import review

    result = review(report, written)
    if result.no_reference:
        console.print("note: the model has no training reference (trained by an older unetcli): only the uncertainty "
                      "signals were checked, not the distance from the training cases")
    for line in result.lines:
        console.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    console.print(f"quality: {len(result.flagged)} of {result.cases} case(s) flagged for review; details in {result.path}",
                  highlight=False, soft_wrap=True)


def _checkpoint_name(text: Optional[str]) -> Optional[str]:
    if text is not None and text not in ("best", "last"):
        raise ConfigError(f"--checkpoint {text}: expected best or last", hint="best.pt is the best validation score, last.pt the final epoch")
    return text


def _fold_list(text: Optional[str]) -> Optional[list[int]]:
    """``--folds 0,2`` -> [0, 2]."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--folds {text}: expected fold numbers separated by commas", hint="e.g. --folds 0,2") from None


@app.command(epilog=_examples("unet export runs/tissue --format onnx --out tissue.onnx",
                              "unet predict tissue.onnx scans/ predictions/"))
@handle_errors
def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `unet train` (uses checkpoints/best.pt) or a checkpoint .pt file.")],
    format_: Annotated[Optional[str], typer.Option("--format", help="onnx | torchscript (default: from --out's suffix: .onnx -> onnx, "
                                                                     ".pt/.pth/.ts -> torchscript; without --out, onnx).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="File to write (default: RUN/model.onnx or RUN/model.pt).")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a trained network (BatchNorm folded) as ONNX or TorchScript, with its preprocessing, patch size, sliding-window
    settings and labels embedded, so that `unet predict FILE IN OUT` (or any ONNX / TorchScript runtime) can use it."""
    from unetcli.inference.export import export_run

    result = export_run(run, out, format_, overwrite=overwrite)
    axes = "batch and spatial axes" if result.dynamic_spatial else "batch axis (spatial size fixed: valid padding)"
    console.print(f"wrote {result.path} ({result.model_format}, {result.size_bytes / 2**20:.1f} MiB, dynamic {axes}) from "
                  f"{result.checkpoint}; max |logit difference| to PyTorch {result.max_difference:.1e}")


def _regions(items: Optional[list[str]]) -> Optional[dict[str, list[int]]]:
    """``--region NAME=1,2,3`` (repeatable) -> {name: [labels]}."""
    if not items:
        return None
    regions: dict[str, list[int]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        parsed = _ints(values, f"--region {name.strip()}") if sep and name.strip() else None
        if not parsed:
            raise ConfigError(f"--region '{item}' is not NAME=LABELS", hint="e.g. --region whole_tumour=1,2,3")
        if name.strip() in regions:
            raise ConfigError(f"--region {name.strip()} is given twice")
        regions[name.strip()] = parsed
    return regions


@app.command("eval", epilog=_examples("unet eval predictions/ data/test/masks --out eval/ --labels 1,2",
                                      "unet eval runA/preds runB/preds --truth data/labelsTs --out compare/   (compare runs)"))
@handle_errors
def eval_(
    paths: Annotated[list[Path], typer.Argument(help="PRED TRUTH (folders or files of PNG masks or NIfTI label maps, paired by "
                                                     "file name); with --truth, one or more PRED folders to score and compare.",
                                                show_default=False)],
    truth: Annotated[Optional[Path], typer.Option(
        "--truth", help="Reference folder; every positional path is then a prediction folder (compare mode when 2+).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for metrics.csv (long: case, class, label, metric, value) and summary.json "
                                                     "(default: PRED_eval next to PRED; comparison_eval when comparing).")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Labels to score, e.g. 1,2 (default: every non-zero label found).")] = None,
    label_names: Annotated[Optional[str], typer.Option(help="Class names in label order, e.g. background,gm,wm (default: --run's "
                                                            "checkpoint, else dataset.json in/next to TRUTH).")] = None,
    region: Annotated[Optional[list[str]], typer.Option("--region", help="Score a union of labels as one class: NAME=1,2,3 (repeatable). "
                                                                         "Without --labels only the regions are scored. "
                                                                         "Default: the regions of dataset.json in/next to TRUTH.")] = None,
    spacing: Annotated[Optional[str], typer.Option(help="Voxel size in mm per array axis for distances: PNG ROW,COL (default 1); "
                                                        "NIfTI default: the reference's header.")] = None,
    tolerance: Annotated[float, typer.Option(help="Normalised surface Dice tolerance in mm.")] = 1.0,
    overlays: Annotated[Optional[Path], typer.Option(
        help="Folder for PNG overlays (reference green, prediction magenta) of the worst cases.")] = None,
    worst: Annotated[int, typer.Option(help="Number of worst cases (by foreground Dice) to draw with --overlays.")] = 5,
    image_dir: Annotated[Optional[Path], typer.Option(
        help="Images to draw the overlays on (NAME or NAME_0000); default: the reference labels.")] = None,
    run: Annotated[Optional[Path], typer.Option(help="Run folder or checkpoint to take class names from.")] = None,
    jobs: Annotated[Optional[int], typer.Option(help="Worker processes for scoring cases (default: CPU cores, at most 4).")] = None,
    keep_empty: Annotated[bool, typer.Option("--keep-empty", help="Score a class absent from both masks as perfect (Dice 1, distances 0) "
                                                                  "instead of NaN excluded from means.")] = False,
    ignore_label: Annotated[Optional[int], typer.Option(help="Reference value of unlabelled voxels, never scored (default: the "
                                                             "'ignore' label of dataset.json in/next to TRUTH).")] = None,
    overwrite: OverwriteOpt = False,
    log_to: LogToOpt = None,
) -> None:
    """Score predictions against references: Dice, IoU, precision, recall, volume difference, HD, HD95, ASSD, NSD
    (distances in mm); or compare several runs with bootstrap confidence intervals and paired tests."""
    from unetcli.evaluation.scoring import default_jobs
    from unetcli.evaluation.stats import comparison_table
    from unetcli.evaluation.summary import summary_table
    from unetcli.workflows.eval import resolve_label_names, run_evaluation

    if truth is None:
        if len(paths) != 2:
            raise ConfigError(f"expected PRED TRUTH, got {len(paths)} path(s)",
                              hint="unet eval PRED TRUTH, or unet eval PRED_A PRED_B ... --truth TRUTH")
        preds, truth = [paths[0]], paths[1]
    else:
        preds = list(paths)
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs {jobs} must be at least 1")
    first = preds[0].resolve()
    out = out or (first.parent / "comparison_eval" if len(preds) > 1 else first.parent / f"{first.stem}_eval")
    names = resolve_label_names(label_names.split(",") if label_names else None, run, truth)
    outcome = run_evaluation(preds, truth, out, overlays=overlays, worst=worst, image_dir=image_dir, overwrite=overwrite,
                             labels=_ints(labels, "--labels"), label_names=names, regions=_regions(region),
                             spacing=_floats(spacing, "--spacing"), tolerance_mm=tolerance, keep_empty=keep_empty, jobs=jobs or default_jobs(),
                             progress=_progress(), ignore_label=ignore_label, trackers=_trackers(log_to) or [])
    if outcome.comparison is None:
        console.print(summary_table(outcome.results[0]))
        _print_quality(outcome.quality)
    else:
        console.print(comparison_table(outcome.comparison))
    console.print(f"wrote {len(outcome.written)} file(s) to {out}" + (f" and {overlays}" if overlays else ""))


def _print_quality(quality: Optional[dict[str, Any]]) -> None:
    """``unet eval`` of a folder with predictions.csv: how its quality estimates track the real Dice."""
    if quality is not None:
        from unetcli.evaluation.quality_fit import quality_table

        console.print(quality_table(quality))


@app.command(epilog=_examples("unet demo --out my-demo", "unet demo --time 10m      (longer)", "unet demo --3d"))
@handle_errors
def demo(
    out: Annotated[Optional[Path], typer.Option(help="Folder for the run, predictions and scores (default: unet-demo, or unet-demo-3d).")] = None,
    three_d: Annotated[bool, typer.Option("--3d", help="The 3D demo: a NIfTI U-Net on Colin27 lobes.")] = False,
    config: ConfigOpt = None,
    epochs: EpochsOpt = None,
    time_: Annotated[Optional[str], typer.Option("--time", metavar="DURATION", help=(
        "Training time (default: the demo's epochs or 150 s, whichever ends first; given alone, it "
        "replaces the epochs)."))] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    num_threads: ThreadsOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train on real MRI shipped with unetcli, predict held-out images, print their Dice: a few minutes on any 2-core CPU."""
    from unetcli.evaluation.summary import summary_table
    from unetcli.workflows.demo import DEMOS, run_demo

    kind = "3d" if three_d else "2d"
    out = out or Path("unet-demo-3d" if three_d else "unet-demo")
    cfg = ConfigSources(config, set_ or [], {"train.epochs": epochs, "train.time_limit": _duration(time_), "train.device": device,
                                             "train.precision": precision, "train.seed": seed, "train.num_threads": num_threads},
                        defaults=DEMOS[kind].overrides).resolve()
    result = run_demo(cfg, out, kind=kind, overwrite=overwrite, progress=_progress())
    console.print(summary_table(result.evaluation))
    dice = result.evaluation.summary["foreground_mean"]["dice"]  # type: ignore[index]
    console.print(f"held-out mean foreground Dice [bold]{dice:.4f}[/bold]; trained {result.train.seconds:.0f} s; "
                  f"everything is in {out}/ (config.yaml, checkpoints/, metrics.jsonl, curves.png, predictions/, eval/)")


@app.command(epilog=_examples("unet compare data/ --skip concat,add,none --seeds 3 --out study/   (data/ holds train/ and test/)",
                              "unet compare --demo --out study-demo"))
@handle_errors
def compare(
    data: Annotated[Optional[Path], typer.Argument(help="Training folder (as for `unet train`), or a folder with train/ and test/ "
                                                        "(test/images + test/masks), or nnU-Net with imagesTs/ + labelsTs/.",
                                                   show_default=False)] = None,
    skip: Annotated[str, typer.Option("--skip", help="Variants to compare: concat, add, none, valid-crop (concat skips with "
                                                     "unpadded convolutions, the paper's copy-and-crop).")] = "concat,add,none,valid-crop",
    seeds: Annotated[int, typer.Option(help="Seeds per variant: train.seed, train.seed+1, ... (the train/val split stays fixed).")] = 3,
    out: Annotated[Optional[Path], typer.Option(help="Study folder (default: compare_DATA-NAME, or unet-compare with --demo); "
                                                     "rerun the same command to continue an interrupted study.")] = None,
    test: Annotated[Optional[Path], typer.Option(help="Held-out cases: a folder with images/ + masks/ (or imagesTs/ + labelsTs/).")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Use the shipped 2D MRI demo data with a small budget (under 15 min on 2 CPU cores).")] = False,
    config: ConfigOpt = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="First seed (also the seed of the train/validation split).")] = None,
    num_threads: ThreadsOpt = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Train every run again, even if the folder holds a finished or different study.")] = False,
) -> None:
    """Compare skip connections (concat / add / none / valid-crop): train each variant with the same data, split, budget
    and seeds, predict and score the held-out cases; writes DIR/report.md with a table (Dice, HD95, NSD), charts and overlays."""
    from unetcli.evaluation.stats import comparison_table
    from unetcli.workflows.compare import DEMO_OVERRIDES, REPORT_METRICS, make_study, parse_variants, resolve_study_data, run_study

    variants = parse_variants(skip)
    study_data = resolve_study_data(data, test, demo)
    cfg = ConfigSources(config, set_ or [], {"train.epochs": epochs, "train.device": device, "train.precision": precision,
                                             "train.seed": seed, "train.num_threads": num_threads},
                        defaults=DEMO_OVERRIDES if demo else None).resolve()
    study = make_study(variants, seeds, cfg, study_data)
    out = out or (Path("unet-compare") if demo else Path(f"compare_{study_data.train.resolve().name}"))
    result = run_study(study, out, overwrite=overwrite, progress=_progress())
    console.print(comparison_table(result.comparison, metrics=REPORT_METRICS))
    console.print(f"{len(result.ran)} run(s) trained, {len(result.skipped)} finished earlier; report: {result.report}")


def main() -> None:
    app()
