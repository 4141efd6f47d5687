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


class DamagedFileError(RefusalError, ValueError):
    """A file that exists but cannot be read as what it should be: truncated, garbage, or another kind of file.
    ``path`` names it and ``why`` says what the reader found; a run folder's reader adds the stage that redoes it."""

    def __init__(self, path: object, why: str, fix: str | None = None):
        self.path, self.why = path, why
        super().__init__(f"{path} is damaged ({why}).",
                         fix or "Restore it from a copy, or redo the step that wrote it.")


def os_error(exc: OSError) -> RefusalError:
    """An operating-system error (permissions, a full disk, a file where a folder should be, ...) as one message
    that names the path and the fix."""
    import errno

    path = exc.filename if exc.filename is not None else "a file"
    other = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
    where = f"'{path}'{other}"
    what = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC or exc.errno == getattr(errno, "EDQUOT", -1):
        return RefusalError(f"The disk is full: could not write {where} ({what}).",
                            "Free some space, or give an output folder on another disk (--output / --out).")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RefusalError(f"No permission to use {where} ({what}).",
                            "Check the permissions of that path and its folders, or give another output "
                            "(--output / --out).")
    if exc.errno == errno.ENOTDIR:
        return RefusalError(f"{where} is not a folder, or a part of its path is a file ({what}).",
                            "Give a path whose folders are folders.")
    if exc.errno == errno.EISDIR:
        return RefusalError(f"{where} is a folder where a file was expected ({what}).",
                            "Give a file path, or remove that folder.")
    if exc.errno == errno.ENOENT:
        return RefusalError(f"{where} does not exist ({what}).", "Check the path.")
    return RefusalError(f"Could not use {where} ({exc.__class__.__name__}: {what}).",
                        "Check the path, the disk and the permissions; run again with --debug for the traceback.")
