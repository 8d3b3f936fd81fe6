"""Offline data for the built-in benchmark."""

from mergejax.data.digits import DEFAULT_TASKS, TRANSFORMS, Split, TaskData, make_tasks

__all__ = ["DEFAULT_TASKS", "TRANSFORMS", "Split", "TaskData", "make_tasks"]
