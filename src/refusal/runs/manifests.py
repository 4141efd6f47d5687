"""A run folder's stage manifests and digests: what a finished stage records and how a later command tells whether
it still holds.

- A stage finishes by writing ``<stage>.done.json`` last (:func:`write`): its digest (its settings and the stages
  before it), its time, its outputs and their sha256 (:func:`checksums`). :func:`read` gives it back, validated, or
  None where the stage has not finished (for that digest); :func:`finished` lists the run stages that have one.
- :func:`record` updates an output's sha256 in a manifest after something outside the stage graph rewrote it on
  purpose.
- ``config.yaml`` carries each stage's digest: :func:`stale_digests` finds the stages whose settings, as saved, no
  longer reproduce it (the file was edited or cut), and :func:`check_digests` refuses such a file unless the command
  redoes those stages.
- The set ``refusal sets`` saves is fresh while the manifests of the stages it read are the ones it recorded
  (:func:`sets_after`, :func:`sets_state`); a stage that used it records :func:`set_reference`.

:class:`~refusal.runs.folder.RunFolder` offers each of these as a method (``manifest``, ``write_manifest``,
``checksums``, ``record``, ``has_finished``, ``stale_digests``, ``check_digests``, ``sets_after``, ``sets_state``,
``set_reference``); this module imports nothing of
it at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import io
from ..errors import RefusalError

if TYPE_CHECKING:
    from .folder import RunFolder

STAGES = ("extract", "select", "generate", "evaluate")
# `refusal sets`: a stage outside `refusal run` that reads extract's and select's outputs; its own artifact is the saved
# set (SETS, the direction "set") with its manifest sets.done.json; sets.json and sets.png report its last search
SETS = "sets.safetensors"
SETS_AFTER = ("extract", "select")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def finished(rf: RunFolder) -> list[str]:
    """The stages with a manifest (finished for some config)."""
    return [s for s in STAGES if rf.file(f"{s}.done.json").exists()]


def checksums(rf: RunFolder, names: list[str]) -> dict[str, str]:
    """The sha256 of each of these files that exists (recorded in a stage's manifest when it finishes)."""
    return {n: file_sha256(rf.file(n)) for n in names if rf.file(n).is_file()}


def read(rf: RunFolder, stage: str, digest: str | None = None) -> dict | None:
    """``<stage>.done.json`` (validated), or None where the stage has not finished (with ``digest``: not for that
    digest)."""
    name = f"{stage}.done.json"
    if not rf.file(name).is_file():
        return None
    m = rf.read_json(name)
    return m if digest is None or m.get("digest") == digest else None


def write(rf: RunFolder, stage: str, digest: str, seconds: float, outputs: list[str],
          extra: dict | None = None) -> dict:
    """Write ``<stage>.done.json``, last, after the stage's outputs: its digest, time, outputs and their sha256."""
    from datetime import datetime, timezone

    m = {"stage": stage, "digest": digest, "seconds": round(seconds, 2),
         "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "outputs": outputs,
         **(extra or {}), "sha256": checksums(rf, outputs)}
    io.write_json(rf.file(f"{stage}.done.json"), m)
    return m


def record(rf: RunFolder, stage: str, name: str) -> None:
    """Record the new checksum of ``name`` in ``stage``'s manifest, after something outside the stage graph
    rewrote it on purpose (``refusal sets`` before it had its own artifact did so with directions.safetensors)."""
    p = rf.file(f"{stage}.done.json")
    if not p.is_file():
        return
    m = rf.read_json(p.name)
    if name in (m.get("sha256") or {}):
        m["sha256"][name] = file_sha256(rf.file(name))
        io.write_json(p, m)


def stale_digests(saved: dict) -> list[str]:
    """The stages (select onwards) whose digests, saved in ``config.yaml`` (``saved``), its settings no longer
    reproduce: the file was edited or cut since the run wrote it. (Extract's digest also covers the model's weights,
    which are checked when the stage is resumed.)"""
    from ..config import STAGE_KEYS, digest, stage_config

    digests = saved.get("digests")
    if not isinstance(digests, dict):
        return []
    # the sections as written: what the digests were computed from (settings a newer version added, with their
    # defaults, are not an edit)
    stale = []
    prev = digests.get("extract")
    for stage in STAGES[1:]:
        own = stage_config(saved, stage)
        if stage in digests and prev is not None and (
                len(own) < len(STAGE_KEYS[stage])
                or digest({"stage": stage, "config": own, "after": prev}) != digests[stage]):
            stale.append(stage)
        prev = digests.get(stage)
    return stale


def check_digests(rf: RunFolder, saved: dict, *, force: bool = False, from_stage: str | None = None) -> None:
    """Refuse a ``config.yaml`` that no longer reproduces its digests, unless ``force`` or a ``from_stage`` at or
    before the first stage it would change."""
    stale = rf.stale_digests(saved)
    if not stale or force:
        return
    if from_stage in STAGES and STAGES.index(from_stage) <= STAGES.index(stale[0]):
        return
    raise RefusalError(
        f"{rf.config_path} no longer reproduces the digests saved in it (stages {', '.join(stale)}): it was "
        "edited or cut after the run wrote it, so its finished stages cannot be trusted to match it.",
        f"Nothing was changed. Give changed settings as flags instead; or, if the edit is meant, pass "
        f"--from-stage {stale[0]} to redo from there (--force redoes everything).")


def sets_after(rf: RunFolder) -> dict:
    """What ``refusal sets`` reads, identified: each stage of :data:`SETS_AFTER` by its digest and the sha256 of its
    manifest (which holds its outputs' sha256, and is rewritten whenever the stage runs again)."""
    out = {}
    for stage in SETS_AFTER:
        m = rf.manifest(stage)
        if m is None:
            raise RefusalError(f"Stage {stage} has not finished in {rf.path}: there is no set to search.",
                               f"Run `refusal run --resume {rf.path}` (or `refusal {stage} {rf.path}`) first.")
        out[stage] = {"digest": m.get("digest"), "manifest_sha256": file_sha256(rf.file(f"{stage}.done.json"))}
    return out


def sets_state(rf: RunFolder) -> str:
    """``"none"`` (no saved set), ``"fresh"`` (saved from the extract and select outputs now in the folder) or
    ``"stale"`` (one of those stages ran again since, or its manifest is gone)."""
    if not rf.file(SETS).is_file():
        return "none"
    m = rf.manifest("sets")
    if m is None:
        return "stale"
    try:
        return "fresh" if m.get("after") == rf.sets_after() else "stale"
    except RefusalError:  # a stage it read has no manifest now (being redone)
        return "stale"


def set_reference(rf: RunFolder) -> dict | None:
    """What a stage that used the direction ``set`` records (and is redone when it changes): the saved set's sha256
    and digest; None when no fresh set is saved."""
    if rf.sets_state() != "fresh":
        return None
    m = rf.manifest("sets") or {}
    return {"file": SETS, "sha256": file_sha256(rf.file(SETS)), "digest": m.get("digest")}
