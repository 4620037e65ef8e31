"""Cross-validation folds: seeded k-fold over cases or over groups of cases, or the user's own."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from unetcli.errors import ConfigError

Fold = dict[str, list[str]]
"""``{"train": [case names], "val": [case names]}``."""


def case_group(name: str, pattern: re.Pattern[str] | None) -> str:
    """The group a case belongs to: the first capture group of ``pattern`` (or its whole match);
    a case the pattern does not match is its own group."""
    if pattern is None:
        return name
    match = pattern.search(name)
    if match is None:
        return name
    return match.group(1) if pattern.groups else match.group(0)


def compile_group_pattern(text: str | None) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise ConfigError(f"--group-by '{text}' is not a regular expression ({exc})",
                          hint=r"e.g. --group-by '^(sub-\d+)' to keep a subject's sessions in one fold") from exc


def kfold_splits(names: list[str], folds: int, seed: int, group_by: str | None = None) -> list[Fold]:
    """``folds`` folds over the cases, each case validated exactly once. With ``group_by`` whole groups
    are dealt out (largest first, each to the fold with the fewest cases so far, ties by seeded order),
    so cases sharing a group (e.g. one patient's scans) never sit on both sides of a fold."""
    pattern = compile_group_pattern(group_by)
    if pattern is not None and not any(pattern.search(name) for name in names):
        # A typo would otherwise quietly give an ungrouped CV: one patient's scans on both sides of a fold.
        raise ConfigError(f"--group-by '{group_by}' matches none of the {len(names)} case names (e.g. {sorted(names)[0]})",
                          hint=r"fix the regular expression, e.g. --group-by '^(sub-\d+)' for sub-01_ses-1; case names are "
                               "file names without _0000 and extension")
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        groups.setdefault(case_group(name, pattern), []).append(name)
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if len(groups) < folds:
        what = "groups" if pattern is not None else "cases"
        raise ConfigError(f"{folds} folds need at least {folds} {what}; the data has {len(groups)}",
                          hint="use fewer --folds" + (", or a --group-by that finds more groups" if pattern is not None else ""))
    rng = np.random.default_rng(seed)
    keys = [sorted(groups)[i] for i in rng.permutation(len(groups))]
    keys.sort(key=lambda k: -len(groups[k]))  # stable: equal sizes keep the seeded order
    val: list[list[str]] = [[] for _ in range(folds)]
    for key in keys:
        target = min(range(folds), key=lambda f: (len(val[f]), f))
        val[target] += groups[key]
    everyone = sorted(names)
    return [{"train": [n for n in everyone if n not in set(v)], "val": sorted(v)} for v in val]


def read_splits(path: Path, names: list[str]) -> list[Fold]:
    """The user's folds: ``{"folds": [{"train": [...], "val": [...]}, ...]}`` (``CV/splits.json``) or
    nnU-Net's ``splits_final.json`` (a list of such dicts). Every case must be known; each fold's
    train and val must not overlap."""
    try:
        values: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the splits ({exc})",
                          hint='write {"folds": [{"train": [...], "val": [...]}, ...]} or nnU-Net\'s splits_final.json') from exc
    folds = values.get("folds") if isinstance(values, dict) else values
    if not isinstance(folds, list) or not folds or not all(isinstance(f, dict) and {"train", "val"} <= set(f) for f in folds):
        raise ConfigError(f"{path}: expected a list of folds with 'train' and 'val' case lists",
                          hint='e.g. {"folds": [{"train": ["a", "b"], "val": ["c"]}, ...]}')
    known = set(names)
    out = []
    for k, fold in enumerate(folds):
        train, val = [str(n) for n in fold["train"]], [str(n) for n in fold["val"]]
        unknown = sorted((set(train) | set(val)) - known)
        if unknown:
            raise ConfigError(f"{path}: fold {k} names case(s) not in the data: {', '.join(unknown[:5])}",
                              hint="use the case names of the data folder (file names without _0000 and extension)")
        both = sorted(set(train) & set(val))
        if both:
            raise ConfigError(f"{path}: fold {k} has case(s) in both train and val: {', '.join(both[:5])}")
        if not train or not val:
            raise ConfigError(f"{path}: fold {k} has an empty train or val list")
        out.append({"train": sorted(train), "val": sorted(val)})
    _check_coverage(path, out, names)
    return out


def _check_coverage(path: Path, folds: list[Fold], names: list[str]) -> None:
    """Every case must be validated by exactly one fold: its out-of-fold prediction is what is scored."""
    seen: dict[str, int] = {}
    for k, fold in enumerate(folds):
        for name in fold["val"]:
            if name in seen:
                raise ConfigError(f"{path}: case {name} is in the val lists of folds {seen[name]} and {k}",
                                  hint="every case must be validated by exactly one fold")
            seen[name] = k
    missing = sorted(set(names) - set(seen))
    if missing:
        raise ConfigError(f"{path}: {len(missing)} case(s) are in no fold's val list: {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""),
                          hint="every case must be validated by exactly one fold (its out-of-fold prediction is scored); "
                               "add them to a val list, or remove them from the data folder")
