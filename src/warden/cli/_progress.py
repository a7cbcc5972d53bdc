"""The step-by-step progress display of ``warden image build`` (rich, loaded only by it)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.text import Text

_MARKS = {"done": ("✓", "green"), "cached": ("✓", "cyan"), "failed": ("✗", "red")}


class _StatusColumn(ProgressColumn):
    """A spinner while a step runs, then a mark for done, cached or failed."""

    def __init__(self) -> None:
        super().__init__()
        self._spinner = SpinnerColumn()

    def render(self, task: Task) -> Text:
        mark = _MARKS.get(str(task.fields.get("status", "")))
        if mark is None:
            rendered = self._spinner.render(task)
            return rendered if isinstance(rendered, Text) else Text("…")
        return Text(mark[0], style=mark[1])


class _ElapsedColumn(ProgressColumn):
    """Seconds a step has run (frozen when it ends)."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        return Text(f"{elapsed or 0.0:6.1f}s", style="progress.elapsed")


def steps_progress(console: Console) -> Progress:
    """A progress display with a line per build step: mark, title, status, seconds, detail."""
    return Progress(
        _StatusColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[status]}"),
        _ElapsedColumn(),
        TextColumn("[dim]{task.fields[detail]}"),
        console=console,
    )
