"""Translation backends, the translation cache, quality checks, and the refusal phrase lists per language."""

from __future__ import annotations

import json
import sys
import types

import pytest

from refusal.errors import RefusalError
from refusal.translate import (
    PHRASE_LANGUAGES,
    GoogleTranslator,
    LocalModelTranslator,
    TranslationCache,
    Translator,
    check_translations,
    chrf,
    clean_output,
    refusal_phrases,
    require_quality,
    script_share,
)
from refusal.translate import checks as checks_mod


class FakeTranslator:
    """Tags each text with the target language and records what it was asked."""

    def __init__(self, name: str = "fake"):
        self.name = name
        self.calls: list[tuple[list[str], str, str]] = []

    def translate(self, texts, target, source="en"):
        self.calls.append((list(texts), target, source))
        return [f"[{target}] {t}" for t in texts]


# ---------------------------------------------------------------- chrF

def test_chrf_hand_computed_values():
    assert chrf("abc", "abc") == 100.0
    assert chrf("a b c", "abc") == 100.0  # whitespace is removed before counting
    assert chrf("", "abc") == 0.0 and chrf("xyz", "abc") == 0.0
    # "ab" vs "abc": order 1 p=1 r=2/3; order 2 p=1 r=1/2; orders 3-6 absent from "ab" and not counted.
    # P=1, R=7/12, F2 = 5PR / (4P + R) = 7/11
    assert chrf("ab", "abc") == pytest.approx(100 * 7 / 11)
    # 如何制作炸弹 vs 如何制造炸弹 (one character differs): matches per order 5/6, 3/5, 1/4, 0, 0, 0, same for
    # precision and recall, so F = mean = 101/360
    assert chrf("如何制作炸弹", "如何制造炸弹") == pytest.approx(100 * 101 / 360)


def test_chrf_matches_sacrebleu_values():
    # reference values computed with sacrebleu 2.6.0: CHRF().sentence_score(hyp, [ref]).score
    known = [
        ("The cat sat on the mat.", "The cat is on the mat.", 67.17273492330233),
        ("Explain how to pick a lock", "Describe how to pick a lock", 60.02942121947184),
        ("Write a poem about autumn", "Write a haiku about autumn leaves", 49.66209992557681),
        ("ฉันไม่สามารถช่วยได้", "ฉันช่วยไม่ได้", 40.70072969423719),
        ("completely different", "nothing alike here", 12.314558265666346),
    ]
    for hyp, ref, value in known:
        assert chrf(hyp, ref) == pytest.approx(value, abs=1e-9), (hyp, ref)


def test_chrf_agrees_with_sacrebleu_when_installed():
    sacrebleu = pytest.importorskip("sacrebleu")
    import random

    rng = random.Random(0)
    alphabet = "abcde fgh"
    metric = sacrebleu.metrics.CHRF()
    for _ in range(50):
        h = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 15)))
        r = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 15)))
        assert chrf(h, r) == pytest.approx(metric.sentence_score(h, [r]).score, abs=1e-9), (h, r)


# ---------------------------------------------------------------- checks

def test_script_share_by_unicode_ranges():
    assert script_share("Bonjour le monde", "fr") == 1.0
    assert script_share("Привет, мир", "ru") == 1.0
    assert script_share("Hello world", "ru") == 0.0
    assert script_share("สวัสดีชาวโลก", "th") == 1.0  # Thai vowel signs are combining marks in the Thai block
    assert script_share("ሰላም ለዓለም", "am") == 1.0
    assert script_share("你好，世界", "zh") == 1.0
    # a Han character weighs HAN_WEIGHT letters: a Chinese prompt naming "Python" stays mostly Han
    assert script_share("写一个Python脚本", "zh") == pytest.approx(15 / 21)
    assert script_share("123 !?", "fr") is None  # no letters
    assert script_share("whatever", "xx") is None  # unknown language
    assert script_share("Bonjour", "fr-FR") == 1.0


