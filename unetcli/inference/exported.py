"""Exported models (ONNX, TorchScript) as networks ``predict`` can run like a run folder's.

An exported file carries one JSON document (ONNX ``metadata_props`` / TorchScript
``_extra_files`` key :data:`METADATA_KEY`) holding the run's config and checkpoint metadata, so
preprocessing, patch size, sliding-window settings, geometry handling and label values are
exactly those of the run it came from. The network is wrapped in an :class:`ExportedNetwork`: a
module that maps a (B, C, *patch) tensor to logits, like the network it was exported from.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetcli import __version__
from unetcli.config import RunConfig, config_from_dict
from unetcli.errors import CheckpointError, ConfigError

METADATA_KEY = "unetcli"
"""ONNX ``metadata_props`` key holding the JSON document."""
TORCHSCRIPT_EXTRA = "unetcli.json"
"""TorchScript ``_extra_files`` name holding the same document."""
EXPORT_FORMAT = "unetcli-export"
EXPORT_FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "image", "logits"
INSTALL_HINT = "install the optional ONNX support: pip install 'unetcli[onnx]'"


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives hold ``constants.pkl`` and ``code/``; ``torch.save`` files (unetcli
    checkpoints) hold neither, though both are zip files."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def is_exported_model(path: Path) -> bool:
    path = Path(path)
    return path.is_file() and (path.suffix.lower() == ".onnx" or is_torchscript_archive(path))


@dataclass
class ExportedModel:
    network: ExportedNetwork
    config: RunConfig
    metadata: dict[str, Any]
    document: dict[str, Any]


class ExportedNetwork(nn.Module):
    """A loaded ONNX or TorchScript network with the size contract ``predict`` reads (``margin``).

    ``fixed_precision`` is the only precision the backend runs (``fp32`` for onnxruntime), or None
    when autocast applies as for a PyTorch network.
    """

    fixed_precision: str | None = None

    def __init__(self, margin: list[int] | tuple[int, ...], num_outputs: int | None = None, source: Path | None = None) -> None:
        super().__init__()
        self.margin = tuple(int(m) for m in margin)
        self.spatial_dims = len(self.margin)
        self.num_outputs = num_outputs
        self.source = source

    def checked(self, x: torch.Tensor, run: Any) -> torch.Tensor:
        """``run(x)``, refusing a network whose output disagrees with the file's own metadata (another
        number of classes, axes or size): its masks would be silently wrong."""
        try:
            logits = run(x)
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{self.source}: the network does not run on the {self.spatial_dims}D input its metadata "
                                  f"describes ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})",
                                  hint="the file's network and metadata do not belong together; export it again with `unet export RUN`") from exc
        expected = (x.shape[0], self.num_outputs or logits.shape[1] if logits.ndim > 1 else -1,
                    *[s - 2 * m for s, m in zip(x.shape[2:], self.margin)])
        if tuple(logits.shape) != tuple(expected):
            raise CheckpointError(f"{self.source}: the network's output {tuple(logits.shape)} does not match its metadata "
                                  f"({self.num_outputs} classes, {self.spatial_dims}D: expected {tuple(expected)} for input "
                                  f"{tuple(x.shape)})",
                                  hint="the file's network and metadata do not belong together; export it again with `unet export RUN`")
        return logits


class TorchScriptNetwork(ExportedNetwork):
    def __init__(self, module: torch.jit.ScriptModule, margin: list[int], num_outputs: int | None = None,
                 source: Path | None = None) -> None:
        super().__init__(margin, num_outputs, source)
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.checked(x, self.module)


class OnnxNetwork(ExportedNetwork):
    """An onnxruntime session behind the module interface: no parameters, float32 in and out."""

    fixed_precision = "fp32"

    def __init__(self, session: Any, margin: list[int], num_outputs: int | None = None, source: Path | None = None) -> None:
        super().__init__(margin, num_outputs, source)
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.checked(x, self._run)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            (logits,) = self.session.run(None, {self.input_name: array})
        except Exception as exc:  # onnxruntime's own exception types: a shape the graph does not take
            raise RuntimeError(str(exc)) from exc
        return torch.from_numpy(logits).to(x.device)


def export_document(config: dict[str, Any], metadata: dict[str, Any], margin: tuple[int, ...], model_format: str,
                    source: str) -> dict[str, Any]:
    """The JSON document an exported file carries: everything ``predict`` needs besides the network."""
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "unetcli_version": __version__,
        "model_format": model_format, "exported_from": source,
        "network": {"input": INPUT_NAME, "output": OUTPUT_NAME, "layout": "N, C, *spatial -> N, classes, *spatial",
                    "output_is": "logits; softmax over axis 1 gives class probabilities", "margin": list(margin)},
        "config": config, "metadata": metadata,
    }


def document_to_json(document: dict[str, Any]) -> str:
    # Checkpoint metadata is plain containers; numpy scalars can still appear in preprocessing plans.
    return json.dumps(document, default=lambda v: v.item() if hasattr(v, "item") else str(v))


def parse_document(text: str | bytes | None, path: Path, where: str) -> dict[str, Any]:
    """Read and check the embedded document; an absent or foreign one is one clear error."""
    if not text:
        raise CheckpointError(
            f"{path}: has no unetcli metadata ({where}), so its preprocessing, patch size and labels are unknown",
            hint="export the model with `unet export RUN`; files written by other tools cannot be used by unet predict")
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: its unetcli metadata ({where}) is not valid JSON ({exc})",
                              hint="export the model again with `unet export RUN`") from exc
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: its '{where}' entry is not a unetcli export document",
                              hint="export the model with `unet export RUN`")
    version = document.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: export format version {version} is not supported by unetcli {__version__} "
                              f"(expects {EXPORT_FORMAT_VERSION})", hint="use the unetcli version that exported it, or export again")
    missing = [k for k in ("config", "metadata", "network") if not isinstance(document.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path}: its unetcli metadata lacks {', '.join(missing)}", hint="export the model again with `unet export RUN`")
    return document


def _config_of(document: dict[str, Any], path: Path) -> RunConfig:
    try:
        return config_from_dict(document["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its embedded config is not valid for unetcli here ({exc.message})",
                              hint="use the unetcli version that exported it") from exc


def _margin_of(document: dict[str, Any], path: Path) -> list[int]:
    margin = document["network"].get("margin")
    dims = document["metadata"].get("spatial_dims")
    if not isinstance(margin, list) or len(margin) != dims:
        raise CheckpointError(f"{path}: its unetcli metadata gives no per-axis margin for the {dims}D network",
                              hint="export the model again with `unet export RUN`")
    return margin


def _outputs_of(document: dict[str, Any], path: Path) -> int:
    meta = document["metadata"]
    count, dims = meta.get("num_classes"), meta.get("spatial_dims")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1 or dims not in (2, 3):
        raise CheckpointError(f"{path}: its unetcli metadata gives no valid num_classes / spatial_dims "
                              f"({count!r} / {dims!r})", hint="export the model again with `unet export RUN`")
    for key in ("label_values", "label_names"):
        if not isinstance(meta.get(key), list) or len(meta[key]) < (count if not meta.get("regions") else count + 1):
            raise CheckpointError(f"{path}: its unetcli metadata's {key} do not cover its {count} output(s)",
                                  hint="export the model again with `unet export RUN`")
    return count


def load_torchscript(path: Path, device: torch.device) -> ExportedModel:
    extra = {TORCHSCRIPT_EXTRA: ""}
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except (RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable TorchScript file ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})",
                              hint="export it again with `unet export RUN --format torchscript`") from exc
    document = parse_document(extra[TORCHSCRIPT_EXTRA], path, f"TorchScript extra file {TORCHSCRIPT_EXTRA}")
    network = TorchScriptNetwork(module.eval(), _margin_of(document, path), _outputs_of(document, path), path)
    return ExportedModel(network, _config_of(document, path), document["metadata"], document)


def onnx_session(path: Path, device: torch.device) -> Any:
    """An onnxruntime session on ``device`` (CUDA where onnxruntime has it, else CPU) using
    torch's thread count, so that timings compare like with like."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"{path}: running an ONNX model needs onnxruntime, which is not installed", hint=INSTALL_HINT) from exc
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise CheckpointError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})",
                              hint="export it again with `unet export RUN --format onnx`") from exc


def load_onnx(path: Path, device: torch.device) -> ExportedModel:
    session = onnx_session(path, device)
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    document = parse_document(text, path, f"ONNX metadata_props key '{METADATA_KEY}'")
    network = OnnxNetwork(session, _margin_of(document, path), _outputs_of(document, path), path)
    return ExportedModel(network, _config_of(document, path), document["metadata"], document)


def load_exported(path: Path, device: torch.device) -> ExportedModel:
    """An ONNX (by its ``.onnx`` suffix) or TorchScript (by its archive entries) file written by ``unet export``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: exported model not found")
    return load_onnx(path, device) if path.suffix.lower() == ".onnx" else load_torchscript(path, device)
