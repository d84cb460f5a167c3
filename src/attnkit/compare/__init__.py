"""Quality comparison (``attnkit compare``). See :mod:`attnkit.compare.harness` for the JSON schema."""

from .harness import PRESETS, SCHEMA, TASKS, CompareConfig, make_task, run_compare, train_one

__all__ = ["CompareConfig", "run_compare", "train_one", "make_task", "PRESETS", "TASKS", "SCHEMA"]
