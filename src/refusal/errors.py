"""One error type for every mistake a user can make.

A :class:`RefusalError` carries a message that names the problem and the fix; the CLI prints it as one
paragraph and exits non-zero, without a traceback.
"""

from __future__ import annotations


class RefusalError(Exception):
    """A user-facing error: what went wrong, and what to do about it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} {fix}")


class NoDirectionError(RefusalError):
    """The model gives no refusal direction to find on this data: it never refuses the harmful prompts (the
    baseline filter keeps none) or no candidate passes the selection filters. A cross-lingual run keeps such a
    language as a target only instead of stopping."""
