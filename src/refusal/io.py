"""Atomic artifact writes: a file either exists complete or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import DamagedFileError

if TYPE_CHECKING:
    import torch


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it
FILE_MODE = 0o666 & ~_UMASK  # what a plain open() gives: mkstemp makes 0600, mkdtemp 0700
DIR_MODE = 0o777 & ~_UMASK


def share(path: str | Path) -> None:
    """Give a written file, or a folder and everything in it, the permissions the user's umask gives new files
    (temporary files and folders are made private; what is exported is meant to be shared)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, DIR_MODE)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                if not os.path.islink(os.path.join(root, d)):
                    os.chmod(os.path.join(root, d), DIR_MODE)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), FILE_MODE)
    elif path.is_file() and not path.is_symlink():
        os.chmod(path, FILE_MODE)


def _atomic(path: Path, write: Callable[[Any], object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)  # the permissions a plain open() would give, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def png_bytes(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (110 dpi, every plot of a run); the figure is closed."""
    from io import BytesIO

    import matplotlib.pyplot as plt

    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_png(path: Path, fig: Any) -> None:
    """Write a matplotlib figure as PNG, atomically (see :func:`png_bytes`)."""
    write_bytes(Path(path), png_bytes(fig))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file; a truncated or garbage one raises :class:`DamagedFileError` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedFileError(path, f"not valid JSON: {_first_line(exc)}") from None


def write_yaml(path: Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def read_yaml(path: Path) -> Any:
    """A YAML file; a garbage one raises :class:`DamagedFileError` naming it."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DamagedFileError(path, f"not valid YAML: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Save tensors as safetensors, atomically (as :func:`_atomic`: parent folders made, synced, then renamed);
    ``metadata`` values are JSON-encoded into the header."""
    from safetensors.torch import save

    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda f: f.write(_canonical(save(tensors, metadata=meta))))


def _canonical(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: the library writes the metadata map in hash
    order, which differs from process to process, so equal tensors and metadata would not give equal bytes."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data stays 8-byte aligned, as the format asks
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON metadata of a safetensors file; a truncated or foreign one raises
    :class:`DamagedFileError` naming it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return load_file(str(path)), meta
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedFileError(path, f"not a complete safetensors file: {_first_line(exc)}") from None
