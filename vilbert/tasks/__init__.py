"""The tasks: what each says for itself, the rest (epoch, evaluation, accumulation, AMP, distributed, resume,
progress, metrics) written once in `vilbert/engine.py` and `vilbert/training.py`.

A task (`vilbert/tasks/base.py` `Task`) names its datasets and splits, builds the dataset of a split, says which
model heads it needs and which output its loss reads, and gives the loss, the per-sample score, the predictions
and what evaluation prints and writes. The table below is the whole registry: a run's `task` option picks one.
"""

from typing import Dict

from .base import Task
from .refer import ReferTask
from .vqa import VQATask

TASKS: Dict[str, Task] = {task.name: task for task in (ReferTask(), VQATask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Task", "get_task"]
