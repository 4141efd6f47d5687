"""Running work in batches: progress bars, and halving the batch on out-of-memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


@contextmanager
def progress(description: str, total: int):
    """A rich progress bar; yields ``advance(n)``."""
    if _quiet or total <= 0:
        yield lambda n=1: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of (device) memory: the one error a smaller batch can cure."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# per key (a kind of work, e.g. "Scoring induce"), the batch size that worked after running out of memory: later
# calls for the same work start there instead of failing at the large size again
_batch_memory: dict[str, int] = {}


def reset_batch_memory() -> None:
    """Forget the batch sizes remembered after out-of-memory errors (for tests, or after freeing memory)."""
    _batch_memory.clear()


def in_batches(
    fn: Callable[[Sequence[T]], None], items: Sequence[T], batch_size: int, description: str = "",
    key: str | None = None,
) -> int:
    """Call ``fn`` on consecutive slices of ``items``; on out-of-memory, halve the batch, say so, and retry.

    The halved size is remembered under ``key`` (default: ``description``; an empty key remembers nothing) for
    the rest of the process: a later call with the same key starts at ``min(batch_size, remembered)``.
    Returns the batch size that worked, so the caller can keep using it.
    """
    key = description if key is None else key
    if key and key in _batch_memory:
        batch_size = min(batch_size, _batch_memory[key])
    i = 0
    with progress(description, len(items)) as advance:
        while i < len(items):
            chunk = items[i:i + batch_size]
            try:
                fn(chunk)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not is_oom(exc) or batch_size == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                batch_size = max(1, batch_size // 2)
                if key:
                    _batch_memory[key] = min(batch_size, _batch_memory.get(key, batch_size))
                console.print(f"[yellow]Out of memory in {description or 'a batch'}: halving the batch to "
                              f"{batch_size} and retrying.[/]")
                continue
            i += len(chunk)
            advance(len(chunk))
    return batch_size
