"""The study layer: arms of chained stages, launched locally or on SLURM, compared in one report.

Nothing here trains: every stage is an ordinary ``vlm_post fit`` or ``vlm_post test`` in a run folder of its own
(``<study_dir>/<arm>/seed<N>/<stage>``), so anything a study does a user can redo by hand from the plan that
``vlm_post study --dry-run`` prints. See docs/study.md.
"""

from vlm_post.study.config import StudyConfig, load_study
from vlm_post.study.plan import Plan, Stage, build_plan

__all__ = ["Plan", "Stage", "StudyConfig", "build_plan", "load_study"]
