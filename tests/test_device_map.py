"""A model split across devices by accelerate gives the same results as the same model in one piece.

There is one CPU here, so the split is CPU + disk (``from_pretrained(device_map=..., offload_folder=...)``: a layer's
weights live in files and sit on ``meta`` between forwards) and CPU offload (``accelerate.cpu_offload``: every
weight on ``meta``, refilled from an in-memory copy at each forward). Either way the model runs through accelerate's
hooks, with parameters that are not where the computation happens, as on several GPUs. A layer's input arriving on
another device than the layer's is simulated by making the layers report the ``meta`` device.
"""

from __future__ import annotations

import pytest
import torch

from refusal import extract, find_parts, format_prompts, post_instruction_ids
from refusal.data import builtin
from refusal.errors import RefusalError
from refusal.interventions import Plan, ablation, addition
from refusal.interventions.weights import orthogonalize_, orthogonalized
from refusal.models.loading import _max_memory, load_model, max_memory_map
from refusal.models.parts import execution_device, is_dispatched, layer_devices, model_device, resident_tensor
from refusal.scoring.engine import last_logits, score_candidates
from refusal.scoring.refusal import refusal_token_ids
from refusal.templates import tokenize

HARMFUL = [r["instruction"] for r in builtin("harmful")[:6]]
HARMLESS = [r["instruction"] for r in builtin("harmless")[:5]]

DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(autouse=True)
def _one_thread():
    """accelerate's hooks add many tiny ops per forward; on a busy shared CPU one thread is several times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def plain(model_dir):
    model, tok = load_model(str(model_dir), device="cpu", dtype="float32")
    return model, tok


@pytest.fixture
def disk_split(model_dir, tmp_path):
    """The same folder loaded with layer 1 offloaded to disk (the others on the CPU), through load_model."""
    model, tok = load_model(str(model_dir), device="cpu", dtype="float32", device_map=DISK_MAP,
                            offload_folder=tmp_path / "offload")
    return model, tok


def _cpu_offloaded(model_dir):
    from accelerate import cpu_offload

    model, tok = load_model(str(model_dir), device="cpu", dtype="float32")
    cpu_offload(model, execution_device="cpu")
    return model, tok


@pytest.fixture(params=["disk", "cpu_offload"])
def split(request, model_dir, tmp_path):
    if request.param == "disk":
        return request.getfixturevalue("disk_split")
    return _cpu_offloaded(model_dir)


def _prompts(tok):
    return format_prompts(tok, HARMFUL), format_prompts(tok, HARMLESS)


def test_load_model_places_the_model_by_the_device_map(disk_split):
    model, _ = disk_split
    assert model.hf_device_map["model.layers.1"] == "disk" and is_dispatched(model)
    parts = find_parts(model)
    assert all(p.device.type == "meta" for p in parts.layers[1].parameters())
    assert all(p.device.type == "cpu" for p in parts.layers[0].parameters())
    assert execution_device(parts.layers[1]) == torch.device("cpu")
    assert model_device(model) == torch.device("cpu")
    assert layer_devices(model) == [torch.device("cpu")] * 3


def test_model_device_of_a_fully_offloaded_model(model_dir):
    model, _ = _cpu_offloaded(model_dir)
    assert find_parts(model).embed.weight.device.type == "meta"
    assert model_device(model) == torch.device("cpu")
    o_proj = find_parts(model).attn_out_proj(0)
    assert resident_tensor(o_proj, "weight").device.type == "cpu"  # the in-memory copy accelerate refills from


def test_max_memory_from_free_memory(monkeypatch):
    free = {0: 80 * 2**30, 1: 60 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 141 * 2**30))
    got = max_memory_map(0.5)
    assert got[0] == 40 * 2**30 and got[1] == 30 * 2**30 and got["cpu"] > 0
    assert _max_memory("auto", None, 0.9)[1] == int(60 * 2**30 * 0.9)
    assert _max_memory("auto", {0: "10GiB"}, 0.9) == {0: "10GiB"}  # an explicit dict as given
    assert _max_memory("auto", 0.5, 0.9)[0] == 40 * 2**30  # a number is the fraction
    assert _max_memory(DISK_MAP, None, 0.9) is None  # an explicit device map needs no budget
    for bad in (0.0, 1.5, -1):
        with pytest.raises(RefusalError, match="max_memory_fraction"):
            max_memory_map(bad)
    with pytest.raises(RefusalError, match="max_memory"):
        _max_memory("auto", "70GiB", 0.9)


def test_load_model_with_auto_device_map_on_cpu(model_dir, plain, monkeypatch):
    """``device_map="auto"`` with the memory budget from the free memory: here everything lands on the CPU."""
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model, tok = load_model(str(model_dir), device="cpu", dtype="float32", device_map="auto",
                            max_memory_fraction=0.8)
    assert seen["device_map"] == "auto" and set(seen["max_memory"]) == {"cpu"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    b = tokenize(tok, format_prompts(tok, HARMFUL[:2]), "cpu")
    torch.testing.assert_close(last_logits(model, b.input_ids, b.attention_mask),
                               last_logits(plain[0], b.input_ids, b.attention_mask))


def test_split_model_gives_the_same_candidates(plain, split):
    n_pos = len(post_instruction_ids(plain[1]))
    hp, bp = _prompts(plain[1])
    want = extract(plain[0], plain[1], hp, bp, n_pos, batch_size=4)
    got = extract(split[0], split[1], hp, bp, n_pos, batch_size=4)
    torch.testing.assert_close(got.harmful_mean, want.harmful_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.diffs, want.diffs, rtol=1e-4, atol=1e-5)


def test_split_model_gives_the_same_selection_scores(plain, split):
    model, tok = plain
    n_pos = len(post_instruction_ids(tok))
    hp, bp = _prompts(tok)
    cands = extract(model, tok, hp, bp, n_pos)
    hv, bv = hp[:3], bp[:3]
    rids = refusal_token_ids(tok)
    want = score_candidates(model, tok, cands, hv, bv, rids, batch_size=64)
    got = score_candidates(split[0], split[1], cands, hv, bv, rids, batch_size=64)
    for key in ("bypass", "induce", "kl"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=1e-3, atol=1e-4, equal_nan=True)
    assert not want.induce[:, 1:].isnan().all()


def _direction(model, tok):
    n_pos = len(post_instruction_ids(tok))
    hp, bp = _prompts(tok)
    return extract(model, tok, hp, bp, n_pos).direction(-1, 1)


def test_split_model_generates_the_same_tokens(plain, split):
    from refusal.generation.batched import generate

    model, tok = plain
    prompts = format_prompts(tok, HARMFUL[:3] + HARMLESS[:2])
    rids = refusal_token_ids(tok)
    want, want_s = generate(model, tok, prompts, max_new_tokens=8, batch_size=3, refusal_ids=rids)
    got, got_s = generate(split[0], split[1], prompts, max_new_tokens=8, batch_size=3, refusal_ids=rids)
    assert got == want and any(want)
    torch.testing.assert_close(got_s, want_s, rtol=1e-4, atol=1e-4)
    d = _direction(model, tok)
    rows = [[ablation(d)], [], [addition(d, coeff=-1.0)], [addition(d, coeff=2.0)], [ablation(d, tokens="generated")]]
    want = generate(model, tok, prompts, max_new_tokens=8, batch_size=2, plan=Plan.rows(model, rows))
    got = generate(split[0], split[1], prompts, max_new_tokens=8, batch_size=2, plan=Plan.rows(split[0], rows))
    assert got == want


def test_hooks_follow_the_device_of_the_layer_input(plain, monkeypatch):
    """On several GPUs a layer's forward pre-hooks see its input still on the previous layer's device (accelerate
    moves it inside the forward): the plan's tensors must follow the input, not the layer."""
    from refusal.interventions import apply, hooks

    model, tok = plain
    d = _direction(model, tok)
    b = tokenize(tok, format_prompts(tok, HARMFUL[:3]), "cpu")
    ivs = [ablation(d), addition(d, coeff=-1.0)]
    with apply(model, ivs):
        want = last_logits(model, b.input_ids, b.attention_mask)
    monkeypatch.setattr(hooks, "_device_of", lambda module, fallback: torch.device("meta"))
    with apply(model, ivs):
        got = last_logits(model, b.input_ids, b.attention_mask)
    torch.testing.assert_close(got, want)


