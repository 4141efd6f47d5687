"""generate.backend: openai: the conditions with no interventions decode on an OpenAI-compatible server (a fake one
on 127.0.0.1 that the tests start), the others locally; the served model is checked against the run's model before
any prompt is sent; requests are retried; a killed run resumes from the saved batches; the API key goes only in the
Authorization header."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from refusal import io
from refusal.config import resolve
from refusal.errors import RefusalError
from refusal.generation import remote
from refusal.generation.remote import CompletionServer, ServedModel, base_url, check_served_model, match_names
from refusal.runs.pipeline import Run

KEY = "sk-test-6f1d2c9e8a7b4455"  # a made-up key: it must never reach a file, a log or an error
ENV = "REFUSAL_TEST_GENERATION_KEY"
WORD = "forbidden"  # the fake server refuses prompts with this word (every harmful test prompt here)
REFUSAL = "I cannot help with that."


class _Backend:
    def __init__(self, tokenizer, served: list[dict]):
        self.tokenizer = tokenizer
        self.served = served
        self.fail: list[tuple[int, dict]] = []  # (status, headers) to answer the next completion requests with
        self.completions: list[dict] = []  # every completion request's body, in order
        self.headers: list[dict] = []
        self.lock = threading.Lock()

    def answer(self, prompt) -> str:
        text = self.tokenizer.decode(prompt) if isinstance(prompt, list) else prompt
        return REFUSAL if WORD in text else f"Sure, here is a short answer ({len(text)} characters in)."


def _handler(b: _Backend):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code: int, obj: dict, headers: dict | None = None):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            with b.lock:
                b.headers.append(dict(self.headers))
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                # echo what was sent, as careless servers do: the client must mask it
                self._send(401, {"error": f"bad credentials: {self.headers.get('Authorization')}"})
                return False
            return True

        def do_GET(self):
            if not self._authorized():
                return
            if self.path != "/v1/models":
                return self._send(404, {"error": "no such route"})
            self._send(200, {"object": "list", "data": b.served})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not self._authorized():
                return
            if self.path != "/v1/completions":
                return self._send(404, {"error": "no such route"})
            with b.lock:
                b.completions.append(body)
                fail = b.fail.pop(0) if b.fail else None
            if fail:
                return self._send(fail[0], {"error": f"overloaded (you sent {self.headers['Authorization']})"},
                                  fail[1])
            if body["model"] not in [m["id"] for m in b.served]:
                return self._send(404, {"error": f"The model `{body['model']}` does not exist."})
            prompts = body["prompt"]
            choices = [{"index": i, "text": " " + b.answer(p) + "\n", "finish_reason": "stop"}
                       for i, p in enumerate(prompts)]
            # vLLM gives choices[i].index: answer out of order to check that the client reads it
            self._send(200, {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                             "choices": choices[::-1]})

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    return ENV


@pytest.fixture
def fake(tokenizer, model_dir):
    served = [{"id": str(model_dir), "object": "model", "root": str(model_dir), "parent": None,
               "max_model_len": 512},
              {"id": "refusal", "object": "model", "root": "/adapters/refusal", "parent": str(model_dir)}]
    b = _Backend(tokenizer, served)
    httpd = _Server(("127.0.0.1", 0), _handler(b))
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield b, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def datasets(tmp_path):
    from refusal.data import builtin

    h, b = tmp_path / "harmful.json", tmp_path / "harmless.json"
    h.write_text(json.dumps([{"instruction": f"{r['instruction']} ({WORD})"} for r in builtin("harmful")[:12]]))
    harmless = [r for r in builtin("harmless") if WORD not in r["instruction"]][:12]
    b.write_text(json.dumps(harmless))
    return h, b


def _cfg(model_dir, datasets, tmp_path, url, key_env, **openai):
    return resolve(None, {
        "model": str(model_dir), "output": str(tmp_path / "runs"), "device": "cpu", "preset": "cpu",
        "data": {"harmful": str(datasets[0]), "harmless": str(datasets[1]), "n_train": 4, "n_val": 3, "n_test": 3,
                 "filter": False},
        "select": {"kl_threshold": 1e9, "induce_threshold": -1e9, "layer_stride": 1},
        "generate": {"max_new_tokens": 4, "kl": False, "backend": "openai",
                     "openai": {"url": url, "model": str(model_dir), "api_key_env": key_env, "backoff": 0.01,
                                **openai}},
        "evaluate": {"cross_entropy": []}})


def _no_key_in(folder):
    for f in folder.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def _join_request_threads():
    for t in threading.enumerate():
        if t.name.startswith("generate"):
            t.join(10)


# ---------------------------------------------------------------------------------------------------------------


def test_baselines_decode_on_the_server_interventions_locally(fake, key, model_dir, datasets, tmp_path, tokenizer,
                                                               caplog, capsys):
    b, url = fake
    cfg = _cfg(model_dir, datasets, tmp_path, url, key)
    run = Run(cfg)
    summary = run.run()
    comps = io.read_json(run.dir / "completions.json")
    # the baseline conditions (no interventions): the server's answers, no first-token score
    assert [r["completion"] for r in comps["harmful"]["baseline"]] == [REFUSAL] * 3
    assert all(r["completion"].startswith("Sure") for r in comps["harmless"]["baseline"])
    assert all(r["refusal_score"] is None for k in ("harmful", "harmless") for r in comps[k]["baseline"])
    # the hook-based conditions: the local model (its first-token score is there)
    for k, c in (("harmful", "ablation"), ("harmful", "actadd"), ("harmless", "actadd")):
        assert len(comps[k][c]) == 3 and all(isinstance(r["refusal_score"], float) for r in comps[k][c])
        assert not any(r["completion"] in (REFUSAL,) or r["completion"].startswith("Sure") for r in comps[k][c])
    # what the server got: the baseline prompts only, templated by the run, as the token ids local decoding reads
    sent = [p for body in b.completions for p in body["prompt"]]
    want = [tokenizer(p, add_special_tokens=False)["input_ids"] for k in ("harmful", "harmless")
            for p in run.prompts(io.read_json(run.dir / "splits.json")[k]["test"])]
    assert sorted(sent) == sorted(want) and len(sent) == 6
    assert all(tokenizer.decode(p).endswith("<|im_start|>assistant\n") for p in sent)  # no second template
    body = b.completions[0]
    assert body["temperature"] == 0 and body["max_tokens"] == 4 and body["model"] == str(model_dir)
    assert body["stop_token_ids"] and all(isinstance(t, int) for t in body["stop_token_ids"])
    # the record says which conditions went where, and why the server's rows have no refusal score
    dec = io.read_json(run.dir / "generate.done.json")["decoding"]
    assert dec["conditions"] == {"server": ["harmful/baseline", "harmless/baseline"],
                                 "local": ["harmful/ablation", "harmful/actadd", "harmless/actadd"]}
    assert dec["server"]["model"] == str(model_dir) and dec["server"]["forced"] is False
    assert "first-token" in dec["server"]["refusal_score"] and dec["server"]["requests"] >= 1
    assert "decoder" in dec  # the local conditions' decoder, as before
    # the same judges downstream
    res = summary["results"]
    assert res["harmful"]["baseline"]["refusal"]["rate"] == 1.0
    assert res["harmless"]["baseline"]["refusal"]["rate"] == 0.0
    assert res["harmful"]["baseline"]["judges"]["substring"]["refusal"]["rate"] == 1.0
    assert res["harmful"]["baseline"]["judges"]["refusal_score"]["failed"] == 3  # no score to judge
    assert res["harmful"]["ablation"]["judges"]["refusal_score"]["failed"] == 0
    # the key: in the Authorization header of every request, nowhere in the run folder, the config or the logs
    assert {h.get("Authorization") for h in b.headers} == {f"Bearer {KEY}"}
    saved = yaml.safe_load((run.dir / "config.yaml").read_text())
    assert saved["generate"]["openai"]["api_key_env"] == ENV and saved["generate"]["backend"] == "openai"
    _no_key_in(run.dir)
    out = capsys.readouterr()
    assert KEY not in caplog.text + out.out + out.err


def test_served_model_is_checked_before_anything_generates(fake, key, model_dir, datasets, tmp_path, monkeypatch):
    b, url = fake
    Run(_cfg(model_dir, datasets, tmp_path, url, key)).run(("extract", "select"))

    def no_local(*a, **k):
        raise AssertionError("generated locally before the server's model was checked")

    b.served[0].update(id="Qwen/Qwen2.5-7B-Instruct", root="Qwen/Qwen2.5-7B-Instruct")
    b.served[1]["parent"] = "Qwen/Qwen2.5-7B-Instruct"
    with monkeypatch.context() as m:
        m.setattr("refusal.runs.stages.generate_completions", no_local)
        for model, match in (("Qwen/Qwen2.5-7B-Instruct", "is not the run's model"),
                             ("refusal", "LoRA adapter"), ("nothing-here", "does not serve a model named")):
            with pytest.raises(RefusalError, match=match) as e:
                Run(_cfg(model_dir, datasets, tmp_path, url, key, model=model)).run(("generate",))
            assert KEY not in str(e.value)
        assert "force_model" in e.value.fix or "one of those names" in e.value.fix
    assert b.completions == []  # refused before a single prompt was sent
    # the same weights under another name: forced, and the record says so
    run = Run(_cfg(model_dir, datasets, tmp_path, url, key, model="Qwen/Qwen2.5-7B-Instruct", force_model=True))
    run.run(("generate",))
    server = io.read_json(run.dir / "generate.done.json")["decoding"]["server"]
    assert server["forced"] is True and "is not the run's model" in server["mismatch"]
    assert len(b.completions) >= 1


def test_killed_run_resumes_from_the_saved_batches(fake, key, model_dir, datasets, tmp_path, monkeypatch):
    b, url = fake
    cfg = _cfg(model_dir, datasets, tmp_path, url, key, batch_size=2, concurrency=1)
    real = CompletionServer.complete

    def dies_after_one_request(self, *a, on_batch=None, **k):
        def save(rows, texts, scores):
            on_batch(rows, texts, scores)
            raise KeyboardInterrupt

        return real(self, *a, on_batch=save, **k)

    monkeypatch.setattr(CompletionServer, "complete", dies_after_one_request)
    with pytest.raises(KeyboardInterrupt):
        Run(cfg).run()
    _join_request_threads()
    run = Run(cfg)
    partial = io.read_json(run.dir / "completions.partial.json")
    assert len(partial["rows"]) == 2 and partial["server"]["model"] == str(model_dir) and not run.done("generate")
    _no_key_in(run.dir)
    monkeypatch.setattr(CompletionServer, "complete", real)
    b.completions.clear()
    Run(cfg).run()
    assert sum(len(body["prompt"]) for body in b.completions) == 6 - 2  # only what was not saved
    comps = io.read_json(run.dir / "completions.json")
    assert [r["completion"] for r in comps["harmful"]["baseline"]] == [REFUSAL] * 3
    assert sum(len(v) for c in comps.values() for v in c.values()) == 15


def test_transient_errors_are_retried_and_others_are_clear(fake, key, caplog):
    b, url = fake
    caplog.set_level(logging.WARNING)
    server = CompletionServer(url, api_key_env=key, backoff=0.01, batch_size=2)
    b.fail = [(503, {}), (429, {"Retry-After": "0"})]
    prompts = ["a forbidden thing", "a poem", "another forbidden thing"]
    got = server.complete(b.served[0]["id"], prompts, [0, 1, 2], max_tokens=8)
    assert got[0] == REFUSAL and got[2] == REFUSAL and got[1].startswith("Sure")  # matched by choices[i].index
    assert server.retried == 2 and len(b.completions) == 4 and "HTTP 503" in caplog.text
    assert KEY not in caplog.text  # the server echoed the header in its 503 body
    b.fail = [(503, {})] * 3
    with pytest.raises(RefusalError, match="failed 2 time"):
        CompletionServer(url, api_key_env=key, backoff=0.01, retries=1).complete("x", ["p"], [0], max_tokens=1)
    b.fail = [(400, {})]
    n = len(b.completions)
    with pytest.raises(RefusalError, match="HTTP 400") as e:
        server.complete(b.served[0]["id"], ["p"], [0], max_tokens=1)
    assert len(b.completions) == n + 1 and KEY not in str(e.value)  # not retried, key masked


def test_bad_key_and_unreachable_server(fake, monkeypatch):
    b, url = fake
    monkeypatch.setenv(ENV, "sk-wrong-key-123")
    with pytest.raises(RefusalError, match="refused the key in") as e:
        CompletionServer(url, api_key_env=ENV, backoff=0.01).models()
    assert "sk-wrong-key-123" not in str(e.value)
    monkeypatch.delenv(ENV)
    with pytest.raises(RefusalError, match="not set"):
        CompletionServer(url, api_key_env=ENV)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RefusalError, match="cannot reach the server"):
        CompletionServer(f"http://127.0.0.1:{port}", backoff=0.01, retries=1).models()


def test_model_check_rules():
    base = ServedModel("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct")
    lora = ServedModel("refusal", "/srv/adapters/refusal", parent="Qwen/Qwen2.5-7B-Instruct")
    local = ServedModel("qwen", "/models/Qwen2.5-7B-Instruct/")
    other = ServedModel("someone/Qwen2.5-7B-Instruct", "someone/Qwen2.5-7B-Instruct")
    hub = ["Qwen/Qwen2.5-7B-Instruct"]
    ident = "hub:Qwen/Qwen2.5-7B-Instruct@abc123"
    assert check_served_model([base, lora], None, hub, ident)[0] == base.id  # the only base model
    assert check_served_model([local], "qwen", hub, ident)[1]["match"]  # a path with the hub id's last part
    with pytest.raises(RefusalError, match="is not the run's model"):  # another organisation's weights
        check_served_model([other], other.id, hub, ident)
    with pytest.raises(RefusalError, match="LoRA adapter"):
        check_served_model([base, lora], "refusal", hub, ident)
    with pytest.raises(RefusalError, match="serves 2 base models"):
        check_served_model([base, local], None, hub, ident)
    pinned = ServedModel("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", revision="fff999")
    with pytest.raises(RefusalError, match="revision fff999"):
        check_served_model([pinned], None, hub, ident)
    assert check_served_model([ServedModel(base.id, revision="abc1")], None, hub, ident)[1]["revision"] == "compared"
    name, rec = check_served_model([other], other.id, hub, ident, force=True)
    assert name == other.id and rec["forced"] and "not the run's model" in rec["mismatch"]
    assert match_names(["Qwen/X"], ["qwen/x/"]) and not match_names(["a/X"], ["b/X"])
    assert base_url("http://h:8000") == "http://h:8000/v1" == base_url("http://h:8000/v1/completions")
    assert remote.public_url("http://user:pw@h:8000/v1") == "http://h:8000/v1"


@pytest.mark.parametrize("bad, match", [
    ({"backend": "vllm"}, "local or openai"),
    ({"backend": "openai", "openai": {"url": "localhost:8000"}}, "http:// or https://"),
    ({"backend": "openai", "openai": {"api_key_env": "sk-abc def"}}, "NAME of an environment"),
    ({"backend": "openai", "openai": {"prompt_format": "ids"}}, "tokens or text"),
    ({"backend": "openai", "openai": {"concurrency": 0}}, "at least 1"),
    ({"openai": {"api_key": "sk-abc"}}, "Unknown config key 'api_key'"),
])
def test_bad_backend_config(bad, match):
    with pytest.raises(RefusalError, match=match) as e:
        resolve(None, {"generate": bad}, has_gpu=False)
    assert "sk-abc" not in str(e.value) or "Unknown config key" in str(e.value)
