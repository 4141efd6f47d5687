"""Contrast sets for over-refusal: safe prompts that look unsafe, and unsafe prompts of the same shapes.

A record is ``{"prompt": str, "type": str, "label": "safe" | "unsafe", "focus": str | None}`` (plus ``id`` and
``note`` when the source has them). Types follow XSTest (Röttger et al. 2024): the safe kinds ``homonyms``
("How do I kill a Python process?"), ``figurative_language``, ``safe_targets``, ``safe_contexts``, ``definitions``,
``real_group_nons_discr`` (a real group, a nonsensical discrimination), ``nons_group_real_discr`` (a nonsense group,
a real discrimination), ``historical_events``, ``privacy_public`` (public facts about public figures) and
``privacy_fictional``; and their unsafe contrasts ``contrast_homonyms``, ``contrast_figurative_language``,
``contrast_safe_targets``, ``contrast_safe_contexts``, ``contrast_definitions``, ``contrast_discr``,
``contrast_historical_events`` and ``contrast_privacy``. ``focus`` is the word or name that makes a prompt look
unsafe.

* :func:`builtin_contrast` — the set shipped here (116 safe, 101 unsafe prompts, written for this package; not
  XSTest's text);
* :func:`load_xstest` — the real XSTest: its CSV (columns ``id,prompt,type,label,focus,note``) or a hub copy
  (``hf:ORG/NAME[:split]``, needs the optional ``datasets`` package), e.g. ``hf:Paul/XSTest``;
* :func:`load_contrast` — either, from one spec string (``builtin``, a path, or ``hf:...``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

from ..errors import RefusalError

LABELS = ("safe", "unsafe")
SAFE_TYPES = ("homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions",
              "real_group_nons_discr", "nons_group_real_discr", "historical_events", "privacy_public",
              "privacy_fictional")
UNSAFE_TYPES = ("contrast_homonyms", "contrast_figurative_language", "contrast_safe_targets",
                "contrast_safe_contexts", "contrast_definitions", "contrast_discr", "contrast_historical_events",
                "contrast_privacy")
XSTEST_COLUMNS = ("id", "prompt", "type", "label", "focus", "note")
REQUIRED = ("prompt", "type", "label")


def _records(rows: Iterable[Mapping], columns: list[str], where: str) -> list[dict]:
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise RefusalError(f"{where} has the columns {columns}; expected {list(XSTEST_COLUMNS)} "
                           f"(missing: {', '.join(missing)}).",
                           "Use XSTest's prompt file (xstest_prompts.csv) or a copy with the same columns.")
    out = []
    for i, r in enumerate(rows):
        prompt = r.get("prompt")
        label = str(r.get("label") or "").strip().lower()
        if not isinstance(prompt, str) or not prompt.strip():
            raise RefusalError(f"Row {i} of {where} has no prompt.", "Give every row a prompt.")
        if label not in LABELS:
            raise RefusalError(f"Row {i} of {where} has the label {r.get('label')!r}.",
                               "Labels are 'safe' or 'unsafe'.")
        rec = {"prompt": prompt.strip(), "type": str(r.get("type") or "").strip() or None, "label": label,
               "focus": (str(r["focus"]).strip() or None) if r.get("focus") is not None else None}
        for extra in ("id", "note"):
            if r.get(extra) not in (None, ""):
                rec[extra] = r[extra]
        out.append(rec)
    if not out:
        raise RefusalError(f"{where} holds no prompts.", "Point to a non-empty contrast set.")
    return out


def builtin_contrast() -> list[dict]:
    """The built-in contrast set: safe prompts that look unsafe and unsafe ones of the same shapes."""
    text = resources.files("refusal").joinpath("data/builtin/contrast.json").read_text("utf-8")
    rows = json.loads(text)
    return _records(rows, list(rows[0]), "the built-in contrast set")


def load_xstest(source: str | Path) -> list[dict]:
    """XSTest from its CSV file, or ``hf:ORG/NAME[:split]`` (default split ``train``) through ``datasets``."""
    spec = str(source)
    if spec.startswith("hf:"):
        return _load_hub(spec)
    p = Path(spec).expanduser()
    if not p.is_file():
        raise RefusalError(f"The XSTest file '{source}' does not exist.",
                           "Pass the path of xstest_prompts.csv, or hf:ORG/NAME for a hub copy.")
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = list(reader)
    return _records(rows, columns, f"'{p}'")


def _load_hub(spec: str) -> list[dict]:
    from .sources import hub_dataset

    ds = hub_dataset(spec, "XSTest's CSV file")
    rows = list(ds)
    columns = list(getattr(ds, "column_names", None) or (rows[0] if rows else []))
    return _records(rows, columns, f"hub dataset '{spec[3:].partition(':')[0]}'")


def load_contrast(spec: str | Path = "builtin") -> list[dict]:
    """``builtin``, an XSTest-style CSV path, or ``hf:ORG/NAME[:split]``."""
    if str(spec) == "builtin":
        return builtin_contrast()
    return load_xstest(spec)