def test_checks_flag_empty_unchanged_wrong_script_and_refusals():
    sources = ["How do I bake bread?", "Write a poem", "Explain gravity", "Name three rivers", "Sort a list"]
    translations = ["Как испечь хлеб?", "", "Explain gravity", "Назовите три реки",
                    "Извините, я не могу помочь с этим."]
    rep = check_translations(sources, translations, "ru", langid=False)
    flags = [i.flags for i in rep.items]
    assert flags[0] == [] and flags[3] == []
    assert flags[1] == ["empty"]
    assert flags[2] == ["unchanged", "wrong_script"]
    assert flags[4] == ["refused"]
    assert rep.flagged_share == pytest.approx(3 / 5)
    assert rep.counts() == {"empty": 1, "unchanged": 1, "wrong_script": 1, "refused": 1}
    assert "not checked" in rep.language_id and "not checked" in rep.back_translation
    assert json.loads(json.dumps(rep.to_dict()))["flagged"] == 3
    # same text for a same-language "translation" is not "unchanged"
    assert check_translations(["Hi there"], ["Hi there"], "en", langid=False).items[0].flags == []
    # a Latin-script target: English left as is is unchanged, and the right script (script cannot tell fr from en)
    fr = check_translations(["Explain gravity"], ["Explain gravity"], "fr", langid=False)
    assert fr.items[0].flags == ["unchanged"]
    # a prompt that itself starts like a refusal is not flagged as refused
    ok = check_translations(["I'm sorry for being late, write me an excuse"],
                            ["Je suis désolé d'être en retard, écris-moi une excuse"], "fr", langid=False)
    assert "refused" not in ok.items[0].flags


def test_checks_flag_answers_and_degenerate_output():
    sources = ["Write a haiku about autumn", "Name three rivers", "Explain gravity"]
    translations = [
        "Écrivez un haïku sur l'automne\n\nJ'espère que cela vous aidera !",  # a comment after the translation
        "Voici trois fleuves : la Seine, la Loire et le Rhône. La Seine traverse Paris, la Loire est le plus long "
        "fleuve de France et le Rhône prend sa source en Suisse.",  # an answer instead of a translation
        "na mimi na mimi na mimi na mimi na mimi na mimi na mimi na mimi na mimi",  # a looping model
    ]
    rep = check_translations(sources, translations, "fr", langid=False)
    assert rep.items[0].flags == ["extra_text"]
    assert rep.items[1].flags == ["too_long"]
    assert "repetitive" in rep.items[2].flags
    # Chinese is short in characters: a Han character counts HAN_WEIGHT times against the length limit, so a
    # 30-character answer to a 17-letter prompt is too long, and its translation is not
    answer = "长江、黄河和珠江是中国的三条大河，长江是亚洲最长的河流，黄河被称为母亲河。"
    zh = check_translations(["Name three rivers"] * 2, ["说出三条河流", answer], "zh", langid=False)
    assert zh.items[0].flags == [] and zh.items[1].flags == ["too_long"]


def test_back_translation_chrf_flags_drifted_meaning():
    sources = ["Describe how to grow tomatoes at home", "Write a story about a dragon"]
    back = ["Describe how to grow tomatoes at home.", "Make a list of prime numbers"]
    rep = check_translations(sources, ["Beschreibe, wie man zu Hause Tomaten anbaut", "Erstelle eine Liste"],
                             "de", back, langid=False)
    assert rep.items[0].back_chrf > 90 and "low_back_chrf" not in rep.items[0].flags
    assert rep.items[1].back_chrf < 25 and rep.items[1].flags == ["low_back_chrf"]
    assert rep.back_translation.startswith("checked with chrF2")
    with pytest.raises(RefusalError, match="back-translations"):
        check_translations(sources, ["a", "b"], "de", back[:1], langid=False)
    with pytest.raises(RefusalError, match="1 translations were given for 2"):
        check_translations(sources, ["a"], "de", langid=False)


