"""The plan as tables: the fingerprint summary and one column per configuration."""

from __future__ import annotations

from rich.table import Table

from unetcli.config import TrainConfig
from unetcli.planning.apply import short_run_reason
from unetcli.planning.planner import Plan


def _axes(values: list) -> str:
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _levels(levels: list[list[int]]) -> str:
    return " ".join("".join(str(v) for v in level) for level in levels)


def fingerprint_table(plan: Plan) -> Table:
    fp = plan.fingerprint
    table = Table(title="dataset fingerprint", show_header=False)
    table.add_row("cases", str(fp["cases"]))
    table.add_row("channels", ", ".join(f"{n or '?'} ({m})" for n, m in zip(fp["channels"], fp["modalities"])) or "1")
    table.add_row("median spacing", _axes(fp["median_spacing"]) + (" mm" if fp["spatial_dims"] == 3 else " px"))
    table.add_row("kept by crop to non-zero", f"{100 * fp['cropped_fraction']:.0f} % (median)")
    for c, stats in enumerate(fp["intensity"]):
        table.add_row(f"foreground intensity, channel {c}",
                      f"mean {stats['mean']:.4g}, std {stats['std']:.4g}, 0.5-99.5 % {stats['p00_5']:.4g}..{stats['p99_5']:.4g}")
    table.add_row("class voxel fractions", ", ".join(f"{k}: {v:.3f}" for k, v in fp["class_fractions"].items()))
    table.add_row("budget", plan.budget)
    table.add_row("preset", plan.preset)
    return table


def plan_table(plan: Plan, time_budget: float | None = None) -> Table:
    """One column per configuration; with ``time_budget`` (seconds) also the iterations it fits at the
    estimated step time (the patch and batch stay the plan's: a budget changes how long, not what, is trained)."""
    names = list(plan.configurations)
    table = Table(title=f"plan (default: {plan.default}); kernels and strides per level, axes concatenated")
    table.add_column("")
    for name in names:
        table.add_column(name + (" *" if name == plan.default else ""))
    rows = {
        "target spacing": lambda c: _axes(c.spacing) + (f" (slices along axis {c.slice_axis})" if c.slice_axis is not None else ""),
        "median shape at that spacing": lambda c: _axes(c.median_shape),
        "patch size": lambda c: _axes(c.patch),
        "batch size": lambda c: str(c.batch_size),
        "features per level": lambda c: " ".join(str(f) for f in c.features),
        "kernel sizes": lambda c: _levels(c.kernel_sizes),
        "strides": lambda c: _levels(c.strides),
        "encoder": lambda c: c.encoder + (f" (blocks {' '.join(map(str, c.blocks_per_level))})" if c.blocks_per_level else ""),
        "normalisation per channel": lambda c: ", ".join(c.normalization),
        "parameters": lambda c: f"{c.parameters / 1e6:.1f} M",
        "estimated memory per step": lambda c: f"{c.memory_gb:.2f} GB",
        "estimated seconds per step": lambda c: "-" if c.seconds_per_step is None else f"{c.seconds_per_step:.2f} s",
    }
    if time_budget is not None:
        rows[f"iterations in {time_budget / 60:g} min (estimate)"] = lambda c: (
            "-" if not c.seconds_per_step else f"{int(time_budget // c.seconds_per_step):,}")
    for label, cell in rows.items():
        table.add_row(label, *(cell(plan.configurations[n]) for n in names))
    notes = [f"{n}: {note}" for n in names for note in plan.configurations[n].notes]
    if time_budget is not None:
        notes.append(f"train with: unet train DATA --time {time_budget / 60:g}m (the schedule runs over the time; "
                     "nnU-Net trains 250,000 iterations)")
        reason = short_run_reason(plan.config_for(None), TrainConfig(epochs=None, time_limit=time_budget))
        if reason:
            notes.append(f"that run would not use the plan: {reason} (--config {plan.default} keeps it)")
    if notes:
        table.caption = "; ".join(notes)
    return table
