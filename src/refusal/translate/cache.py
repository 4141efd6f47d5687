"""A translation cache: one JSON file of (text, source, target, backend) → translation.

Only texts missing from the cache are sent to a backend, in chunks, and the file is rewritten atomically after each
chunk, so an interrupted run keeps what it translated. Once a set is translated, the run needs no backend at all
(pass the backend's name instead of the backend), and :meth:`TranslationCache.digest` names the exact translations
used, for provenance. Fixing a bad translation by hand is editing its entry in the file.

File layout::

    {"format": "refusal-translations/1",
     "entries": [{"text": ..., "source": "en", "target": "fr", "backend": "google:v2", "translation": ...}, ...]}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import RefusalError
from .backends import Translator

FORMAT = "refusal-translations/1"
Key = tuple[str, str, str, str]  # (text, source, target, backend)


class TranslationCache:
    """Translations keyed by (text, source language, target language, backend name); ``path=None`` keeps them in
    memory only."""

    def __init__(self, path: str | Path | None = None, chunk_size: int = 256):
        self.path = None if path is None else Path(path).expanduser()
        self.chunk_size = chunk_size
        self.entries: dict[Key, str] = self._read() if self.path is not None else {}
        self.calls = 0  # backend calls made through this cache (for tests and logs)
        self.sent = 0  # texts sent to backends

    def _read(self) -> dict[Key, str]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text("utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return {(e["text"], e["source"], e["target"], e["backend"]): e["translation"] for e in data["entries"]}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RefusalError(f"The translation cache '{self.path}' is not a valid cache file ({exc}).",
                               "Fix it, or move it away to start a new cache (its translations would be redone).") \
                from None

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def get(self, text: str, target: str, backend: str, source: str = "en") -> str | None:
        return self.entries.get((text, source, target, backend))

    def put(self, text: str, target: str, backend: str, translation: str, source: str = "en") -> None:
        self.entries[(text, source, target, backend)] = translation

    def missing(self, texts: list[str], target: str, backend: str, source: str = "en") -> list[str]:
        """The distinct texts (in first-seen order) that have no translation yet."""
        return [t for t in dict.fromkeys(texts) if (t, source, target, backend) not in self.entries]

    def translate(self, translator: Translator | str, texts: list[str], target: str, source: str = "en") -> list[str]:
        """Translations of ``texts``, asking ``translator`` only for texts not cached yet.

        ``translator`` may be a backend's name instead of a backend: then everything must be cached already (an
        offline, reproducible run), and a missing text is an error that says how many are missing."""
        backend = translator if isinstance(translator, str) else translator.name
        todo = self.missing(texts, target, backend, source)
        if todo and isinstance(translator, str):
            where = f"'{self.path}'" if self.path else "the in-memory cache"
            raise RefusalError(
                f"{len(todo)} of {len(set(texts))} texts have no cached {source}→{target} translation by "
                f"'{backend}' in {where} (first: {todo[0][:80]!r}).",
                "Run once with the translation backend available to fill the cache, or point to the cache file "
                "that holds these translations.",
            )
        for i in range(0, len(todo), self.chunk_size):
            assert not isinstance(translator, str)  # a backend's name only when nothing is missing (above)
            chunk = todo[i:i + self.chunk_size]
            got = translator.translate(chunk, target, source)
            self.calls += 1
            self.sent += len(chunk)
            if not isinstance(got, list) or len(got) != len(chunk) or not all(isinstance(g, str) for g in got):
                n = len(got) if isinstance(got, list) else type(got).__name__
                raise RefusalError(f"The translation backend '{backend}' returned {n} results for {len(chunk)} texts.",
                                   "A backend must return one string per text, in order.")
            for t, g in zip(chunk, got):
                self.entries[(t, source, target, backend)] = g
            self.save()
        return [self.entries[(t, source, target, backend)] for t in texts]

    def _records(self, entries: dict[Key, str] | None = None) -> list[dict]:
        entries = self.entries if entries is None else entries
        return [{"text": k[0], "source": k[1], "target": k[2], "backend": k[3], "translation": v}
                for k, v in sorted(entries.items())]

    def save(self) -> None:
        """Write the cache atomically, keeping entries that another process added to the file meanwhile."""
        if self.path is None:
            return
        from ..io import write_json  # atomic; imported here because refusal.io loads torch

        on_disk = self._read()
        merged = {**on_disk, **self.entries}
        self.entries = merged
        write_json(self.path, {"format": FORMAT, "entries": self._records(merged)})

    def digest(self, target: str | None = None, backend: str | None = None, texts: list[str] | None = None) -> str:
        """SHA-256 of the cache's content, independent of entry order: two caches with the same translations have
        the same digest. ``target``, ``backend`` and ``texts`` narrow it to the entries a run used."""
        wanted = None if texts is None else set(texts)
        chosen = {k: v for k, v in self.entries.items()
                  if (target is None or k[2] == target) and (backend is None or k[3] == backend)
                  and (wanted is None or k[0] in wanted)}
        blob = json.dumps(self._records(chosen), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()
