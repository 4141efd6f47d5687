"""Per-language prompt sets: PolyRefuse-style folders, per-language files, and the built-in sets translated."""

from __future__ import annotations

import json

import pytest

from refusal.data import builtin
from refusal.data.multilingual import (
    MultilingualSet,
    load_back_translations,
    load_language_files,
    load_polyrefuse,
    load_records,
    translate_builtin,
)
from refusal.errors import RefusalError
from refusal.translate import TranslationCache, check_translations

SIZES = {"train": 4, "val": 2, "test": 3}
LANGS = ("fr", "de")


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")


def _english(kind, split, i):
    return f"{kind} {split} prompt {i}"


@pytest.fixture
def poly(tmp_path):
    """A folder laid out like PolyRefuse (fr, de; English test only, with the test files carrying the English
    original beside the translation) and a paper-style English folder for train/val."""
    root, eng = tmp_path / "polyrefuse", tmp_path / "paper"
    for kind in ("harmful", "harmless"):
        for split, n in SIZES.items():
            for lang in LANGS:
                if split == "test":
                    rows = [{"instruction": _english(kind, split, i),
                             "instruction_translated": f"[{lang}] {_english(kind, split, i)}", "category": "c"}
                            for i in range(n)]
                else:
                    rows = [{"instruction": f"[{lang}] {_english(kind, split, i)}", "category": "c"} for i in range(n)]
                _write(root / f"{kind}_{split}_{lang}.json", rows)
            if split == "test":
                _write(root / f"{kind}_test_en.json",
                       [{"instruction": _english(kind, split, i), "instruction_translated": _english(kind, split, i),
                         "category": "c"} for i in range(n)])
            else:
                _write(eng / "splits" / f"{kind}_{split}.json",
                       [{"instruction": _english(kind, split, i), "category": "c"} for i in range(n)])
    _write(root / "harmful_test_back_translated_fr.json",
           [{"instruction": _english("harmful", "test", i), "instruction_translated": "x",
             "instruction_back_translated": f"back {i}"} for i in range(3)])
    return root, eng


def test_polyrefuse_folder_with_english_from_the_paper_folder(poly):
    root, eng = poly
    s = load_polyrefuse(root, ["en", "fr", "de"], english=eng)
    assert s.languages == ["en", "fr", "de"]
    for kind in ("harmful", "harmless"):
        for split, n in SIZES.items():
            sets = s.aligned(kind, split)
            assert {lang: len(rows) for lang, rows in sets.items()} == {"en": n, "fr": n, "de": n}
            for i in range(n):
                assert sets["en"][i]["instruction"] == _english(kind, split, i)
                assert sets["fr"][i]["instruction"] == f"[fr] {_english(kind, split, i)}"
    test_fr = s.get("fr", "harmful", "test")[1]
    assert test_fr == {"instruction": "[fr] harmful test prompt 1", "category": "c",
                       "source_instruction": "harmful test prompt 1", "language": "fr"}
    assert s.origin["en/harmful/train"].endswith("paper/splits/harmful_train.json")
    assert s.origin["fr/harmless/val"].endswith("polyrefuse/harmless_val_fr.json")
    # discovery: the languages with files, not the back-translation files
    assert load_polyrefuse(root, kinds=["harmful"], splits=["test"]).languages == ["de", "en", "fr"]
    assert load_back_translations(root, "fr") == ["back 0", "back 1", "back 2"]
    with pytest.raises(RefusalError, match="no back-translation file harmful_test_back_translated_de.json"):
        load_back_translations(root, "de")


