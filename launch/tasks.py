"""Task dispatch: config in, calls to the `tp` library out, results written by rank 0."""
from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig

from launch.session import Session, UserError


TASKS = ("inference", "precision", "performance", "serve")  # each a module launch/{name}.py with run()


def run(cfg: DictConfig, session: Session, out_dir: Path) -> None:
    name = cfg.task.get("name")
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    importlib.import_module(f"launch.{name}").run(cfg, session, out_dir)


def positive_int(task: DictConfig, key: str) -> int:
    value = task.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"task.{key} must be an integer >= 1, got {value!r}")
    return value


def int_list(task: DictConfig, key: str) -> list[int]:
    """A scalar or a list of integers >= 1 (grids of the performance task)."""
    value = task.get(key)
    values = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise UserError(f"task.{key} must be an integer >= 1 or a list of them, got {value!r}")
    return values


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
