"""Running work in batches: progress bars, and halving the batch on out-of-memory, as a :class:`Batching` object
that its owner passes down (no module state)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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


@dataclass
class Batching:
    """What batched work shares within the one who owns it (a run, a chat session, a notebook), passed down
    explicitly: the batch size that worked after running out of memory, per kind of work, and whether to draw
    progress bars.

    >>> batching = Batching()            # one per run: later calls start at the sizes that worked
    >>> extract(model, tok, harmful, harmless, batching=batching)
    >>> generate(model, tok, prompts, batching=batching)

    A call given none makes a fresh one: it starts at its ``batch_size`` and draws its bars."""

    quiet: bool = False
    sizes: dict[str, int] = field(default_factory=dict)  # key (a kind of work) -> the size that worked after an OOM

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """A rich progress bar (none when quiet); yields ``advance(n)``."""
        if self.quiet or total <= 0:
            yield lambda n=1: None
            return
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=False) as p:
            task = p.add_task(description, total=total)
            yield lambda n=1: p.advance(task, n)

    def run(self, fn: Callable[[Sequence[T]], None], items: Sequence[T], batch_size: int, description: str = "",
            key: str | None = None) -> int:
        """Call ``fn`` on consecutive slices of ``items``; on out-of-memory, halve the batch, say so, and retry.

        The halved size is remembered under ``key`` (default: ``description``; an empty key remembers nothing): a
        later call with the same key starts at ``min(batch_size, remembered)``. Returns the batch size that worked,
        so the caller can keep using it.
        """
        key = description if key is None else key
        if key and key in self.sizes:
            batch_size = min(batch_size, self.sizes[key])
        i = 0
        with self.progress(description, len(items)) as advance:
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
                        self.sizes[key] = min(batch_size, self.sizes.get(key, batch_size))
                    console.print(f"[yellow]Out of memory in {description or 'a batch'}: halving the batch to "
                                  f"{batch_size} and retrying.[/]")
                    continue
                i += len(chunk)
                advance(len(chunk))
        return batch_size

    def forget(self) -> None:
        """Forget the remembered batch sizes (after freeing memory)."""
        self.sizes.clear()


def progress(description: str, total: int, batching: Batching | None = None):
    """A rich progress bar (``batching``'s quietness; none given: drawn); yields ``advance(n)``."""
    return (batching or Batching()).progress(description, total)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of (device) memory: the one error a smaller batch can cure."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def in_batches(
    fn: Callable[[Sequence[T]], None], items: Sequence[T], batch_size: int, description: str = "",
    key: str | None = None, batching: Batching | None = None,
) -> int:
    """:meth:`Batching.run` on ``batching`` (none given: a fresh one, so nothing is remembered from other calls)."""
    return (batching or Batching()).run(fn, items, batch_size, description, key)