def test_polyrefuse_missing_languages_and_splits_are_named(poly, tmp_path):
    root, eng = poly
    with pytest.raises(RefusalError, match=r"lacks 6 prompt file\(s\).*harmful_train_sw.json") as err:
        load_polyrefuse(root, ["fr", "sw"], english=eng)
    assert "harmless_test_sw.json" in str(err.value)
    with pytest.raises(RefusalError, match="harmful_train_en.json.*pass the paper's folder as the English source"):
        load_polyrefuse(root, ["en"])
    (root / "harmless_val_de.json").unlink()
    with pytest.raises(RefusalError, match=r"lacks 1 prompt file\(s\).*: harmless_val_de.json\."):
        load_polyrefuse(root, ["fr", "de"])
    assert load_polyrefuse(root, ["fr", "de"], kinds=["harmful"]).get("de", "harmful", "val")
    with pytest.raises(RefusalError, match="does not exist"):
        load_polyrefuse(tmp_path / "nowhere")
    with pytest.raises(RefusalError, match="Unknown split 'dev'"):
        load_polyrefuse(root, ["fr"], splits=["dev"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RefusalError, match="has no <kind>_<split>_<lang>.json files"):
        load_polyrefuse(empty)
    s = load_polyrefuse(root, ["fr"], kinds=["harmful"])
    with pytest.raises(RefusalError, match="No prompts were loaded for the language 'de'"):
        s.get("de", "harmful", "train")
    with pytest.raises(RefusalError, match="No harmless train prompts were loaded for 'fr'"):
        s.get("fr", "harmless", "train")


def test_alignment_is_checked(poly):
    root, eng = poly
    # a language with a different number of rows
    _write(root / "harmful_train_de.json", [{"instruction": "nur eins"}])
    s = load_polyrefuse(root, ["en", "fr", "de"], kinds=["harmful"], english=eng)
    with pytest.raises(RefusalError, match=r"differ in length across languages \(en 4, fr 4, de 1\)"):
        s.aligned("harmful", "train")
    assert set(s.aligned("harmful", "train", ["en", "fr"])) == {"en", "fr"}
    # the same number of rows, but another order: caught where the English originals are known
    rows = json.loads((root / "harmful_test_de.json").read_text())
    _write(root / "harmful_test_de.json", rows[::-1])
    s = load_polyrefuse(root, ["en", "fr", "de"], kinds=["harmful"], english=eng)
    with pytest.raises(RefusalError, match="Row 0 of the harmful test prompts is not the same prompt in 'en' and 'de'"):
        s.aligned("harmful", "test")


def test_one_file_per_language(tmp_path):
    fr = [{"instruction": "Écris un poème", "category": "w"}, "Trie une liste"]
    (tmp_path / "fr.json").write_text(json.dumps(fr))
    (tmp_path / "de.txt").write_text("Schreibe ein Gedicht\nSortiere eine Liste\n")
    (tmp_path / "en.csv").write_text("instruction,category\nWrite a poem,w\nSort a list,c\n")
    s = load_language_files({"fr": tmp_path / "fr.json", "de": str(tmp_path / "de.txt"),
                             "en": tmp_path / "en.csv"}, "harmless")
    sets = s.aligned("harmless")
    assert [r["instruction"] for r in sets["de"]] == ["Schreibe ein Gedicht", "Sortiere eine Liste"]
    assert sets["fr"][0] == {"instruction": "Écris un poème", "category": "w", "language": "fr"}
    harmful = load_language_files({"fr": tmp_path / "fr.json"}, "harmful", split="test")
    both = s.merge(harmful)
    assert isinstance(both, MultilingualSet) and both.get("fr", "harmful", "test") and both.get("fr", "harmless")
    with pytest.raises(RefusalError, match="does not exist"):
        load_language_files({"fr": tmp_path / "missing.json"}, "harmful")
    with pytest.raises(RefusalError, match="Unknown prompt kind"):
        load_language_files({"fr": tmp_path / "fr.json"}, "benign")
    with pytest.raises(RefusalError, match="No per-language prompt files"):
        load_language_files({}, "harmful")


def test_load_records_takes_the_translation_and_keeps_the_original(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps([{"instruction": "Hello", "instruction_translated": "Bonjour", "category": None}]))
    assert load_records(p) == [{"instruction": "Bonjour", "category": None, "source_instruction": "Hello"}]
    p.write_text(json.dumps([{"instruction": "Hello", "instruction_translated": "Bonjour"}, {"instruction": "Hi"}]))
    with pytest.raises(RefusalError, match="Row 1 .* has no 'instruction_translated'"):
        load_records(p)
    p.write_text("{broken")
    with pytest.raises(RefusalError, match="not valid JSON"):
        load_records(p)


class TagTranslator:
    name = "tag"

    def __init__(self):
        self.calls = []

    def translate(self, texts, target, source="en"):
        self.calls.append((len(texts), target))
        return [f"<{target}> {t}" for t in texts]


def test_translate_builtin_through_the_cache(tmp_path):
    harmful, harmless = builtin("harmful"), builtin("harmless")
    n_distinct = len({r["instruction"] for r in harmful}) + len({r["instruction"] for r in harmless})
    path = tmp_path / "translations.json"
    tr = TagTranslator()
    s = translate_builtin(tr, ["en", "fr", "sw"], path)
    assert sum(n for n, _ in tr.calls) == 2 * n_distinct  # fr and sw; English is the original
    assert {t for _, t in tr.calls} == {"fr", "sw"}
    sets = s.aligned("harmful")
    assert len(sets["fr"]) == len(harmful)
    assert sets["en"][0]["instruction"] == harmful[0]["instruction"]
    assert sets["sw"][5] == {"instruction": f"<sw> {harmful[5]['instruction']}", "category": harmful[5]["category"],
                             "source_instruction": harmful[5]["instruction"], "language": "sw"}
    assert s.get("fr", "harmless")[0]["instruction"] == f"<fr> {harmless[0]['instruction']}"
    assert "translated by tag (translations sha256 " in s.origin["fr/harmful/all"]

    # again, with one more language: only the new language is sent
    tr2 = TagTranslator()
    s2 = translate_builtin(tr2, ["fr", "sw", "de"], TranslationCache(path))
    assert {t for _, t in tr2.calls} == {"de"}
    assert s2.origin["fr/harmful/all"] == s.origin["fr/harmful/all"]  # same translations, same digest
    # offline: by the backend's name, from the cache alone
    s3 = translate_builtin("tag", ["fr", "de"], path, kinds=["harmless"])
    assert s3.get("de", "harmless")[0]["instruction"] == f"<de> {harmless[0]['instruction']}"
    with pytest.raises(RefusalError, match="have no cached en→th translation by 'tag'"):
        translate_builtin("tag", ["th"], path)
    # the quality checks run on the result (tagged English is not Thai script, nor French)
    rep = check_translations([r["source_instruction"] for r in sets["fr"]], [r["instruction"] for r in sets["fr"]],
                             "fr", langid=False)
    assert rep.flagged_share == 0.0  # Latin script and changed: only langid could tell
