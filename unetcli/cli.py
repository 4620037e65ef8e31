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
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from unetcli import __version__
from unetcli.config import RunConfig, apply_overrides, load_config, parse_set_option
from unetcli.errors import ConfigError, OutputError, UnetCliError

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
            for line in exc.message.splitlines() or [exc.message]:
                err_console.print(f"[bold red]error:[/bold red] {line}", highlight=False, soft_wrap=True, markup=True)
            if exc.hint:
                err_console.print(f"[yellow]hint:[/yellow] {exc.hint}", highlight=False, soft_wrap=True)
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


app = typer.Typer(
    help="Train, apply and score U-Net segmentation models on 2D PNG images and 3D NIfTI MRI.\n\n"
    "Quick start: `unet demo` trains on real MRI slices shipped with the package, predicts held-out "
    "slices and scores them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
    log.handlers = [h for h in log.handlers if not isinstance(h, RichHandler)] + [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


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


def _resolve_config(config: Optional[Path], sets: Optional[list[str]], flags: dict[str, Any],
                    defaults: Optional[dict[str, Any]] = None) -> RunConfig:
    """Defaults < YAML file < --set < explicit flags."""
    cfg = load_config(config)
    if defaults and config is None:
        cfg = apply_overrides(cfg, defaults)
    overrides = dict(parse_set_option(item) for item in sets or [])
    overrides.update({k: v for k, v in flags.items() if v is not None})  # explicit flags win over --set
    return apply_overrides(cfg, overrides)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/png2d.yaml); flags override it.")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Epochs (each = train.iterations_per_epoch iterations + validation).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda.")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="auto | fp32 | bf16 | fp16. auto uses bf16 only where the hardware runs it natively.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed (split, sampling, initialisation).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Any config key: --set section.key=value (repeatable), e.g. --set model.features=[16,32,64,128].")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs instead of refusing.")]


@app.command(epilog="Example: unet train data/ --epochs 20 --out runs/tissue --set model.features=[16,32,64,128]")
@handle_errors
def train(
    data: Annotated[Path, typer.Argument(help="Folder with images/ + masks/ (PNG), or imagesTr/ + labelsTr/ (nnU-Net layout).")],
    config: ConfigOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder to create (default: runs/DATA-NAME_TIMESTAMP).")] = None,
    epochs: EpochsOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Patches per training step.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    patch_size: Annotated[Optional[str], typer.Option(help="Training patch per axis, e.g. 128,128 (default: whole images).")] = None,
    model_skip: Annotated[Optional[str], typer.Option(help="Skip connections: concat | add | none.")] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a U-Net on a folder of images + masks; writes config, checkpoints, metrics and curves to a run folder."""
    from unetcli.training.trainer import train as run_training

    cfg = _resolve_config(config, set_, {
        "train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr,
        "train.patch_size": _ints(patch_size, "--patch-size"), "model.skip": model_skip,
        "train.device": device, "train.precision": precision, "train.seed": seed,
    })
    out = out or Path("runs") / f"{data.resolve().name}_{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_training(data, cfg, out, overwrite=overwrite, progress=_progress())
    console.print(f"best validation Dice [bold]{result.best_dice:.4f}[/bold] at epoch {result.best_epoch}/{result.epochs} "
                  f"({result.seconds:.0f} s, {result.parameters:,} parameters); run folder: {out}")


@app.command(epilog="Example: unet predict runs/tissue scans/ predictions/")
@handle_errors
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder written by `unet train` (uses checkpoints/best.pt) or a .pt file.")],
    input: Annotated[Path, typer.Argument(help="An image file or a folder of images.")],
    output: Annotated[Path, typer.Argument(help="Folder for the masks (same names as the inputs); never an input folder.")],
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write NAME_probabilities.npz (float16, classes first).")] = False,
    mirror: Annotated[Optional[bool], typer.Option("--mirror/--no-mirror", help="Average over flipped inputs (slower, often better).")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a mask for every input image, at the input's size."""
    from unetcli.inference.predict import predict as run_predict

    written = run_predict(run, input, output, device_name=device or "auto", precision_name=precision,
                          probabilities=probabilities, overwrite=overwrite, mirror=mirror, progress=_progress())
    console.print(f"wrote {len(written)} mask(s) to {output}")


@app.command("eval", epilog="Example: unet eval predictions/ data/test/masks --out eval/ --labels 1,2")
@handle_errors
def eval_(
    pred: Annotated[Path, typer.Argument(help="Folder (or file) of predicted masks.")],
    truth: Annotated[Path, typer.Argument(help="Folder (or file) of reference masks, paired with PRED by file name.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for metrics.csv and summary.json (default: PRED_eval next to PRED).")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Labels to score, e.g. 1,2 (default: every non-zero label found).")] = None,
    label_names: Annotated[Optional[str], typer.Option(help="Class names in label order, e.g. background,gm,wm.")] = None,
    spacing: Annotated[Optional[str], typer.Option(help="Pixel size in mm per axis for distances, e.g. 0.5,0.5 (default 1).")] = None,
    tolerance: Annotated[float, typer.Option(help="Normalised surface Dice tolerance in mm.")] = 1.0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Score predictions against references: Dice, IoU, precision, recall, volume difference, HD, HD95, ASSD, NSD."""
    from unetcli.evaluation.report import evaluate, summary_table, write_reports
    from unetcli.inference.predict import check_output_folder

    out = out or pred.resolve().parent / f"{pred.resolve().stem}_eval"
    check_output_folder(out, [pred, truth], overwrite)
    if not overwrite and any((out / n).exists() for n in ("metrics.csv", "summary.json")):
        raise OutputError(f"{out}: already holds metrics.csv/summary.json", hint="pass --overwrite or another --out")
    result = evaluate(pred, truth, labels=_ints(labels, "--labels"),
                      label_names=label_names.split(",") if label_names else None,
                      spacing=_floats(spacing, "--spacing"), tolerance_mm=tolerance)
    csv_path, json_path = write_reports(result, out)
    console.print(summary_table(result))
    console.print(f"wrote {csv_path} and {json_path}")


@app.command(epilog="Example: unet demo --out my-demo --epochs 10")
@handle_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the run, predictions and scores.")] = Path("unet-demo"),
    config: ConfigOpt = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train on real MRI slices shipped with unetcli, predict held-out slices, print their Dice."""
    from unetcli.demo import DEMO_OVERRIDES, run_demo
    from unetcli.evaluation.report import summary_table

    cfg = _resolve_config(config, set_, {"train.epochs": epochs, "train.device": device,
                                          "train.precision": precision, "train.seed": seed}, defaults=DEMO_OVERRIDES)
    result = run_demo(cfg, out, overwrite=overwrite, progress=_progress())
    console.print(summary_table(result.evaluation))
    dice = result.evaluation.summary["foreground_mean"]["dice"]  # type: ignore[index]
    console.print(f"held-out mean foreground Dice [bold]{dice:.4f}[/bold]; trained {result.train.seconds:.0f} s; "
                  f"everything is in {out}/ (config.yaml, checkpoints/, metrics.jsonl, curves.png, predictions/, eval/)")


def main() -> None:
    app()
