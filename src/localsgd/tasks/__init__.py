"""Workloads: what a recipe learns (``task.name``). See ``base`` for what a task supplies."""

from localsgd.tasks.base import TASKS, Task, build_task, task_rules

__all__ = ["TASKS", "Task", "build_task", "task_rules"]