def test_langid_missing_is_reported_not_passed(monkeypatch):
    def no_langid():
        raise ImportError("No module named 'langid'")

    monkeypatch.setattr(checks_mod, "_langid_identifier", no_langid)
    rep = check_translations(["Explain gravity"], ["Explain gravity in French, please"], "fr")
    assert rep.language_id.startswith("not checked") and "pip install langid" in rep.language_id
    assert rep.items[0].language is None
    assert "not checked" in rep.summary()


def test_langid_verdicts_when_installed():
    pytest.importorskip("langid")
    sources = ["How can I improve my sleep?", "Write a short story about a lighthouse keeper"]
    translations = ["Comment puis-je améliorer mon sommeil ?", "Write a short story about a keeper of lighthouses"]
    rep = check_translations(sources, translations, "fr")
    assert rep.language_id.startswith("checked with langid")
    assert rep.items[0].language == "fr" and rep.items[0].flags == []
    assert rep.items[1].language == "en" and rep.items[1].flags == ["wrong_language"]
    # a language langid has no model for is reported, not passed
    assert check_translations(["x"], ["abc"], "tlh").language_id.startswith("not checked")


def test_require_quality_threshold_and_allow():
    rep = check_translations(["a b", "c d", "e f", "g h"], ["", "x y", "z w", "v u"], "fr", langid=False)
    assert rep.flagged_share == 0.25
    assert require_quality(rep, max_flagged_share=0.25) is rep
    with pytest.raises(RefusalError, match=r"25.0% of the fr translations are flagged.*#0: empty"):
        require_quality(rep, max_flagged_share=0.1)
    assert require_quality(rep, max_flagged_share=0.1, allow=True) is rep


# ---------------------------------------------------------------- cache

def test_cache_sends_only_missing_texts_and_persists(tmp_path):
    path = tmp_path / "cache" / "translations.json"
    fake = FakeTranslator()
    cache = TranslationCache(path)
    assert isinstance(fake, Translator)
    out = cache.translate(fake, ["a", "b", "a"], "fr")
    assert out == ["[fr] a", "[fr] b", "[fr] a"]
    assert fake.calls == [(["a", "b"], "fr", "en")]  # duplicates sent once
    out = cache.translate(fake, ["b", "c"], "fr")
    assert out == ["[fr] b", "[fr] c"] and fake.calls[-1] == (["c"], "fr", "en")
    cache.translate(fake, ["a"], "de")  # another target is another key
    assert fake.calls[-1] == (["a"], "de", "en")
    other = FakeTranslator("other")
    cache.translate(other, ["a"], "fr")  # another backend too
    assert other.calls == [(["a"], "fr", "en")]

    data = json.loads(path.read_text("utf-8"))
    assert data["format"] == "refusal-translations/1" and len(data["entries"]) == 5
    assert not list(path.parent.glob(".*.tmp"))  # atomic write leaves no temporary file

    # a new process: everything is cached, the backend is not needed (offline by name)
    again = TranslationCache(path)
    assert again.translate("fake", ["c", "a"], "fr") == ["[fr] c", "[fr] a"]
    fresh = FakeTranslator()
    assert again.translate(fresh, ["a", "b", "c"], "fr") == ["[fr] a", "[fr] b", "[fr] c"] and fresh.calls == []
    with pytest.raises(RefusalError, match="1 of 2 texts have no cached en→fr translation by 'fake'"):
        again.translate("fake", ["a", "zzz"], "fr")


def test_cache_digest_is_content_addressed(tmp_path):
    a, b = TranslationCache(), TranslationCache(tmp_path / "c.json")
    a.translate(FakeTranslator(), ["x", "y"], "fr")
    b.translate(FakeTranslator(), ["y"], "fr")
    b.translate(FakeTranslator(), ["x"], "fr")
    assert a.digest() == b.digest() == TranslationCache(tmp_path / "c.json").digest()
    before = b.digest()
    b.put("x", "fr", "fake", "corrigé à la main")
    assert b.digest() != before
    assert a.digest(target="fr", backend="fake", texts=["y"]) == b.digest(target="fr", backend="fake", texts=["y"])
    assert a.digest(target="de") == TranslationCache().digest()
    assert len(a.digest()) == 64


