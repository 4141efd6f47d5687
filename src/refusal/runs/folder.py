"""The owner of a run folder: its file names, the validated reading of its ``config.yaml`` and artifacts, and the
lock that keeps a second process out.

Everything that opens a run folder (the stages, ``abliterate``, ``control-vector``, ``sets``, ``chat``, ``report``,
the cross-lingual run) goes through a :class:`RunFolder`:

- :meth:`RunFolder.read_config` parses ``config.yaml`` and checks it before anything is written: a mapping that
  names the model and carries every section, whose settings reproduce the digests saved with them
  (:meth:`RunFolder.stale_digests`); an empty, cut, garbage or hand-broken file stops the command with a message that
  names the file and the fix, and nothing is deleted.
- :meth:`RunFolder.read_json` and :meth:`RunFolder.read_tensors` turn a truncated or foreign artifact into
  "RUN/scores.json is damaged (...); redo it with ..." naming the stage that writes it.
- The selection is stored once, in ``scores.json`` (its ``"selected"``, written by
  :meth:`RunFolder.write_selection`); :meth:`RunFolder.selection` reads it. ``direction.safetensors`` holds the
  selected vector and a reference to it (file and sha256), not a copy: :meth:`RunFolder.selected_direction` gives
  the vector with the selection's scores; :meth:`RunFolder.directions` every named direction (``selected``, the
  ranked set of ``directions.safetensors``, and ``set``). ``summary.json``'s ``"selected"`` (pos, layer) is derived
  from it by evaluate.
- ``refusal sets`` saves its set in its own artifact (:meth:`RunFolder.write_sets`: ``sets.safetensors`` and the
  manifest ``sets.done.json``, which records the extract and select manifests it read); a select run again makes it
  stale (:meth:`RunFolder.sets_state`) and a stale set is not used. Select's files are never rewritten.
- :meth:`RunFolder.lock` holds an exclusive ``flock`` on ``RUN/.lock`` (the holder's pid written in it): a second
  process stops at once with "another refusal process (pid N) is using RUN"; a lock file left by a process that
  died is taken over with a note, and the temporary files of interrupted writes are swept.
- :func:`widening_settings` finds what a saved config asks for that would widen what runs (``trust_remote_code``,
  at the top or in a judge's spec): only the user's command line or Python call may grant that, never a file in a
  folder someone shared.
- :func:`network_settings` finds the network destinations a saved config names (hub ids, URLs):
  :func:`unnamed_destinations` keeps those this invocation did not name itself, and :func:`check_network` stops the
  command before any work unless ``--allow-network`` is given now.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .. import io
from ..errors import DamagedFileError, RefusalError
from . import manifests
from .manifests import SETS, STAGES, file_sha256

if TYPE_CHECKING:
    from ..directions.base import Direction, DirectionSet

_F = TypeVar("_F", bound=Callable[..., Any])

CONFIG = "config.yaml"
LOCK = ".lock"
# every artifact of a run folder and the step that writes it (what to redo when it is damaged)
ARTIFACTS: dict[str, str] = {
    "splits.json": "extract", "candidates.safetensors": "extract", "inlp.safetensors": "extract",
    "inlp.json": "extract", "scores.json": "select", "direction.safetensors": "select",
    "directions.safetensors": "select", "rankings.json": "select", "categories.safetensors": "select",
    "categories.json": "select", "keep_condition.safetensors": "select", "completions.json": "generate",
    "completions.partial.json": "generate", "kl.json": "generate", "judgements.json": "evaluate",
    "judges.json": "evaluate", "ce.json": "evaluate", "benchmarks.json": "evaluate", "over_refusal.json": "evaluate",
    "magnitude.json": "evaluate", "summary.json": "evaluate", "sets.json": "sets", "sets.safetensors": "sets",
    **{f"{s}.done.json": s for s in (*STAGES, "sets")},
}
# the one artifact that stores the selection (its "selected" entry: pos, layer, bypass, induce, kl, n_passing); the
# other files refer to it (direction.safetensors by its sha256) or are derived from it (summary.json's "selected")
SELECTION = "scores.json"
DIRECTION = "direction.safetensors"  # the selected vector (its scores: read from SELECTION)
DIRECTIONS = "directions.safetensors"  # the ranked set ("0", "1", ..., "kept", "inlp", ...)
# a cross-lingual run's own stages (refusal.crosslingual; openings in each language's subfolder, whose other files
# are a run's) and the artifacts they write
CROSSLINGUAL_STAGES = ("prompts", "openings", "transfer", "similarity", "plots")
ARTIFACTS.update({
    "prompts.json": "prompts", "translation_checks.json": "prompts", "openings.json": "openings",
    "openings_completions.json": "openings", "transfer.json": "transfer", "transfer_completions.json": "transfer",
    "transfer.partial.json": "transfer", "similarity.json": "similarity",
    **{f"{s}.done.json": s for s in CROSSLINGUAL_STAGES},
})
# the sections a saved config.yaml must carry (it is written whole: a missing one means it was cut or edited)
SECTIONS = ("model", "data", "extract", "select", "generate", "evaluate")
WIDENING = "trust_remote_code"  # a setting that lets code from a model's folder or the hub run

_HELD: dict[str, list] = {}  # lock file -> [fd, depth]: this process's locks (re-entered, not re-taken)


def redo_command(stage: str, run_dir: Path) -> str:
    """The command that rewrites the artifacts of ``stage`` in a run folder (see :func:`redo_fix` for any folder)."""
    if stage == "sets":
        return f"`refusal sets {run_dir}`"
    return f"`refusal run --resume {run_dir} --from-stage {stage}`"


def crosslingual_root(path: str | Path) -> Path | None:
    """The cross-lingual run folder that ``path`` is, or holds as a language's subfolder (its ``config.yaml`` has
    the ``crosslingual`` section); None for any other folder."""
    p = Path(path)
    for folder in (p, p.parent):
        try:
            saved = io.read_yaml(folder / CONFIG) if (folder / CONFIG).is_file() else None
        except (DamagedFileError, OSError):
            saved = None
        if isinstance(saved, dict) and "crosslingual" in saved:
            return folder
    return None


def redo_fix(stage: str | None, run_dir: str | Path) -> str:
    """How to rewrite the artifacts of ``stage`` in ``run_dir`` (a sentence): a run folder's command; in a
    cross-lingual run (its folder or a language's), the stage's manifest deleted and the same ``refusal crosslingual``
    command again, which resumes there."""
    run_dir = Path(run_dir)
    root = crosslingual_root(run_dir)
    if root is None:
        return f"Redo it with {redo_command(stage, run_dir)}." if stage else \
            "Restore it from a copy, or redo the step that wrote it."
    again = (f"run the same `refusal crosslingual` command again (... --output {root.parent} --name {root.name}), "
             "which resumes where stages are unfinished; or add --force to redo every stage.")
    if stage is None or (run_dir.resolve() == root.resolve() and stage not in CROSSLINGUAL_STAGES):
        return again[0].upper() + again[1:]  # the run's summary.json: every run writes it again
    return f"Delete {run_dir / f'{stage}.done.json'}, then {again}"


class RunFolder:
    """One run folder on disk: its names, validated readers and lock (see the module docs)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def is_run(self) -> bool:
        return self.config_path.is_file()

    def has_finished(self) -> list[str]:
        """The stages with a manifest (finished for some config)."""
        return manifests.finished(self)

    # ---- config.yaml ---------------------------------------------------------------------------------------------

    def read_config(self, *, complete: bool = True) -> dict:
        """The saved ``config.yaml`` as written (with its ``digests``), checked: it must parse, be a mapping, name
        the model and (``complete``) carry every section. Raises a :class:`RefusalError` naming the file and the
        fix otherwise; nothing is written or deleted."""
        p = self.config_path
        if not self.path.is_dir():
            raise RefusalError(f"No run folder at '{self.path}'.",
                               "Give the folder a run wrote (runs/<name>), e.g. after `refusal run -m MODEL`.")
        if not p.is_file():
            raise RefusalError(f"'{self.path}' is not a run folder (no config.yaml).",
                               "Give the folder a 'refusal run' made (runs/<model>/ by default).")
        try:
            d = io.read_yaml(p)
        except DamagedFileError as exc:
            raise self._bad_config(exc.why) from None
        if d is None or d == {}:
            raise self._bad_config("it is empty")
        if not isinstance(d, dict):
            raise self._bad_config(f"it holds a {type(d).__name__}, not a mapping of settings")
        if not isinstance(d.get("model"), str) or not d["model"]:
            raise self._bad_config("it names no model (key 'model')")
        missing = [k for k in SECTIONS if k not in d]
        if complete and missing:
            raise self._bad_config(f"it lacks {', '.join(missing)}: it was cut or edited", cut=True)
        return d

    def _bad_config(self, why: str, cut: bool = False) -> RefusalError:
        start_over = (f"refusal run --model MODEL --output {self.path.parent} --name {self.path.name} --force")
        fix = (f"Nothing was changed. Restore {self.config_path} from a copy; or start over in that folder with "
               f"`{start_over}`")
        if cut:
            fix += " (or --force with --resume: every stage redone with the keys it still has and the defaults)"
        return RefusalError(f"{self.config_path} is damaged ({why}).", fix + ".")

    def stale_digests(self, saved: dict) -> list[str]:
        """The stages (select onwards) whose digests, saved in ``config.yaml``, its settings no longer reproduce
        (:func:`manifests.stale_digests`)."""
        return manifests.stale_digests(saved)

    def check_digests(self, saved: dict, *, force: bool = False, from_stage: str | None = None) -> None:
        """Refuse a ``config.yaml`` that no longer reproduces its digests, unless ``force`` or a ``from_stage`` at
        or before the first stage it would change (:func:`manifests.check_digests`)."""
        manifests.check_digests(self, saved, force=force, from_stage=from_stage)

    # ---- artifacts -----------------------------------------------------------------------------------------------

    def damaged(self, name: str, why: str) -> DamagedFileError:
        return DamagedFileError(self.file(name), why, redo_fix(ARTIFACTS.get(name), self.path))

    def explain(self, exc: DamagedFileError) -> DamagedFileError:
        """The same error with the fix this folder knows (which stage rewrites the file), if the file is its own."""
        p = Path(str(exc.path))
        if p.parent.resolve() == self.path.resolve() and p.name in ARTIFACTS:
            return self.damaged(p.name, exc.why)
        return exc

    def read_json(self, name: str, kind: type[Any] = dict, keys: tuple[str, ...] = ()) -> Any:
        """An artifact as JSON of the given ``kind`` with ``keys``; missing: :class:`FileNotFoundError`; truncated,
        garbage or of another shape: a :class:`DamagedFileError` naming the stage that redoes it."""
        p = self.file(name)
        try:
            obj = io.read_json(p)
        except DamagedFileError as exc:
            raise self.damaged(name, exc.why) from None
        if not isinstance(obj, kind):
            raise self.damaged(name, f"it holds a {type(obj).__name__}, not a {kind.__name__}")
        lacking = [k for k in keys if k not in obj]
        if lacking:
            raise self.damaged(name, f"it lacks {', '.join(lacking)}")
        return obj

    def read_tensors(self, name: str) -> tuple[dict, dict]:
        try:
            return io.read_tensors(self.file(name))
        except DamagedFileError as exc:
            raise self.damaged(name, exc.why) from None

    def load(self, name: str, loader: Callable[[Path], Any]) -> Any:
        """``loader(path)`` (e.g. ``Direction.load``), with a damaged file named and its fix given."""
        try:
            return loader(self.file(name))
        except DamagedFileError as exc:
            raise self.damaged(name, exc.why) from None
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # parsed, but not what this file holds
            raise self.damaged(name, f"not what {name} holds: {exc.__class__.__name__}: {exc}") from None

    # ---- checksums of finished stages ----------------------------------------------------------------------------

    def checksums(self, names: list[str]) -> dict[str, str]:
        """The sha256 of each of these files that exists (recorded in a stage's manifest when it finishes)."""
        return manifests.checksums(self, names)

    def verify(self, stage: str, manifest: dict) -> None:
        """Raise if an artifact a finished stage recorded is missing or changed since (a finished stage is not
        trusted blindly); manifests without checksums (older runs) pass."""
        for name, h in (manifest.get("sha256") or {}).items():
            p = self.file(name)
            if not p.is_file():
                raise RefusalError(f"{p} is missing, although stage {stage} finished with it.",
                                   redo_fix(stage, self.path))
            if file_sha256(p) != h:
                raise self.damaged(name, f"it changed after {stage} wrote it: its sha256 differs from the one in "
                                         f"{stage}.done.json")

    def record(self, stage: str, name: str) -> None:
        """Record the new checksum of ``name`` in ``stage``'s manifest, after something outside the stage graph
        rewrote it on purpose (:func:`manifests.record`)."""
        manifests.record(self, stage, name)

    # ---- the selection (owned by scores.json) -------------------------------------------------------------------

    def write_selection(self, scores: dict, selected: dict | None = None, **extra: Any) -> dict | None:
        """Write ``scores.json`` (once per select): the candidates' scores and, when a candidate passed,
        ``selected`` (the selection, stored here only) and ``extra`` (``ranked``, the judge objective's fields).
        Returns the reference the other files keep to the selection (:meth:`selection_reference`), or None."""
        io.write_json(self.file(SELECTION), scores if selected is None else {**scores, "selected": selected, **extra})
        return None if selected is None else self.selection_reference()

    def selection(self) -> dict:
        """The selected candidate: ``scores.json``'s ``"selected"`` (``pos``, ``layer``, ``bypass``, ``induce``,
        ``kl``, ``n_passing``), the one place a run stores it."""
        sel = self.read_json(SELECTION, keys=("selected",))["selected"]
        if not isinstance(sel, dict) or not isinstance(sel.get("pos"), int) or not isinstance(sel.get("layer"), int):
            raise self.damaged(SELECTION, "its 'selected' entry has no integer pos and layer")
        return sel

    def selection_reference(self) -> dict:
        """What a file derived from the selection keeps instead of a copy: the owner's name, key and sha256."""
        return {"file": SELECTION, "key": "selected", "sha256": file_sha256(self.file(SELECTION))}

    def selected_direction(self) -> Direction:
        """``direction.safetensors``, the selected vector, with the selection's scores read from ``scores.json``
        (the file refers to it: ``extra["selection"]``; its position and layer must be the selection's). A file
        without that reference (older runs, a hand-made file) is returned as saved."""
        from ..directions.base import Direction

        d: Direction = self.load(DIRECTION, Direction.load)
        if not isinstance(d.extra.get("selection"), dict):
            return d
        sel = self.selection()
        if (sel["pos"], sel["layer"]) != (d.pos, d.layer):
            raise self.damaged(DIRECTION, f"it holds position {d.pos}, layer {d.layer}, but {SELECTION} selected "
                                          f"position {sel['pos']}, layer {sel['layer']}: they come from different "
                                          "select runs")
        d.scores = {k: float(sel[k]) for k in ("bypass", "induce", "kl") if isinstance(sel.get(k), (int, float))}
        return d

    def directions(self) -> DirectionSet:
        """Every direction of the run by name: ``selected`` (:meth:`selected_direction`), the ranked set of
        ``directions.safetensors`` (``0``, ``1``, ..., ``kept``, ``inlp``, ...) and ``set``, the set ``refusal
        sets`` saved (``sets.safetensors``), when it was made from this select's outputs (:meth:`sets_state`)."""
        from ..directions.base import Direction, DirectionSet

        ranked: DirectionSet = self.load(DIRECTIONS, DirectionSet.load)
        out = DirectionSet()
        if self.file(DIRECTION).is_file():
            out["selected"] = self.selected_direction()
        elif "selected" in ranked:  # an older folder's copy of it
            out["selected"] = ranked["selected"]
        for name, d in ranked.items():
            if name != "selected":
                out[name] = d
        if self.sets_state() == "fresh":
            self.verify("sets", self.manifest("sets") or {})
            out["set"] = self.load(SETS, Direction.load)
        return out

    # ---- the saved set of `refusal sets` -------------------------------------------------------------------------

    def sets_after(self) -> dict:
        """What ``refusal sets`` reads, identified: each stage of :data:`manifests.SETS_AFTER` by its digest and the
        sha256 of its manifest (:func:`manifests.sets_after`)."""
        return manifests.sets_after(self)

    def write_sets(self, direction: Direction, options: dict, best: dict, seconds: float = 0.0) -> dict:
        """Save ``direction`` as the run's ``set`` (``sets.safetensors``), then its manifest ``sets.done.json``:
        its digest (its options and the stages it read), the stages it read (:meth:`sets_after`), its options, the
        best set's row and the file's sha256. Nothing of select's is written."""
        from ..config import digest

        after = self.sets_after()
        self.file("sets.done.json").unlink(missing_ok=True)  # a kill between the two writes leaves it stale
        direction.save(self.file(SETS))
        return self.write_manifest("sets", digest({"stage": "sets", "options": options, "after": after}), seconds,
                                   [SETS], {"after": after, "options": options, "best": best})

    def sets_state(self) -> str:
        """``"none"`` (no saved set), ``"fresh"`` (saved from the extract and select outputs now in the folder) or
        ``"stale"`` (one of those stages ran again since, or its manifest is gone)."""
        return manifests.sets_state(self)

    def set_reference(self) -> dict | None:
        """What a stage that used the direction ``set`` records (and is redone when it changes): the saved set's
        sha256 and digest; None when no fresh set is saved."""
        return manifests.set_reference(self)

    # ---- stage manifests -----------------------------------------------------------------------------------------

    def manifest(self, stage: str, digest: str | None = None) -> dict | None:
        """``<stage>.done.json`` (validated), or None where the stage has not finished (with ``digest``: not for
        that digest)."""
        return manifests.read(self, stage, digest)

    def write_manifest(self, stage: str, digest: str, seconds: float, outputs: list[str],
                       extra: dict | None = None) -> dict:
        """Write ``<stage>.done.json``, last, after the stage's outputs: its digest, time, outputs and their sha256."""
        return manifests.write(self, stage, digest, seconds, outputs, extra)

    # ---- the lock ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, *, read_only_ok: bool = False) -> Iterator[RunFolder]:
        """Hold the folder's exclusive lock (re-entered freely within one process); sweep stale temporary files on
        taking it. ``read_only_ok``: a folder this user cannot write is read without a lock (nothing here writes
        it then)."""
        existed = self.path.exists()
        try:
            with exclusive(self.file(LOCK), self.path, read_only_ok=read_only_ok) as taken:
                if taken:
                    sweep_temporaries(self.path)
                yield self
        finally:  # a folder made only to hold the lock of a command that wrote nothing is not left behind
            with contextlib.suppress(OSError):
                if not existed and self.path.resolve() and os.listdir(self.path) == [LOCK] and not _held(self):
                    os.unlink(self.file(LOCK))
                    os.rmdir(self.path)


@contextlib.contextmanager
def exclusive(lock_file: Path, what: Path, *, read_only_ok: bool = False, remove: bool = False) -> Iterator[bool]:
    """An exclusive, non-blocking ``flock`` on ``lock_file`` for ``what``; yields whether it was taken (False only
    with ``read_only_ok`` on a folder that cannot be written). ``remove``: delete the lock file on release."""
    key = str(lock_file.resolve()) if lock_file.parent.exists() else str(lock_file.absolute())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield True
        finally:
            _HELD[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # no flock on this system: run unlocked
        yield False
        return
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, io.FILE_MODE)
    except OSError as exc:
        if read_only_ok and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            yield False
            return
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        who = f"pid {holder}" if holder else "pid unknown"
        raise RefusalError(f"Another refusal process ({who}) is using {what}.",
                           "Wait until it ends (or stop it), then run this again: two processes on one folder would "
                           "mix their results.") from None
    old = _read_pid(fd)
    if old and old != os.getpid():
        _note(f"Took over the lock of {what} left by process {old}, which is no longer running.")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield True
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            if remove:
                os.unlink(lock_file)
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _held(rf: RunFolder) -> bool:
    return any(k == str(rf.file(LOCK).resolve()) for k in _HELD)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _note(text: str) -> None:
    from ..batching import console

    console.print(f"[yellow]Note:[/] {text}")


def _is_temporary(name: str, prefix: str = ".") -> bool:
    """A name the atomic writers give a temporary file or folder (``.NAME.XXXX.tmp``, ``.NAME.tmp-XXXX``,
    ``.NAME.old-XXXX``)."""
    return name.startswith(prefix) and (name.endswith(".tmp") or ".tmp-" in name or ".old-" in name)


def sweep_temporaries(folder: Path, prefix: str = ".") -> int:
    """Remove the temporary files and folders that interrupted writes left in ``folder`` (only call it while
    holding the lock that every writer there holds); returns the bytes freed."""
    freed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        if not _is_temporary(e.name, prefix):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                freed += sum(f.stat().st_size for f in Path(e.path).rglob("*") if f.is_file())
                shutil.rmtree(e.path)
            else:
                freed += e.stat(follow_symlinks=False).st_size
                os.unlink(e.path)
        except OSError:
            continue
    if freed:
        _note(f"Removed {freed / 1e6:.1f} MB of temporary files an interrupted process left in {folder}.")
    return freed


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold a lock on an export's output path (``.NAME.lock`` beside it, removed after), and sweep the temporary
    files and folders interrupted exports to it left."""
    out = Path(out)
    with exclusive(out.parent / f".{out.name}.lock", out, remove=True):
        sweep_temporaries(out.parent, prefix=f".{out.name}.")
        yield


# ---- settings a saved file may not grant ---------------------------------------------------------------------------

def widening_settings(saved: Any, where: tuple = ()) -> list[tuple]:
    """The paths (tuples of keys and list indices) at which ``saved`` turns on a setting that widens what runs
    (``trust_remote_code``: at the top, or in a judge's spec)."""
    out: list[tuple] = []
    if isinstance(saved, dict):
        for k, v in saved.items():
            if k == WIDENING and v:
                out.append((*where, k))
            elif isinstance(v, (dict, list)):
                out += widening_settings(v, (*where, k))
    elif isinstance(saved, list):
        for i, v in enumerate(saved):
            out += widening_settings(v, (*where, i))
    return out


def with_values(d: dict, values: dict[tuple, Any]) -> dict:
    """A deep copy of ``d`` with the value at each path set (paths that no longer exist are skipped)."""
    d = copy.deepcopy(d)
    for path, v in values.items():
        node: Any = d
        for k in path[:-1]:
            try:
                node = node[k]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if isinstance(node, dict) and path[-1] in node:
            node[path[-1]] = v
    return d


def path_name(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(path))


def granted(rf: RunFolder, saved: dict, trust_remote_code: bool, *, allow_network: bool = False) -> dict:
    """``saved`` (a run's config.yaml) with every widening setting set to what this invocation grants: a saved
    request that is not granted is reported (naming the file), not obeyed. For the commands that only load the
    run's model (export, chat): a hub model is downloaded only with ``allow_network`` (or ``HF_HUB_OFFLINE=1``)."""
    check_network(rf, [d for d in unnamed_destinations(saved) if d.path == ("model",)], allow_network,
                  can_name=False)
    asked = widening_settings(saved)
    if asked and not trust_remote_code:
        from ..batching import console

        console.print(f"[yellow]Warning:[/] {rf.config_path} asks for trust_remote_code "
                      f"({', '.join(path_name(p) for p in asked)}): not obeyed. A saved config cannot allow code from "
                      "a model's folder or the hub to run; pass --trust-remote-code if you trust that code.")
    out = with_values(saved, {p: bool(trust_remote_code) for p in asked})
    out["trust_remote_code"] = bool(trust_remote_code)
    return out


def holding_lock(param: str = "run_dir", *, read_only_ok: bool = False) -> Callable[[_F], _F]:
    """A decorator for a command whose argument ``param`` is a run folder: the command runs holding its lock."""
    import functools

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            folder = kwargs.get(param)
            if folder is None or not Path(folder).is_dir():
                return fn(*args, **kwargs)
            with RunFolder(folder).lock(read_only_ok=read_only_ok):
                return fn(*args, **kwargs)
        return cast(_F, command)
    return decorate


# ---- network destinations a saved file may not choose --------------------------------------------------------------

NETWORK_FLAG = "--allow-network"
_URL = ("http://", "https://")


@dataclass(frozen=True)
class Destination:
    """A place on the network a config names: a URL (a judge's server, ``generate.backend: openai``'s) or a hub id
    (the model, a judge model, an ``hf:`` data set, an lm-eval task whose data comes from the hub)."""

    path: tuple  # where in the config (keys and list indices)
    value: str
    what: str
    hub: bool  # read from the Hugging Face hub (its local cache is enough under HF_HUB_OFFLINE=1)

    @property
    def stage(self) -> str | None:
        """The stage that uses it (None: every command that reads the config: the model, the data sets)."""
        return self.path[0] if self.path and self.path[0] in STAGES else None

    def describe(self) -> str:
        return f"{path_name(self.path)} = {_shown(self.value)} ({self.what})"


def _shown(value: str) -> str:
    """A URL without what may be a secret in it (user:password@, the query); other values as they are."""
    if not value.startswith(_URL):
        return repr(value)
    import urllib.parse

    p = urllib.parse.urlsplit(value)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return repr(urllib.parse.urlunsplit((p.scheme, host, p.path, "", "")))


def _hub_model(spec: Any) -> bool:
    if not isinstance(spec, str) or not spec:
        return False
    from ..models.loading import resolve_source

    try:
        return resolve_source(spec).kind == "hub"
    except RefusalError:  # not a model spec at all: its own check reports it
        return False


def network_settings(cfg: Any) -> list[Destination]:
    """Every network destination a config (a dict as in ``config.yaml``) names and a command may use: the model and
    judge models that are hub ids, ``hf:`` data sets, lm-eval tasks that read the hub, every ``http(s)://`` URL (a
    judge's), and ``generate.openai.url`` when ``generate.backend`` is ``openai`` (its default URL is saved in every
    config, unused otherwise). Catalog names are not destinations: the package pins what they download."""
    out: list[Destination] = []
    if not isinstance(cfg, dict):
        return out
    if _hub_model(cfg.get("model")):
        out.append(Destination(("model",), cfg["model"], "a hub model: its weights are downloaded", True))
    g = cfg.get("generate")
    if isinstance(g, dict) and g.get("backend") == "openai":
        url = (g.get("openai") or {}).get("url") if isinstance(g.get("openai"), dict) else None
        from ..config import OpenAIGenerateConfig

        out.append(Destination(("generate", "openai", "url"), str(url or OpenAIGenerateConfig.url),
                               "the server generate.backend: openai sends prompts to", False))
    bench = (cfg.get("evaluate") or {}).get("benchmarks") if isinstance(cfg.get("evaluate"), dict) else None
    if isinstance(bench, dict) and isinstance(bench.get("tasks"), list):
        for i, t in enumerate(bench["tasks"]):
            if isinstance(t, str) and not t.startswith("refusal_"):
                out.append(Destination(("evaluate", "benchmarks", "tasks", i), t,
                                       "an lm-eval task whose data comes from the hub", True))

    def walk(node: Any, where: tuple) -> None:
        if where in (("model",), ("generate", "openai")):
            return
        if isinstance(node, dict):
            if node.get("type") not in (None, "openai") and _hub_model(node.get("model")):  # a local-model judge
                out.append(Destination((*where, "model"), node["model"], "a hub model for a judge", True))
            for k, v in node.items():
                if k != "model" or node.get("type") is None:
                    walk(v, (*where, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*where, i))
        elif isinstance(node, str):
            if node.startswith(_URL):
                out.append(Destination(where, node, "a server the run sends prompts and completions to", False))
            elif node.startswith("hf:"):
                out.append(Destination(where, node, "a hub data set", True))

    walk(cfg, ())
    return out


def _strings(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_strings(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_strings(v) for v in node)) if node else set()
    return {node} if isinstance(node, str) else set()


def hub_offline() -> bool:
    """Whether this process may only read the hub's local cache (``HF_HUB_OFFLINE``): hub ids reach no network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def unnamed_destinations(cfg: dict, named_now: Any = None) -> list[Destination]:
    """The destinations of ``cfg`` (the config a command will use, read from a run folder) that this invocation did
    not name itself: a value is named when it appears anywhere in ``named_now`` (the flags and the ``--config`` file
    given now). Hub ids pass under ``HF_HUB_OFFLINE=1`` (only the local cache is read)."""
    named = _strings(named_now or {})
    offline = hub_offline()
    return [d for d in network_settings(cfg) if d.value not in named and not (d.hub and offline)]


def check_network(rf: RunFolder, dests: list[Destination], allow_network: bool, *, can_name: bool = True) -> None:
    """Stop, before any work, if a saved config would make this command use a network destination the command line
    did not name (``dests``, from :func:`unnamed_destinations`) and ``allow_network`` is off. ``can_name``: the
    command takes the setting again (flags, ``--config``), so naming the same value is a second way to allow it."""
    if not dests or allow_network:
        return
    fix = f"Nothing was changed. If you trust {'it' if len(dests) == 1 else 'them'}, pass {NETWORK_FLAG}"
    if can_name:
        fix += ("; or give the same value again on the command line (e.g. --model ID) or in the --config file you "
                "pass" if any(d.path == ("model",) for d in dests) else "; or give the same value again in the "
                "--config file you pass")
    if all(d.hub for d in dests):
        fix += "; or set HF_HUB_OFFLINE=1 to use only the hub's local cache"
    raise RefusalError(
        f"{rf.config_path} names network destinations this command line did not: "
        + "; ".join(d.describe() for d in dests)
        + ". A run folder's saved config cannot make a command download from the hub or send prompts (and an API "
        "key) to a server: someone else may have written it.", fix + ".")
