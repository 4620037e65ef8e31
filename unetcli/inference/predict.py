"""``unet predict``: read -> normalise -> sliding-window predict -> labels -> write, per image."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from unetcli.atomic import atomic_path, ensure_writable_folder, real_path
from unetcli.config import RunConfig, config_from_dict
from unetcli.data.dicom import find_dicom_series, is_dicom_file, series_case_names
from unetcli.data.image_io import VolumeSource, check_output_format, is_volume, output_suffix, volume_stem
from unetcli.data.nifti import ImageProperties, read_image, write_segmentation
from unetcli.data.png import PNG_SUFFIX, write_png_mask
from unetcli.data.png_dataset import load_image_channels
from unetcli.data.volumes import VolumeGeometry, preprocess, restore_label_map, restore_labels, restore_probabilities
from unetcli.data.preprocessing import normalize_image
from unetcli.data.scan_geometry import image_geometry, nifti_geometry
from unetcli.errors import CheckpointError, ConfigError, DataError, OutputError, UnetCliError
from unetcli.inference.ensemble import EnsembleNetwork, cv_fold_runs, read_postprocessing
from unetcli.inference.pipeline import run_cases
from unetcli.inference.exported import ExportedNetwork, is_exported_model, load_exported
from unetcli.inference.postprocessing import Postprocessing, apply_postprocessing
from unetcli.inference.quality_context import quality_context
from unetcli.inference.quality_report import CaseQuality, QualityReport, csv_name
from unetcli.inference.sliding_window import paint_regions, sliding_window_predict
from unetcli.models import SegmentationNetwork, build_model, fold_batch_norm
from unetcli.runtime import configure_cpu_allocator, memory_format, resolve_channels_last, resolve_device, resolve_precision
from unetcli.checkpoint import load_checkpoint, resolve_checkpoint, state_dict_problem

log = logging.getLogger("unetcli")

_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")


@dataclass
class LoadedModel:
    model: SegmentationNetwork | ExportedNetwork | EnsembleNetwork
    config: RunConfig
    metadata: dict[str, Any]
    checkpoint: Path
    postprocessing: Postprocessing | None = None
    finished: bool = True
    """False for a checkpoint of a run stopped before its last epoch (``last.pt`` of a killed run)."""


def load_trained_model(run: Path, device: torch.device, which: str = "best") -> LoadedModel:
    """Rebuild the network of a run folder (or checkpoint file) and load its weights."""
    path = resolve_checkpoint(run, which)
    state = load_checkpoint(path)
    try:
        cfg = config_from_dict(state["config"])
        model = build_model(cfg.model)
        model.load_state_dict(state["model"])
    except (UnetCliError, RuntimeError, KeyError, TypeError) as exc:
        msg = exc.message if isinstance(exc, UnetCliError) else state_dict_problem(exc)
        raise CheckpointError(f"{path}: weights do not fit the model described in the checkpoint ({msg[:200]})",
                              hint="the checkpoint may come from another model or unetcli version") from exc
    check_metadata(path, state.get("metadata"), cfg)
    model = fold_batch_norm(model.eval())
    model.to(device, memory_format=memory_format(cfg.model.spatial_dims, resolve_channels_last(cfg.train.channels_last, device)))
    resume = state.get("resume")
    finished = not isinstance(resume, dict) or bool(resume.get("finished", True))
    return LoadedModel(model, cfg, state["metadata"], path, finished=finished)


def check_metadata(path: Path, meta: Any, cfg: RunConfig) -> None:
    """A checkpoint's metadata (what predict reads: classes, channels, axes, label values) must
    describe its network; a disagreement would write wrong masks without an error."""
    hint = "the checkpoint's metadata and network do not belong together; use the run's own checkpoint or train again"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the checkpoint has no metadata", hint=hint)
    outputs = meta.get("num_classes")
    pairs = (("num_classes", outputs, cfg.model.out_channels), ("in_channels", meta.get("in_channels"), cfg.model.in_channels),
             ("spatial_dims", meta.get("spatial_dims"), cfg.model.spatial_dims))
    differs = [f"{key} {stored!r} but the network has {built!r}" for key, stored, built in pairs if stored != built]
    values = meta.get("label_values")
    needed = (outputs + 1 if meta.get("regions") else outputs) if isinstance(outputs, int) else None
    if needed is not None and (not isinstance(values, list) or len(values) < needed):
        differs.append(f"label_values {values!r} for {outputs} output(s)")
    if differs:
        raise CheckpointError(f"{path}: metadata disagrees with the network ({'; '.join(differs)})", hint=hint)


ENSEMBLE_KEYS = ("spatial_dims", "in_channels", "num_classes", "label_values", "label_names", "normalization", "patch_size",
                 "file_format", "preprocessing", "regions")
"""What every member of an ensemble must share: they see the same windows of the same preprocessed input."""


def check_ensemble(sources: Sequence[Path], members: Sequence[LoadedModel], keys: Sequence[str], hint: str) -> None:
    """Refuse, naming the first misfit, models that differ from the first in any of ``keys``."""
    for source, member in zip(sources[1:], members[1:]):
        differs = [k for k in keys if member.metadata.get(k) != members[0].metadata.get(k)]
        if differs:
            raise CheckpointError(f"{source}: cannot be ensembled with {sources[0]} (they differ in {', '.join(differs)})",
                                  hint=hint)


def load_ensemble(folder: Path, runs: list[Path], device: torch.device, which: str = "best") -> LoadedModel:
    """The runs of a cross-validation folder as one model (see :class:`EnsembleNetwork`), with the
    postprocessing ``unet cv`` chose (``postprocessing.json``)."""
    members = [load_trained_model(run, device, which) for run in runs]
    unfinished = [run.name for run, member in zip(runs, members) if not member.finished]
    if unfinished:
        raise CheckpointError(f"{folder}: fold(s) {', '.join(unfinished)} stopped before the last epoch (their last.pt is "
                              "a checkpoint of an unfinished training)",
                              hint=f"finish the cross-validation first: rerun the same `unet cv` command with --out {folder}")
    first = members[0]
    check_ensemble(runs, members, ENSEMBLE_KEYS, "ensemble runs trained with the same configuration on the same data")
    choice = read_postprocessing(folder)
    post = Postprocessing.from_dict(choice) if choice is not None else None
    if post is not None and any(c >= int(first.metadata["num_classes"]) for c in post.classes):
        raise CheckpointError(f"{folder / 'postprocessing.json'}: names class(es) {post.classes}, the models have "
                              f"{first.metadata['num_classes']}", hint="rerun `unet cv` to choose the postprocessing again")
    ensemble = EnsembleNetwork([m.model for m in members], output_activation(first.metadata))  # type: ignore[misc]
    log.info("ensemble of %d models from %s%s", len(members), folder,
             f"; postprocessing {post.to_dict()}" if post and post.active else "")
    return LoadedModel(ensemble, first.config, first.metadata, folder, post)


def load_model(source: Path, device: torch.device, which: str | None = None, folds: Sequence[int] | None = None) -> LoadedModel:
    """A run folder or checkpoint (PyTorch), a cross-validation folder written by ``unet cv`` (the
    ensemble of its folds, or of ``folds``), or a file written by ``unet export`` (ONNX, TorchScript).

    ``which`` (``best`` / ``last``) picks the checkpoint of a run folder (default ``best``) or of every
    fold (default ``last``: "best" was picked on the very cases the folds held out)."""
    runs = cv_fold_runs(Path(source), folds)
    if runs is not None:
        return load_ensemble(Path(source), runs, device, which or "last")
    if is_exported_model(Path(source)):
        exported = load_exported(Path(source), device)
        post = exported.metadata.get("postprocessing")
        return LoadedModel(exported.network, exported.config, exported.metadata, Path(source),
                           Postprocessing.from_dict(post) if post else None)
    return load_trained_model(source, device, which or "best")


def resolve_model_precision(loaded: LoadedModel, requested: str | None, device: torch.device) -> str:
    """The run's precision (or ``requested``); a backend that runs one precision only refuses any other."""
    fixed = getattr(loaded.model, "fixed_precision", None)
    if fixed is None:
        return resolve_precision(requested or loaded.config.train.precision, device)
    if requested not in (None, "auto", fixed):
        raise ConfigError(f"{loaded.checkpoint}: this exported model runs in {fixed} only, not {requested}",
                          hint=f"leave --precision out (or pass --precision {fixed}); predict from the run folder for {requested}")
    return fixed