def test_cache_chunks_saves_and_rejects_bad_backends(tmp_path):
    path = tmp_path / "c.json"
    cache = TranslationCache(path, chunk_size=2)
    fake = FakeTranslator()
    cache.translate(fake, ["a", "b", "c", "d", "e"], "fr")
    assert [c[0] for c in fake.calls] == [["a", "b"], ["c", "d"], ["e"]] and cache.calls == 3 and cache.sent == 5

    class Short:
        name = "short"

        def translate(self, texts, target, source="en"):
            return texts[:-1]

    with pytest.raises(RefusalError, match="returned 1 results for 2 texts"):
        cache.translate(Short(), ["p", "q"], "fr")

    path.write_text("{not json")
    with pytest.raises(RefusalError, match="not a valid cache file"):
        TranslationCache(path)
    path.write_text(json.dumps({"format": "something-else/9", "entries": []}))
    with pytest.raises(RefusalError, match="not a valid cache file"):
        TranslationCache(path)


def test_cache_keeps_entries_another_process_wrote(tmp_path):
    path = tmp_path / "c.json"
    one, two = TranslationCache(path), TranslationCache(path)
    one.translate(FakeTranslator(), ["a"], "fr")
    two.translate(FakeTranslator(), ["b"], "fr")
    assert TranslationCache(path).translate("fake", ["a", "b"], "fr") == ["[fr] a", "[fr] b"]


# ---------------------------------------------------------------- local model backend

def test_clean_output_strips_lead_ins_quotes_and_notes():
    assert clean_output("Translation: Bonjour le monde", "Hello world") == "Bonjour le monde"
    assert clean_output("Sure! Here's the French translation:\n\n« Bonjour le monde »", "Hello world") == \
        "Bonjour le monde"
    assert clean_output("French translation: \"Bonjour\"", "Hello") == "Bonjour"
    assert clean_output("Traduction : Bonjour", "Hello") == "Bonjour"
    assert clean_output("翻译：你好", "Hello") == "你好"
    assert clean_output("“Hola mundo”", "Hello world") == "Hola mundo"
    assert clean_output("<think>The user wants Spanish.</think>\nHola", "Hello") == "Hola"
    assert clean_output("<think>still thinking", "Hello") == ""
    assert clean_output("```\nПривет\n```", "Hello") == "Привет"
    assert clean_output("Hallo Welt\n\nNote: I kept the tone informal.", "Hello world") == "Hallo Welt"
    # lead-in lines and comments on the translation, in the target language (seen from a real 1.5B chat model)
    assert clean_output("Voici la traduction en français de la scène de thriller demandée :\n\n\"Écrivez une "
                        "scène\"", "Write a scene") == "Écrivez une scène"
    assert clean_output("Hier ist die deutsche Übersetzung des angegebenen Textes:\n\nSchreibe ein Gedicht\n\n"
                        "Diese Übersetzung behält den Ton bei.", "Write a poem") == "Schreibe ein Gedicht"
    assert clean_output("Вот перевод текста на русский язык:\n\n«Напишите стихотворение»", "Write a poem") == \
        "Напишите стихотворение"
    # other added text stays, for the checks to flag (extra_text / too_long): hiding it would hide a failure
    assert clean_output("Hallo Welt\n\nIch hoffe, das hilft!", "Hello world") == "Hallo Welt\n\nIch hoffe, das hilft!"
    assert clean_output("Énumérez trois fruits :\n- pomme", "List three fruits:\n- apple") == \
        "Énumérez trois fruits :\n- pomme"
    # kept: quotes the source has too, quoted parts inside, and paragraphs the source has
    assert clean_output('"Bonjour"', '"Hello"') == '"Bonjour"'
    assert clean_output('"A" et "B"', 'Say "A" and "B"') == '"A" et "B"'
    assert clean_output("Un\n\nDeux", "One\n\nTwo") == "Un\n\nDeux"
    assert clean_output("Translation: de la phrase", "Translation: of the sentence") == "Translation: de la phrase"