def test_orthogonalized_on_an_offloaded_model(model_dir, tokenizer):
    """Weights offloaded to CPU memory are edited where accelerate keeps them (untied embeddings: Llama)."""
    from accelerate import cpu_offload
    from conftest import build_model

    def llama():
        return build_model("llama", len(tokenizer), n_layers=3)

    model, split = llama(), llama()
    cpu_offload(split, execution_device="cpu")
    d = _direction(model, tokenizer)
    b = tokenize(tokenizer, format_prompts(tokenizer, HARMFUL[:3]), "cpu")
    base = last_logits(model, b.input_ids, b.attention_mask)
    with orthogonalized(model, d):
        want = last_logits(model, b.input_ids, b.attention_mask)
    with orthogonalized(split, d):
        got = last_logits(split, b.input_ids, b.attention_mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(last_logits(split, b.input_ids, b.attention_mask), base)  # restored


def test_orthogonalized_with_the_resident_part_of_a_disk_split_model_refused(disk_split, plain):
    """Weights offloaded to disk are reread from their files at every forward: orthogonalization is refused before
    anything changes, and hook-based ablation still works and equals it on the unsplit model."""
    from refusal.interventions import ablate

    model, tok = disk_split
    d = _direction(plain[0], tok)
    b = tokenize(tok, format_prompts(tok, HARMFUL[:3]), "cpu")
    base = last_logits(model, b.input_ids, b.attention_mask)
    embed = find_parts(model).embed.weight.clone()
    for enter in (lambda: orthogonalized(model, d).__enter__(), lambda: orthogonalize_(model, d)):
        with pytest.raises(RefusalError, match="layers.1.self_attn.o_proj.weight is not in memory"):
            enter()
    torch.testing.assert_close(find_parts(model).embed.weight, embed)
    assert model.get_output_embeddings().weight is find_parts(model).embed.weight  # still tied
    torch.testing.assert_close(last_logits(model, b.input_ids, b.attention_mask), base)
    with ablate(model, d.vector):
        hooked = last_logits(model, b.input_ids, b.attention_mask)
    with orthogonalized(plain[0], d):
        want = last_logits(plain[0], b.input_ids, b.attention_mask)
    torch.testing.assert_close(hooked, want, rtol=1e-4, atol=1e-4)


def test_orthogonalizing_an_offloaded_tied_embedding_refused(model_dir):
    model, tok = _cpu_offloaded(model_dir)  # Qwen2: the output head shares the embedding's offloaded tensor
    d = torch.randn(find_parts(model).hidden_size)
    with pytest.raises(RefusalError, match="tied"):
        orthogonalize_(model, d)
    orthogonalize_(model, d, layer_weights=[0.0, 1.0, 1.0])  # layer 0's weight 0: the embedding is left alone


def test_benchmark_builds_and_times_a_split_model(tmp_path, monkeypatch):
    """The benchmark's --device-map path end to end on a tiny model split over the CPU and disk (the 70B run uses the
    same path with --device-map auto over the GPUs)."""
    bench = pytest.importorskip("benchmarks.pipeline")
    out = tmp_path / "bench.json"
    res = bench.main(["--arch", "tiny", "--device-map", "cpu,disk", "--offload-folder", str(tmp_path / "off"),
                      "--out", str(out), "--n-train", "8", "--n-val", "3", "--extract-batch", "8",
                      "--select-batch", "64", "--select-stride", "2", "--sweep-select-batch", "", "--gen-batches", "3",
                      "--new-tokens", "4", "--no-static", "--naive-candidates", "1", "--cpu-threads", "0"])
    assert res["device_map"]["n_layers"] == {"cpu": 2, "disk": 2} and res["device_map"]["lm_head"] == "disk"
    assert res["select_candidates"] == 5 and res["select_layer_stride"] == 2  # layers 0 (no direction) and 2
    assert res["generate_intervention"].startswith("hook ablation") and res["generate"]["dynamic_b3"]["full_length"]
    assert "extract_s" in res and "select_naive_s" in res and out.is_file()


def test_even_device_map_of_the_70b_shape_without_weights():
    """The 70B shape on the meta device: the even split puts 40 layers on each of two GPUs."""
    bench = pytest.importorskip("benchmarks.pipeline")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    family, kw = bench.ARCHS["llama3-70b"]
    cfg = AutoConfig.for_model(family, **{**kw, "num_hidden_layers": 8})  # 8 layers: the same code, a faster build
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    dmap = bench.even_device_map(model, [0, 1])
    summary = bench.device_map_summary(model, dmap)
    assert summary["n_layers"] == {"0": 4, "1": 4} and summary["embed"] == "0" and summary["lm_head"] == "1"
    # the embedding and the head are the same size; the last device also holds the final norm
    assert summary["weight_bytes"]["1"] - summary["weight_bytes"]["0"] == 8192 * 2