def _input_files(input_path: Path, file_format: str) -> list[Path]:
    wanted = is_volume if file_format == "nifti" else (lambda p: p.suffix.lower() == PNG_SUFFIX)
    kind = "3D volume (.nii.gz, .nii, .mha, .mhd, .nrrd, .tif)" if file_format == "nifti" else ".png"
    if input_path.is_file():
        if not wanted(input_path):
            hint = "pass the folder holding the DICOM series" if is_dicom_file(input_path) and file_format == "nifti" else \
                f"pass {kind} input (a {'3D volume' if file_format == 'nifti' else '2D image'})"
            raise DataError(f"{input_path}: the model was trained on {kind} files, this is not one", hint=hint)
        return [input_path]
    if input_path.is_symlink() and not input_path.exists():
        raise DataError(f"{input_path}: is a broken or looping symbolic link", hint="pass an image file or a folder of images")
    if not input_path.is_dir():
        raise DataError(f"{input_path}: input not found")
    files = sorted(p for p in input_path.iterdir() if wanted(p) and not p.name.startswith("."))
    if not files:
        raise DataError(f"{input_path}: no {kind} files found",
                        hint=f"pass a {kind} file or a folder of them" + (" (or of DICOM series)" if file_format == "nifti" else ""))
    return files


def _dicom_cases(input_path: Path, file_format: str) -> dict[str, list[VolumeSource]] | None:
    """Case name -> [series] when ``input_path`` is a folder of DICOM series (and no volume files), else None."""
    if file_format != "nifti" or not input_path.is_dir() or any(is_volume(p) for p in input_path.iterdir()):
        return None
    series = find_dicom_series(input_path)
    if not series:
        return None
    log.info("%s: %d DICOM series", input_path, len(series))
    return {name: [item] for name, item in sorted(series_case_names(series, input_path).items())}


