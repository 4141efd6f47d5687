"""A model's identity for provenance and run digests: what changes when the weights change.

* catalog model: the pinned sha256 of its GGUF (a changed file is refused at pull time);
* hub id: ``id@commit`` (the commit the hub resolved for its config);
* local ``.gguf`` file or Hugging Face folder: the sha256 of the weight files, computed once and remembered by
  (path, size, mtime) under ``$REFUSAL_HOME/fingerprints.json`` so a later run does not hash gigabytes again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import io
from . import catalog

if TYPE_CHECKING:
    from .loading import ModelSource

_WEIGHTS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(f for pat in _WEIGHTS for f in path.glob(pat) if f.is_file())


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 over a file or a folder's weight files, cached by (path, size, mtime)."""
    path = Path(path).resolve()
    files = _files(path)
    stat = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps(stat).encode()).hexdigest()
    cache_file = catalog.refusal_home() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text("utf-8")) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = _sha256(files)
    cache[key] = digest
    try:
        io.write_json(cache_file, cache)
    except OSError:  # a read-only cache dir only costs a re-hash next time
        pass
    return digest


def model_identity(source: ModelSource, trust_remote_code: bool = False) -> str:
    """A string that changes when the model's weights change (see the module docs)."""
    if source.kind == "catalog":
        return f"sha256:{catalog.get(source.path).sha256}"
    if source.kind == "hub":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        return f"hub:{source.path}@{getattr(cfg, '_commit_hash', None) or 'unknown-revision'}"
    return f"sha256:{fingerprint(source.path)}"
