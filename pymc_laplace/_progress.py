"""A minimal progress display for long loops (rich ships with PyMC on both lines)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class _Task:
    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress, self._task_id = progress, task_id

    def update(self, advance: float = 0.0, **fields: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, advance=advance, **fields)


@contextmanager
def progress_bar(description: str, total: float | None, *, enabled: bool) -> Iterator[_Task]:
    """A progress bar that shows ``description`` and a free ``status`` text; a no-op when disabled."""
    if not enabled:
        yield _Task(None, None)
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}" if total else "{task.completed:.0f}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        transient=False,
    ) as progress:
        task_id = progress.add_task(description, total=total, status="")
        yield _Task(progress, task_id)