def _group_inputs(input_path: Path, in_channels: int, file_format: str = "png") -> dict[str, list[VolumeSource]]:
    """Case name -> channel files. ``NAME_0000.ext``-style channel files are grouped (nnU-Net);
    a volume file without such a suffix may hold every channel (Decathlon 4D). A folder of DICOM
    files gives one case per series."""
    dicom = _dicom_cases(input_path, file_format)
    if dicom is not None:
        return dicom
    stem = volume_stem if file_format == "nifti" else (lambda p: Path(p).stem)
    cases: dict[str, dict[int, Path]] = {}
    for path in _input_files(input_path, file_format):
        match = _CHANNEL_SUFFIX.search(stem(path))
        # A _NNNN suffix names a channel file only for multi-channel models or as _0000 (nnU-Net).
        if match and (in_channels > 1 or match[1] == "0000"):
            name, channel = stem(path)[: match.start()], int(match[1])
        else:
            name, channel = stem(path), -1  # one file holding the whole case
        if channel in cases.setdefault(name, {}) or (cases[name] and (channel == -1) != (-1 in cases[name])):
            raise DataError(f"{path}: another input file also maps to case {name}", hint="give every case a unique name")
        cases[name][channel] = path
    for name, channels in cases.items():
        if -1 not in channels and sorted(channels) != list(range(in_channels)):
            raise DataError(f"{input_path}: case {name} has channel file(s) {sorted(channels)}, the model needs 0..{in_channels - 1}",
                            hint="name channel files NAME_0000.ext, NAME_0001.ext, ...")
    return {name: [channels[c] for c in sorted(channels)] for name, channels in sorted(cases.items())}


def output_targets(cases: dict[str, list[VolumeSource]], output: Path, file_format: str,
                   output_format: str | None) -> dict[str, Path]:
    """Where each case's mask goes: ``OUTPUT/NAME.png`` for a 2D model; for volumes ``OUTPUT/NAME`` plus the
    input's own format, or ``output_format`` (a DICOM series: NIfTI unless asked otherwise)."""
    if file_format != "nifti":
        if output_format:
            raise ConfigError("--output-format is for 3D volumes; a 2D model writes PNG masks",
                              hint="leave --output-format out")
        return {name: output / f"{name}{PNG_SUFFIX}" for name in cases}
    return {name: output / f"{name}{output_suffix(paths[0], output_format)}" for name, paths in cases.items()}


