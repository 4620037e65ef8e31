"""``unet predict``: read -> normalise -> sliding-window predict -> labels -> write, per image."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from unetcli.atomic import atomic_path
from unetcli.config import RunConfig, config_from_dict
from unetcli.data.dataset import load_image_channels
from unetcli.data.png import PNG_SUFFIX, write_png_mask
from unetcli.data.preprocessing import normalize_image
from unetcli.errors import CheckpointError, DataError, OutputError, UnetCliError
from unetcli.inference.sliding_window import sliding_window_predict
from unetcli.models import build_model
from unetcli.runtime import resolve_device, resolve_precision
from unetcli.training.checkpoint import load_checkpoint, resolve_checkpoint

log = logging.getLogger("unetcli")

_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")


@dataclass
class LoadedModel:
    model: nn.Module
    config: RunConfig
    metadata: dict[str, Any]
    checkpoint: Path


def load_trained_model(run: Path, device: torch.device, which: str = "best") -> LoadedModel:
    """Rebuild the network of a run folder (or checkpoint file) and load its weights."""
    path = resolve_checkpoint(run, which)
    state = load_checkpoint(path)
    try:
        cfg = config_from_dict(state["config"])
        model = build_model(cfg.model)
        model.load_state_dict(state["model"])
    except (UnetCliError, RuntimeError, KeyError, TypeError) as exc:
        msg = exc.message if isinstance(exc, UnetCliError) else str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the model described in the checkpoint ({msg[:200]})",
                              hint="the checkpoint may come from another model or unetcli version") from exc
    model.to(device).eval()
    return LoadedModel(model, cfg, state["metadata"], path)


def _group_inputs(input_path: Path, in_channels: int) -> dict[str, list[Path]]:
    """Case name -> channel files. ``NAME_0000.png``-style channel files are grouped (nnU-Net)."""
    if input_path.is_file():
        files = [input_path]
    elif input_path.is_dir():
        files = sorted(p for p in input_path.iterdir() if p.suffix.lower() == PNG_SUFFIX and not p.name.startswith("."))
        if not files:
            raise DataError(f"{input_path}: no .png images found", hint="pass a PNG file or a folder of PNG images")
    else:
        raise DataError(f"{input_path}: input not found")
    cases: dict[str, dict[int, Path]] = {}
    for path in files:
        match = _CHANNEL_SUFFIX.search(path.stem)
        # A _NNNN suffix names a channel file only for multi-channel models or as _0000 (nnU-Net).
        if match and (in_channels > 1 or match[1] == "0000"):
            name, channel = path.stem[: match.start()], int(match[1])
        else:
            name, channel = path.stem, 0
        if channel in cases.setdefault(name, {}):
            raise DataError(f"{path}: another input file also maps to case {name} (channel {channel})",
                            hint="give every case a unique name")
        cases[name][channel] = path
    for name, channels in cases.items():
        if sorted(channels) != list(range(in_channels)):
            raise DataError(f"{input_path}: case {name} has channel file(s) {sorted(channels)}, the model needs 0..{in_channels - 1}",
                            hint="name channel files NAME_0000.png, NAME_0001.png, ...")
    return {name: [channels[i] for i in range(in_channels)] for name, channels in sorted(cases.items())}


def check_output_folder(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to write into (or above) an input folder; refuse to replace files without ``overwrite``."""
    out = output.resolve()
    for inp in inputs:
        folder = inp.resolve() if inp.is_dir() else inp.resolve().parent
        if out == folder or folder in out.parents:
            raise OutputError(f"{output}: output folder is (inside) the input folder {inp}",
                              hint="write predictions to a separate folder; inputs are never overwritten")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a folder", hint="pass a folder for the predictions")


def predict(run: Path, input_path: Path, output: Path, device_name: str = "auto", precision_name: str | None = None,
            probabilities: bool = False, overwrite: bool = False, mirror: bool | None = None,
            progress: bool = True) -> list[Path]:
    """Write one mask per input image into ``output`` (same stem, input size); returns the paths."""
    device = resolve_device(device_name)
    loaded = load_trained_model(run, device)
    meta, cfg = loaded.metadata, loaded.config
    precision = resolve_precision(precision_name or cfg.train.precision, device)
    check_output_folder(output, [input_path], overwrite)
    cases = _group_inputs(input_path, meta["in_channels"])
    targets = {name: output / f"{name}.png" for name in cases}
    existing = [p for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]}: already exists ({len(existing)} prediction(s) would be replaced)",
                          hint="pass --overwrite to replace them, or choose another output folder")
    output.mkdir(parents=True, exist_ok=True)
    label_values = np.asarray(meta["label_values"])
    written = []
    for name, paths in tqdm(cases.items(), disable=not progress, unit="image", leave=False):
        image = load_image_channels(paths)
        if image.shape[0] != meta["in_channels"]:
            raise DataError(f"{paths[0]}: image has {image.shape[0]} channel(s) but the model was trained on {meta['in_channels']}",
                            hint="convert the image to the training data's colour mode")
        image = normalize_image(image, meta["normalization"])
        probs = sliding_window_predict(
            loaded.model, image, meta["patch_size"], meta["num_classes"], overlap=cfg.infer.overlap,
            window_batch_size=cfg.infer.window_batch_size, gaussian=cfg.infer.gaussian,
            mirror=cfg.infer.mirror if mirror is None else mirror, margin=getattr(loaded.model, "margin", 0),
            device=device, precision=precision,
        )
        labels = label_values[probs.argmax(0).numpy()]
        write_png_mask(labels, targets[name])
        if probabilities:
            with atomic_path(output / f"{name}_probabilities.npz") as tmp:
                with open(tmp, "wb") as handle:
                    np.savez_compressed(handle, probabilities=probs.numpy().astype(np.float16),
                                        label_names=np.asarray(meta["label_names"]))
        written.append(targets[name])
    log.info("wrote %d prediction(s) to %s", len(written), output)
    return written
