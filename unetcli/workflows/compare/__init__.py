"""``unet compare``: a skip-connection study on the user's own data, in one command.

:mod:`.plan` (variants, seeds, data), :mod:`.runner` (train, predict and score every run; resume),
:mod:`.report` (statistics, ``report.md``) and :mod:`.figures` (curves, per-variant case grids).
"""

from unetcli.workflows.compare.plan import (
    DEMO_OVERRIDES,
    VARIANTS,
    StudyData,
    StudyPlan,
    make_plan,
    parse_variants,
    resolve_study_data,
)
from unetcli.workflows.compare.report import REPORT_METRICS
from unetcli.workflows.compare.runner import StudyResult, run_study

__all__ = ["DEMO_OVERRIDES", "REPORT_METRICS", "VARIANTS", "StudyData", "StudyPlan", "StudyResult", "make_plan",
           "parse_variants", "resolve_study_data", "run_study"]
