"""``unet compare``: a skip-connection study on the user's own data, in one command.

:mod:`.plan` (variants, seeds, data), :mod:`.runner` (train, predict and score every run; resume),
:mod:`.report` (statistics, ``report.md``) and :mod:`.figures` (curves, per-variant case grids).
"""

from unetcli.workflows.compare.study import (
    DEMO_OVERRIDES,
    VARIANTS,
    StudyData,
    Study,
    make_study,
    parse_variants,
    resolve_study_data,
)
from unetcli.workflows.compare.report import REPORT_METRICS
from unetcli.workflows.compare.runner import StudyResult, run_study

__all__ = ["DEMO_OVERRIDES", "REPORT_METRICS", "VARIANTS", "StudyData", "Study", "StudyResult", "make_study",
           "parse_variants", "resolve_study_data", "run_study"]
