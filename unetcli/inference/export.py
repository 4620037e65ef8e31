"""``unet export``: a run's network (BatchNorm folded) as ONNX or TorchScript, with everything
``predict`` needs embedded in the file (see :mod:`unetcli.inference.exported`).

Both formats take any batch size; a ``same``-padded network also takes any spatial size its
strides divide (the sliding window feeds it patches of the run's patch size). A ``valid``-padded
network crops its skips by offsets fixed at export, so its spatial size is fixed to the patch size.
Before the file appears, the exported network is run on a random patch and compared with the
PyTorch network it came from; a file that disagrees is never written.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from unetcli.atomic import atomic_path, ensure_writable_folder
from unetcli.config import config_to_dict
from unetcli.errors import ConfigError, ModelError, OutputError
from unetcli.inference.exported import (INPUT_NAME, INSTALL_HINT, METADATA_KEY, OUTPUT_NAME, TORCHSCRIPT_EXTRA,
                                        document_to_json, export_document, is_exported_model, load_exported)
from unetcli.inference.predict import LoadedModel, load_model

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
"""Export formats and the suffix of their default file name."""
TOLERANCE = 1e-3
"""Largest |exported - PyTorch| logit accepted, relative to the largest logit (float32 reorderings give ~1e-6)."""


@dataclass
class ExportResult:
    path: Path
    model_format: str
    checkpoint: Path
    size_bytes: int
    max_difference: float
    """Largest |logit| difference between the exported and the PyTorch network on a random patch."""
    dynamic_spatial: bool


def resolve_format(model_format: str | None, out: Path | None) -> str:
    """``--format``, else the one ``--out``'s suffix names (.onnx, or .pt / .pth / .ts for TorchScript),
    else ONNX; another suffix names no format and is refused rather than guessed."""
    if model_format is None:
        suffix = out.suffix.lower() if out is not None else ".onnx"
        if suffix in TORCHSCRIPT_SUFFIXES:
            return "torchscript"
        if suffix != ".onnx":
            raise ConfigError(f"--out {out}: the suffix '{out.suffix}' names no export format (.onnx for ONNX; .pt, .pth or .ts "  # type: ignore[union-attr]
                              "for TorchScript)", hint="pass --format onnx or --format torchscript, or use one of these suffixes")
        return "onnx"
    fmt = model_format.lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--format {model_format} is not an export format", hint=f"choose one of: {', '.join(FORMATS)}")
    return fmt


def check_output(out: Path, fmt: str, checkpoint: Path, overwrite: bool) -> None:
    """The file must not be the checkpoint itself, must carry a suffix ``predict`` recognises, and is
    only replaced with ``overwrite``."""
    if out.resolve() == checkpoint.resolve():
        raise OutputError(f"{out}: is the checkpoint being exported", hint="choose another --out; inputs are never overwritten")
    is_onnx = out.suffix.lower() == ".onnx"
    if (fmt == "onnx") != is_onnx:
        wanted = "end in .onnx" if fmt == "onnx" else "not end in .onnx (e.g. .pt)"
        raise OutputError(f"{out}: a {fmt} export must {wanted}; unet predict recognises ONNX files by that suffix",
                          hint=f"e.g. --out {out.with_suffix(FORMATS[fmt]).name}")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder", hint=f"pass a file name, e.g. --out {out / ('model' + FORMATS[fmt])}")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists", hint="pass --overwrite to replace it, or choose another --out")
    if out.exists() and not is_exported_model(out):
        # --overwrite replaces an earlier export only: never a checkpoint a run needs, an image or a config.
        raise OutputError(f"{out}: exists and is not a file written by unet export; not replacing it, even with --overwrite",
                          hint="choose another --out")
    ensure_writable_folder(out.parent, "output folder", hint="choose a writable --out location")


def _example_input(loaded: LoadedModel) -> torch.Tensor:
    """Two patches of the run's patch size: two, so that no exporter takes the batch size for a constant."""
    meta = loaded.metadata
    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, int(meta["in_channels"]), *[int(s) for s in meta["patch_size"]]), generator=generator)