def check_output_folder(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to write into (or above) an input folder; refuse to replace files without ``overwrite``."""
    out = real_path(output)
    if output.is_symlink() and not output.exists():
        raise OutputError(f"{output}: is a broken or looping symbolic link", hint="pass a folder for the predictions")
    for inp in inputs:
        # A folder input may not contain the output (predictions would become inputs next time);
        # a file input only may not share its folder with the output (same name, same place).
        folder = real_path(inp) if inp.is_dir() else real_path(inp).parent
        if out == folder or (inp.is_dir() and folder in out.parents):
            raise OutputError(f"{output}: output folder is (inside) the input folder {inp}",
                              hint="write predictions to a separate folder; inputs are never overwritten")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a folder", hint="pass a folder for the predictions")


def _check_channels(image: np.ndarray, path: Path, meta: dict[str, Any]) -> None:
    if image.shape[0] != meta["in_channels"]:
        raise DataError(f"{path}: image has {image.shape[0]} channel(s) but the model was trained on {meta['in_channels']}",
                        hint="give the same channels (modalities / colour mode) as the training data")


def window_settings(loaded: LoadedModel, device: torch.device, precision: str, mirror: bool | None) -> dict[str, Any]:
    infer = loaded.config.infer
    return {"overlap": infer.overlap, "window_batch_size": infer.windows_per_batch(loaded.config.model.spatial_dims),
            "gaussian": infer.gaussian,
            "mirror": infer.mirror if mirror is None else mirror, "margin": loaded.model.margin,
            "device": device, "precision": precision, "activation": output_activation(loaded.metadata)}


def output_activation(meta: dict[str, Any]) -> str:
    """``sigmoid`` for a region model (one probability per region), else ``softmax``."""
    return "sigmoid" if meta.get("regions") else "softmax"


def probability_names(meta: dict[str, Any]) -> list[str]:
    """The name of each probability channel: the classes, or the regions (no background channel)."""
    return list(meta["label_names"][1:] if meta.get("regions") else meta["label_names"])


@dataclass
class CaseSteps:
    """Predicting one case in three steps, so that reading the next case and writing the previous one can
    overlap the network (:func:`unetcli.inference.pipeline.run_cases`): ``read`` (files -> network input),
    ``compute`` (the network), ``write`` (back to the file's grid, postprocessing, the mask file; returns
    the probabilities to keep, or None)."""

    read: Callable[[list[VolumeSource]], Any]
    compute: Callable[[Any, CaseQuality | None], Any]
    write: Callable[[Any, Path, CaseQuality | None], np.ndarray | None]
    """``compute`` and ``write`` also report to the case's quality check, when there is one."""

    def run(self, paths: list[VolumeSource], target: Path, quality: CaseQuality | None = None) -> np.ndarray | None:
        return self.write(self.compute(self.read(paths), quality), target, quality)


def png_steps(loaded: LoadedModel, window: dict[str, Any], keep_probabilities: bool = False) -> CaseSteps:
    """One 2D image -> mask PNG at the image's size (values in the training masks' encoding)."""
    meta = loaded.metadata

    def read(paths: list[VolumeSource]) -> np.ndarray:
        image = load_image_channels(paths)  # type: ignore[arg-type]
        _check_channels(image, paths[0], meta)  # type: ignore[arg-type]
        return normalize_image(image, meta["normalization"], meta.get("foreground_mask", "nonzero"))

    def compute(image: np.ndarray, quality: CaseQuality | None) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {"confidence": quality.confidence} if quality is not None else {}
        probs = sliding_window_predict(loaded.model, image, meta["patch_size"], meta["num_classes"], **window, **extra)
        labels = paint_regions(probs) if meta.get("regions") else probs.argmax(0)
        if quality is not None:
            quality.observe_network(image, labels, image_geometry(image.shape[1:]))
        return probs, labels

    def write(computed: tuple[torch.Tensor, torch.Tensor], target: Path, quality: CaseQuality | None) -> np.ndarray | None:
        probs, labels = computed
        labels = apply_postprocessing(labels.numpy(), loaded.postprocessing)
        write_png_mask(np.asarray(meta["label_values"])[labels], target)
        if quality is not None:
            quality.observe_output(labels)
        return probs.numpy() if keep_probabilities else None

    return CaseSteps(read, compute, write)


def predict_png(loaded: LoadedModel, paths: list[Path], target: Path, window: dict[str, Any],
                keep_probabilities: bool = False) -> np.ndarray | None:
    """One 2D image -> mask PNG (see :func:`png_steps`)."""
    return png_steps(loaded, window, keep_probabilities).run(paths, target)  # type: ignore[arg-type]


def _network_grid_prediction(loaded: LoadedModel, image_pp: np.ndarray, window: dict[str, Any], output: str) -> np.ndarray:
    """Probabilities (K, *grid) or labels (*grid) of a preprocessed volume on the network grid:
    3D windows, or slice by slice for a 2D-on-3D model."""
    meta = loaded.metadata

    def run(volume: np.ndarray) -> np.ndarray:
        return sliding_window_predict(loaded.model, volume, meta["patch_size"], meta["num_classes"],
                                      output=output, **window).numpy()

    if meta["spatial_dims"] == 3:
        return run(image_pp)
    axis = int(meta["preprocessing"]["slice_axis"])  # 2D-on-3D: slices along the training axis, stacked back
    slices = [run(np.ascontiguousarray(np.take(image_pp, z, axis=axis + 1))) for z in range(image_pp.shape[axis + 1])]
    return np.stack(slices, axis=axis + 1 if output == "probabilities" else axis)


OnGrid = tuple[np.ndarray, ImageProperties, VolumeGeometry]
"""A volume on the network grid (preprocessed image, or prediction) with what maps it back to its file."""


def volume_steps(loaded: LoadedModel, window: dict[str, Any], keep_probabilities: bool = False) -> CaseSteps:
    """One 3D case -> label map with the input's shape and geometry, in the format of the target's name.

    The volume is preprocessed as in training (RAS, crop, resample, normalise), predicted on the
    network grid (3D windows, or slice by slice for a 2D-on-3D model) and mapped back. Without
    ``keep_probabilities`` the labels go back to the file's grid class by class (each class's
    indicator resampled linearly, the largest wins: nnU-Net's segmentation resampling), so memory
    holds two volumes whatever the number of classes; with it, class probabilities are resampled
    one class at a time (smoother boundaries, K x the memory).
    """
    meta = loaded.metadata

    def read(paths: list[VolumeSource]) -> OnGrid:
        image, props = read_image(paths)
        _check_channels(image, paths[0], meta)
        image_pp, _, geometry = preprocess(image, props, meta["preprocessing"])
        return image_pp, props, geometry

    def compute(prepared: OnGrid, quality: CaseQuality | None) -> OnGrid:
        image_pp, props, geometry = prepared
        extra = {"confidence": quality.confidence} if quality is not None else {}
        pred = _network_grid_prediction(loaded, image_pp, {**window, **extra}, "probabilities" if keep_probabilities else "labels")
        if quality is not None:
            quality.observe_network(image_pp, pred, nifti_geometry(props.affine, props.original_shape))
        return pred, props, geometry

    def write(computed: OnGrid, target: Path, quality: CaseQuality | None) -> np.ndarray | None:
        pred, props, geometry = computed
        if keep_probabilities:
            labels = restore_labels(pred, props, geometry, regions=bool(meta.get("regions")))
        else:
            labels = restore_label_map(pred, props, geometry)
        labels = apply_postprocessing(labels, loaded.postprocessing)
        write_segmentation(np.asarray(meta["label_values"])[labels], props, target)
        if quality is not None:
            quality.observe_output(labels, props.spacing)
        return pred if keep_probabilities else None

    return CaseSteps(read, compute, write)


def predict_volume(loaded: LoadedModel, paths: list[VolumeSource], target: Path, window: dict[str, Any],
                   keep_probabilities: bool = False) -> np.ndarray | None:
    """One 3D case -> label map with the input's shape and geometry (see :func:`volume_steps`)."""
    return volume_steps(loaded, window, keep_probabilities).run(paths, target)


def mixed_steps(members: list[LoadedModel], windows: list[dict[str, Any]]) -> CaseSteps:
    """One case with models of different configurations (e.g. ``2d`` and ``3d_fullres``): each
    predicts through its own preprocessing and window, its probabilities are mapped onto the
    file's grid, and their mean gives the labels (what nnU-Net's ensembling of configurations does)."""
    meta = members[0].metadata
    volumes = meta.get("file_format", "png") != "png"

    def read(paths: list[VolumeSource]) -> tuple[np.ndarray, ImageProperties | None]:
        image, props = read_image(paths) if volumes else (load_image_channels(paths), None)  # type: ignore[arg-type]
        _check_channels(image, paths[0], meta)  # type: ignore[arg-type]
        return image, props

    def member_probabilities(member: LoadedModel, window: dict[str, Any], image: np.ndarray,
                             props: ImageProperties | None) -> np.ndarray:
        if props is None:
            image = normalize_image(image, member.metadata["normalization"], member.metadata.get("foreground_mask", "nonzero"))
            return sliding_window_predict(member.model, image, member.metadata["patch_size"], meta["num_classes"], **window).numpy()
        image_pp, _, geometry = preprocess(image, props, member.metadata["preprocessing"])
        return restore_probabilities(_network_grid_prediction(member, image_pp, window, "probabilities"), props,
                                     geometry, regions=bool(meta.get("regions")))

    def compute(prepared: tuple[np.ndarray, ImageProperties | None],
                quality: CaseQuality | None) -> tuple[np.ndarray, ImageProperties | None]:
        image, props = prepared
        total = sum(member_probabilities(m, w, image, props) for m, w in zip(members, windows))
        mean = torch.from_numpy(total / len(members))  # type: ignore[operator]
        labels = (paint_regions(mean) if meta.get("regions") else mean.argmax(0)).numpy()
        if quality is not None:  # the mean probabilities and the labels (no single network input to compare)
            quality.confidence.add(mean)
        return labels, props

    def write(computed: tuple[np.ndarray, ImageProperties | None], target: Path, quality: CaseQuality | None) -> None:
        labels, props = computed
        values = np.asarray(meta["label_values"])[labels]
        write_png_mask(values, target) if props is None else write_segmentation(values, props, target)
        if quality is not None:
            quality.observe_output(labels, None if props is None else props.spacing)

    return CaseSteps(read, compute, write)


def predict_mixed(members: list[LoadedModel], paths: list[VolumeSource], target: Path, windows: list[dict[str, Any]]) -> None:
    """One case with models of different configurations (see :func:`mixed_steps`)."""
    mixed_steps(members, windows).run(paths, target)


MIXED_KEYS = ("in_channels", "num_classes", "label_values", "label_names", "file_format", "regions")
"""What models of different configurations must share to be averaged on the file's grid."""


def combine_models(sources: list[Path], members: list[LoadedModel]) -> LoadedModel | list[LoadedModel]:
    """Several models as one: inside the sliding window when they see the same windows of the same
    preprocessed input (:class:`EnsembleNetwork`), else a list for :func:`predict_mixed`."""
    first = members[0]
    check_ensemble(sources, members, MIXED_KEYS, "ensemble models of the same classes trained on the same kind of data")
    if all(m.metadata.get(k) == first.metadata.get(k) for m in members for k in ENSEMBLE_KEYS):
        ensemble = EnsembleNetwork([m.model for m in members], output_activation(first.metadata))  # type: ignore[misc]
        return LoadedModel(ensemble, first.config, first.metadata, sources[0])
    log.info("ensemble of %d models of different configurations: averaging on each file's grid", len(members))
    return members


def _case_steps(loaded: LoadedModel | list[LoadedModel], device: torch.device, precision_name: str | None,
                mirror: bool | None, probabilities: bool) -> CaseSteps:
    """How one case is predicted and written: one model (or same-grid ensemble), or mixed configurations."""
    if isinstance(loaded, list):
        if probabilities:
            raise ConfigError("--probabilities is not available for models of different configurations (they are "
                              "averaged on each file's grid, not on one network grid)",
                              hint="ask for probabilities from one configuration's run or cv folder")
        windows = [window_settings(m, device, resolve_model_precision(m, precision_name, device), mirror) for m in loaded]
        return mixed_steps(loaded, windows)
    window = window_settings(loaded, device, resolve_model_precision(loaded, precision_name, device), mirror)
    steps = volume_steps if loaded.metadata.get("file_format", "png") == "nifti" else png_steps
    return steps(loaded, window, keep_probabilities=probabilities)


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (1-based) -> (I, N): this process's share of the cases when N processes share them."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--part '{text}' is not of the form I/N", hint="e.g. --part 2/3 (the second of three shares)") from None
    if not 1 <= index <= count:
        raise ConfigError(f"--part {text}: I must be between 1 and N", hint=f"the shares of {count} are 1/{count} .. {count}/{count}")
    return index, count


def select_cases(cases: dict[str, list[Path]], outputs: dict[str, list[Path]], part: tuple[int, int] | None,
                 resume: bool) -> dict[str, list[Path]]:
    """The cases this call predicts: share ``I/N`` of them (every N-th case by sorted name, starting at
    the I-th, so N calls cover each case exactly once), less, with ``resume``, those whose output
    exists (outputs are written atomically, so an existing file is a complete one)."""
    names = sorted(cases)
    if part is not None:
        index, count = part
        names = names[index - 1::count]
    if resume:
        done = {n for n in names if all(p.exists() for p in outputs[n])}
        if done:
            log.info("--continue: %d of %d case(s) already predicted, %d to go", len(done), len(names), len(names) - len(done))
        names = [n for n in names if n not in done]
    return {n: cases[n] for n in names}


def _predict_cases(cases: dict[str, list[VolumeSource]], targets: dict[str, Path], steps: CaseSteps, output: Path,
                   class_names: list[str], progress: bool, overlap: bool, report: QualityReport | None) -> list[Path]:
    """Predict and write every case in order (reading ahead and writing behind with ``overlap``); the masks
    written. With a ``report``, every case's quality row is added once its mask is written."""
    names = list(cases)
    # Each case carries its quality collector and the seconds its own steps took (not the queue waits).
    Case = tuple[Any, CaseQuality | None, float]

    def read(paths: list[VolumeSource]) -> Case:
        start = time.perf_counter()
        return steps.read(paths), report.case() if report is not None else None, time.perf_counter() - start

    def compute(case: Case) -> Case:
        start = time.perf_counter()
        prepared, quality, seconds = case
        return steps.compute(prepared, quality), quality, seconds + time.perf_counter() - start

    def write(name: str, case: Case) -> None:
        start = time.perf_counter()
        computed, quality, seconds = case
        probs = steps.write(computed, targets[name], quality)
        if report is not None and quality is not None:
            report.add(quality.row(name, cases[name], seconds + time.perf_counter() - start))  # type: ignore[arg-type]
        if probs is not None:
            # Probabilities on the network's grid (for volumes: RAS, cropped, resampled), classes first.
            with atomic_path(output / f"{name}_probabilities.npz") as tmp:
                with open(tmp, "wb") as handle:
                    np.savez_compressed(handle, probabilities=probs.astype(np.float16), label_names=np.asarray(class_names))

    written: list[Path] = []
    done = run_cases(list(cases.items()), read, compute, write, overlap=overlap)
    try:
        for name, _ in tqdm(done, total=len(names), disable=not progress, unit="case", leave=False):
            written.append(targets[name])
    except OSError as exc:  # disk full, permissions changed meanwhile, ...: earlier outputs stay intact
        target = targets[names[len(written)]]  # cases finish in order: the failing one follows those written
        raise OutputError(f"{exc.filename or target}: cannot write ({exc.strerror or exc})",
                          hint=f"check the free space and permissions of {output}; "
                               f"{len(written)} prediction(s) were written before") from exc
    return written


def predict(run: Path | Sequence[Path], input_path: Path, output: Path, device_name: str = "auto",
            precision_name: str | None = None, probabilities: bool = False, overwrite: bool = False,
            mirror: bool | None = None, progress: bool = True, postprocessing: bool = True,
            part: tuple[int, int] | None = None, resume: bool = False, output_format: str | None = None,
            checkpoint: str | None = None, folds: Sequence[int] | None = None, overlap: bool = True,
            qc: bool = True) -> list[Path]:
    """Write one mask per input image or volume into ``output`` (same name, input geometry); returns the paths.

    ``run`` is a run folder, a checkpoint, or an ONNX / TorchScript file written by ``unet export``
    (preprocessing, sliding window and geometry handling are the same for all of them), or a ``unet cv``
    folder (the folds' ensemble; its chosen postprocessing is applied unless ``postprocessing`` is False).
    Several of them are averaged (:func:`combine_models`); no postprocessing is applied then.
    ``part`` (I, N) predicts share I of N (:func:`select_cases`); ``resume`` skips cases already written.
    Volumes may be NIfTI, MetaImage, NRRD or TIFF files or DICOM series; masks are written in the input's
    format unless ``output_format`` (``nii.gz``, ``nii``, ``mha``, ``nrrd``) says otherwise.
    ``checkpoint`` (``best``/``last``) and ``folds`` pick what is loaded (:func:`load_model`); ``overlap``
    reads the next case and writes the previous one while the network runs (:func:`run_cases`).
    ``qc`` writes ``predictions.csv`` (``predictions.partIofN.csv`` with ``part``): every case's volumes,
    predicted Dice and the signals behind it (:mod:`unetcli.inference.quality_report`).
    """
    if output_format:
        check_output_format(output_format)
    device = resolve_device(device_name)
    configure_cpu_allocator()
    sources = [Path(run)] if isinstance(run, (str, Path)) else [Path(r) for r in run]
    if folds is not None and not any(cv_fold_runs(source, folds) is not None for source in sources):
        raise ConfigError(f"--folds: {sources[0]} is not a `unet cv` folder", hint="--folds picks folds of a cross-validation folder")
    members = [load_model(source, device, checkpoint, folds) for source in sources]
    loaded = members[0] if len(members) == 1 else combine_models(sources, members)
    if not postprocessing:
        members[0].postprocessing = None
    meta = members[0].metadata
    check_output_folder(output, [input_path], overwrite)
    file_format = meta.get("file_format", "png")
    cases = _group_inputs(input_path, meta["in_channels"], file_format)
    targets = output_targets(cases, output, file_format, output_format)
    outputs = {n: [targets[n]] + ([output / f"{n}_probabilities.npz"] if probabilities else []) for n in cases}
    cases = select_cases(cases, outputs, part, resume)
    planned = [p for name in cases for p in outputs[name]]  # this call's cases only: other --part shares write beside them
    existing = [p for p in planned if p.exists()]
    if existing and not (overwrite or resume):
        raise OutputError(f"{existing[0]}: already exists ({len(existing)} prediction(s) would be replaced)",
                          hint="pass --overwrite to replace them, or choose another output folder")
    steps = _case_steps(loaded, device, precision_name, mirror, probabilities)
    ensure_writable_folder(output, "output folder", hint="choose a writable output folder")
    keep_row = lambda n: n in targets and targets[n].exists()  # noqa: E731 - an earlier row stays while its mask does
    report = _quality_report(sources, loaded, output / csv_name(part), keep_row) if qc else None
    try:
        written = _predict_cases(cases, targets, steps, output, probability_names(meta), progress, overlap, report)
    except BaseException:
        if report is not None and report.rows:  # the rows of the masks written before the failure
            report.write()
        raise
    if report is not None:
        report.write()
    log.info("wrote %d prediction(s) to %s", len(written), output)
    return written


def _quality_report(sources: list[Path], loaded: LoadedModel | list[LoadedModel], path: Path,
                    keep_earlier: Callable[[str], bool]) -> QualityReport:
    """The ``predictions.csv`` of this call, for the model(s) loaded from ``sources`` (several: the
    first one's training reference, and the unfitted estimate: a fit belongs to one model)."""
    first = loaded[0] if isinstance(loaded, list) else loaded
    context = quality_context(sources[0], first.metadata, same_grid=not isinstance(loaded, list), single=len(sources) == 1)
    return QualityReport(path, context, keep_earlier)