def test_local_translator_prompt_and_cleaning(monkeypatch, tokenizer):
    import refusal.generation.batched as batched

    seen = {}

    def fake_generate(model, tok, prompts, *, max_new_tokens, batch_size, description, **kw):
        seen.update(prompts=list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size)
        return [f"Translation: « FR{i} »" for i in range(len(prompts))]

    monkeypatch.setattr(batched, "generate", fake_generate)
    model = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path="org/some-chat-model"))
    tr = LocalModelTranslator(model, tokenizer, batch_size=3, max_new_tokens=40)
    out = tr.translate(["Hello", "", "World", "Hello"], "fr")
    assert out == ["FR0", "", "FR1", "FR0"]  # empty texts are not sent, duplicates once
    assert len(seen["prompts"]) == 2 and seen["batch_size"] == 3 and seen["max_new_tokens"] == 40
    p = seen["prompts"][0]
    assert p.startswith("<|im_start|>user\n") and p.endswith("<|im_start|>assistant\n")
    assert "from English into French" in p and "Do not answer it" in p and p.count("Hello") == 1
    assert tr.name.startswith("local:org/some-chat-model:prompt-")
    other = LocalModelTranslator(model, tokenizer, prompt="Into {target}: {text}")
    assert other.name != tr.name and other.name.startswith("local:org/some-chat-model:prompt-")
    with pytest.raises(RefusalError, match="no {text} placeholder"):
        LocalModelTranslator(model, tokenizer, prompt="Translate into {target}")


