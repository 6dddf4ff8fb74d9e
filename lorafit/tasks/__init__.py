"""The task registry: `model.task` name -> its `Task` (see `tasks.base` for the interface).

Task modules are imported on first use, so reading a recipe does not import transformers' model
classes, and a task module may import the rest of lorafit without a cycle.
"""

from __future__ import annotations

import importlib

from lorafit.errors import LorafitError
from lorafit.tasks.base import Split, Task, TaskData

# name -> "module:class", in the order the docs list them. A new task adds its line here.
REGISTRY = {
    "sequence-classification": "lorafit.tasks.classification:SequenceClassification",
    "causal-lm": "lorafit.tasks.causal_lm:CausalLM",
    "seq2seq": "lorafit.tasks.seq2seq:Seq2Seq",
    "token-classification": "lorafit.tasks.token_classification:TokenClassification",
}
TASK_NAMES = tuple(REGISTRY)

_loaded: dict[str, Task] = {}


def get_task(name: str) -> Task:
    """The task called `name`, or `LorafitError` naming the known ones."""
    if name not in REGISTRY:
        raise LorafitError(f"unknown task {name!r}; use one of {', '.join(TASK_NAMES)}")
    if name not in _loaded:
        module, cls = REGISTRY[name].split(":")
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


def all_tasks() -> list[Task]:
    return [get_task(name) for name in TASK_NAMES]


def task_for_peft_type(task_type: str | None) -> Task | None:
    """The task whose PEFT `task_type` is `task_type` (as adapter_config.json names it), or None."""
    return next((t for t in all_tasks() if t.peft_task_type == task_type), None)


__all__ = ["REGISTRY", "TASK_NAMES", "Split", "Task", "TaskData", "all_tasks", "get_task", "task_for_peft_type"]