def _traced(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # The size checks in forward() run in Python at trace time; the tracer warns that they are not recorded.
        warnings.simplefilter("ignore")
        # check_trace would trace a second time to compare graphs; _verify compares outputs instead.
        return torch.jit.trace(model, example, check_trace=False)


def _write_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, text: str, dynamic_spatial: bool) -> None:
    # Into memory first: torch.jit.save writing to a full disk aborts the process from C++;
    # a Python write raises OSError, which the atomic write turns into one clear error.
    buffer = io.BytesIO()
    torch.jit.save(_traced(model, example), buffer, _extra_files={TORCHSCRIPT_EXTRA: text})
    path.write_bytes(buffer.getvalue())


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, text: str, dynamic_spatial: bool) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise ConfigError("exporting to ONNX needs the onnx package, which is not installed", hint=INSTALL_HINT) from exc
    spatial = range(2, example.ndim) if dynamic_spatial else ()
    axes = {0: "batch", **{axis: f"size{axis - 2}" for axis in spatial}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about the Python size checks, and exporter notices
        # The TorchScript-based exporter: it needs neither onnxscript nor symbolic shapes in forward().
        buffer = io.BytesIO()  # into memory first, like TorchScript: the file is written by Python only
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: dict(axes)})
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {METADATA_KEY: text})
    proto.doc_string = "unetcli U-Net: input N, C, *spatial (normalised as in metadata 'unetcli'), output class logits"
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())


def _verify(path: Path, model: torch.nn.Module, example: torch.Tensor) -> float:
    """Max |logit| difference between the file just written and ``model``, refusing a file that disagrees."""
    exported = load_exported(path, torch.device("cpu")).network
    with torch.no_grad():
        expected = model(example)
        difference = float((exported(example) - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if not difference <= TOLERANCE * scale:
        raise ModelError(f"the exported network disagrees with the PyTorch network (max |logit difference| {difference:.3g})",
                         hint="nothing was written; please report this with the run's config.yaml")
    return difference


def default_output(run: Path, fmt: str) -> Path:
    return (run if run.is_dir() else run.parent) / f"model{FORMATS[fmt]}"


def export_run(run: Path, out: Path | None = None, model_format: str | None = None, overwrite: bool = False,
               which: str | None = None) -> ExportResult:
    """Write ``run``'s network (a run folder's ``checkpoints/{which}.pt``, default best, or a checkpoint file) to
    ``out`` as ONNX or TorchScript, with the run's config and metadata embedded; returns what was written.
    A ``unet cv`` folder is exported as the ensemble of its folds, with the postprocessing it chose."""
    run = Path(run)
    if is_exported_model(run):
        raise ConfigError(f"{run}: is already an exported model", hint="export from the run folder or its checkpoint")
    fmt = resolve_format(model_format, out)
    loaded = load_model(run, torch.device("cpu"), which)  # a `unet cv` folder exports the ensemble of its folds
    out = Path(out) if out is not None else default_output(run, fmt)
    check_output(out, fmt, loaded.checkpoint, overwrite)
    model = loaded.model.to(memory_format=torch.contiguous_format)  # exporters trace plain layouts
    dynamic_spatial = not any(model.margin)
    metadata = dict(loaded.metadata)
    if loaded.postprocessing is not None and loaded.postprocessing.active:
        metadata["postprocessing"] = loaded.postprocessing.to_dict()
    document = export_document(config_to_dict(loaded.config), metadata, model.margin, fmt, loaded.checkpoint.name)
    example = _example_input(loaded)
    writer = _write_onnx if fmt == "onnx" else _write_torchscript
    with atomic_path(out) as tmp:
        writer(model, example, tmp, document_to_json(document), dynamic_spatial)
        difference = _verify(tmp, model, example)
    return ExportResult(out, fmt, loaded.checkpoint, out.stat().st_size, difference, dynamic_spatial)