def test_local_translator_runs_a_tiny_model_in_batches(tokenizer):
    from conftest import build_model

    model = build_model("qwen2", len(tokenizer), n_layers=1)
    sizes = []
    real = model.generate

    def counting(*args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    model.generate = counting
    tr = LocalModelTranslator(model, tokenizer, batch_size=2, max_new_tokens=4)
    texts = ["Write a poem", "Explain gravity", "Sort a list", "Name a river", "Bake bread"]
    out = tr.translate(texts, "de")
    assert sizes == [2, 2, 1]  # five distinct texts in batches of two
    assert len(out) == 5 and all(isinstance(t, str) for t in out)
    assert tr.name.startswith("local:Qwen2ForCausalLM:prompt-")
    assert set(tr.truncated) <= set(texts)


# ---------------------------------------------------------------- Google backend (mocked: no API is reachable)

def _fake_google(monkeypatch, v2_client=None, v3_client=None):
    google = types.ModuleType("google")
    cloud = types.ModuleType("google.cloud")
    v2 = types.ModuleType("google.cloud.translate_v2")
    v3 = types.ModuleType("google.cloud.translate_v3")
    v2.Client = lambda: v2_client
    v3.TranslationServiceClient = lambda: v3_client
    google.cloud, cloud.translate_v2, cloud.translate_v3 = cloud, v2, v3
    for name, mod in (("google", google), ("google.cloud", cloud), ("google.cloud.translate_v2", v2),
                      ("google.cloud.translate_v3", v3)):
        monkeypatch.setitem(sys.modules, name, mod)


class FakeV2:
    def __init__(self):
        self.calls = []

    def translate(self, values, target_language, source_language, format_, **kw):
        self.calls.append(dict(values=list(values), target=target_language, source=source_language, format_=format_))
        return [{"translatedText": f"<{target_language}>{v}", "input": v} for v in values]


class FakeV3:
    def __init__(self):
        self.requests = []

    def translate_text(self, request):
        self.requests.append(request)
        items = [types.SimpleNamespace(translated_text=f"<{request['target_language_code']}>{c}")
                 for c in request["contents"]]
        return types.SimpleNamespace(translations=items)


def test_google_v2_with_a_mocked_client(monkeypatch, tmp_path):
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account", "project_id": "proj-1", "private_key": "SECRET"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    client = FakeV2()
    _fake_google(monkeypatch, v2_client=client)
    g = GoogleTranslator(batch_size=2)
    assert g.name == "google:v2"
    assert g.translate(["a", "b", "c"], "zh") == ["<zh-CN>a", "<zh-CN>b", "<zh-CN>c"]
    assert [c["values"] for c in client.calls] == [["a", "b"], ["c"]]
    assert client.calls[0]["format_"] == "text" and client.calls[0]["source"] == "en"
    cache = TranslationCache()
    assert cache.translate(g, ["a", "d"], "fr") == ["<fr>a", "<fr>d"]


def test_google_v3_with_a_mocked_client(monkeypatch, tmp_path):
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account", "project_id": "proj-1", "private_key": "SECRET"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    client = FakeV3()
    _fake_google(monkeypatch, v3_client=client)
    g = GoogleTranslator("v3")
    assert g.translate(["hello", "world"], "sw") == ["<sw>hello", "<sw>world"]
    req = client.requests[0]
    assert req["parent"] == "projects/proj-1/locations/global" and req["mime_type"] == "text/plain"
    assert req["source_language_code"] == "en" and req["contents"] == ["hello", "world"]


def test_google_errors_are_clear_and_never_show_credentials(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "google.cloud.translate_v2", None)  # the package is not installed
    with pytest.raises(RefusalError, match="google-cloud-translate") as err:
        GoogleTranslator().translate(["a"], "fr")
    assert "pip install" in err.value.fix

    _fake_google(monkeypatch, v2_client=FakeV2())
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with pytest.raises(RefusalError, match="GOOGLE_APPLICATION_CREDENTIALS is not set"):
        GoogleTranslator().translate(["a"], "fr")

    secret_path = tmp_path / "secret-key-location.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(secret_path))
    with pytest.raises(RefusalError, match="does not exist") as err:
        GoogleTranslator().translate(["a"], "fr")
    assert "secret-key-location" not in str(err.value)

    secret_path.write_text(json.dumps({"type": "service_account", "private_key": "SECRET-KEY"}))
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    _fake_google(monkeypatch, v3_client=FakeV3())
    with pytest.raises(RefusalError, match="needs a Google Cloud project") as err:
        GoogleTranslator("v3").translate(["a"], "fr")
    assert "SECRET-KEY" not in str(err.value)

    class Failing:
        def translate(self, *a, **k):
            raise PermissionError("403 Cloud Translation API has not been used in project")

    with pytest.raises(RefusalError, match="Google Cloud Translation failed \\(PermissionError"):
        GoogleTranslator(client=Failing()).translate(["a"], "fr")
    with pytest.raises(RefusalError, match="Unknown Google Cloud Translation API version"):
        GoogleTranslator("v9")


# ---------------------------------------------------------------- refusal phrases per language

def test_phrase_files_have_the_documented_shape():
    for lang in PHRASE_LANGUAGES:
        d = refusal_phrases(lang)
        assert set(d) == {"language", "phrases", "refusal_openings", "confidence", "notes"}, lang
        assert d["language"] == lang and d["confidence"] in ("high", "medium", "low") and d["notes"].strip()
        assert len(d["phrases"]) >= 15 and len(d["refusal_openings"]) >= 5, lang
        assert len(set(d["phrases"])) == len(d["phrases"]), lang
        assert all(p.strip() == p and p for p in d["phrases"] + d["refusal_openings"]), lang
    assert refusal_phrases("sw")["confidence"] == refusal_phrases("am")["confidence"] == "low"
    assert refusal_phrases("zh-CN")["language"] == "zh"
    with pytest.raises(RefusalError, match="No refusal phrase list ships for the language 'xx'"):
        refusal_phrases("xx")


def test_english_phrase_file_matches_the_builtin_list():
    from refusal.templates import builtin_phrases

    en, base = refusal_phrases("en"), builtin_phrases()
    assert en["phrases"] == base["phrases"] and en["refusal_openings"] == base["refusal_openings"]


def test_phrases_are_written_in_their_language_script():
    for lang in PHRASE_LANGUAGES:
        d = refusal_phrases(lang)
        for p in d["phrases"] + d["refusal_openings"]:
            share = script_share(p.replace("AI", ""), lang)  # "AI" is written in Latin letters everywhere
            assert share is None or share == 1.0, (lang, p)
    # variants that substring matching needs: apostrophes, cases, genders
    fr = refusal_phrases("fr")["phrases"]
    assert {"Je ne peux pas", "je ne peux pas", "En tant qu'IA", "En tant qu’IA", "Je suis désolée"} <= set(fr)
    de = refusal_phrases("de")["phrases"]
    assert {"kann ich nicht", "Leider kann ich"} <= set(de)  # German verb-second order


def test_phrases_catch_typical_refusals_and_pass_ordinary_answers():
    refusals = {
        "fr": ["Je suis désolé, mais je ne peux pas vous aider avec cela.", "Désolée, mais c'est illégal.",
               "En tant qu’IA, je ne peux pas fournir ces informations."],
        "de": ["Es tut mir leid, aber dabei kann ich Ihnen nicht helfen.",
               "Leider kann ich Ihnen bei dieser Anfrage nicht helfen.",
               "Ich kann Ihnen nicht helfen, das Navigationssystem eines Verkehrsflugzeugs zu sabotieren."],
        "es": ["Lo siento, pero no puedo ayudarte con eso.", "Como modelo de lenguaje, no me es posible hacerlo.",
               "Como asistente de inteligencia artificial, no tengo la capacidad de manipular emociones."],
        "ru": ["Извините, но я не могу помочь с этим запросом.", "К сожалению, я не могу выполнить эту просьбу."],
        "zh": ["抱歉，我无法提供这方面的帮助。", "作为一个AI语言模型，我不能协助此类请求。"],
        "th": ["ขออภัย ฉันไม่สามารถช่วยเรื่องนี้ได้", "ขออภัยค่ะ ไม่สามารถให้ข้อมูลนี้ได้",
               # seen from Qwen2.5-Coder-1.5B-Instruct: subject-less refusals
               "ไม่สามารถเขียนแถลงการณ์เรียกร้องให้คนงานสหภาพออกมาประท้วงได้", "ไม่สามารถอธิบายการกระทำทางเพศได้อย่างละเอียดได้."],
        "sw": ["Samahani, siwezi kukusaidia na ombi hili.", "Kwa bahati mbaya, sitaweza kutoa maelezo hayo."],
        "am": ["ይቅርታ፣ በዚህ ጉዳይ ልረዳዎት አልችልም።"],
    }
    answers = {
        "fr": "Voici une recette de pain : mélangez la farine, l'eau et le sel.",
        "es": "Aquí tienes una receta de pan: mezcla la harina, el agua y la sal.",
        "de": "Hier ist ein Brotrezept: Mischen Sie Mehl, Wasser und Salz.",
        "ru": "Вот рецепт хлеба: смешайте муку, воду и соль.",
        "zh": "这是一个面包食谱：将面粉、水和盐混合。",
        "th": "นี่คือสูตรขนมปัง: ผสมแป้ง น้ำ และเกลือเข้าด้วยกัน",
        "sw": "Hii ni mapishi ya mkate: changanya unga, maji na chumvi.",
        "am": "ይህ የዳቦ አሰራር ነው፡ ዱቄት፣ ውሃ እና ጨው ቀላቅሉ።",
    }
    for lang, texts in refusals.items():
        phrases = refusal_phrases(lang)["phrases"]
        for t in texts:
            assert any(p in t for p in phrases), (lang, t)
        assert not any(p in answers[lang] for p in phrases), lang


def test_langid_recognises_each_phrase_list():
    pytest.importorskip("langid")
    for lang in PHRASE_LANGUAGES:
        text = ". ".join(refusal_phrases(lang)["phrases"])
        status, guesses = checks_mod.identify_languages([text], lang)
        assert status.checked and guesses[0][1], (lang, guesses)

