"""`llmx serve` as a real process on loopback and a Unix socket, driven by the official `openai`
client, httpx, curl and the `llmx` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MODELS_DIR, needs_reference, require_reference, run_llmx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmx.engine.model import Model

pytestmark = pytest.mark.slow
TINY = MODELS_DIR / "tiny-llama-q8_0.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A `llmx serve` process; stopped with SIGTERM at the end."""

    def __init__(self, args: list[str], cache_dir: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.socket = cache_dir / "llmx.sock"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "LLMX_CACHE_DIR": str(cache_dir), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "llmx.cli.main", "serve", *args, "--port", str(self.port)],
                                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"llmx serve exited: {self.proc.stderr.read().decode()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("llmx serve did not come up")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return Model(gemma_path, threads=2)


@pytest.fixture(scope="module")
def server(gemma_path, tmp_path_factory):
    require_reference()  # it also serves a tiny model
    served = Served([str(gemma_path), "--model", f"tiny={TINY}", "--response-cache", "8", "-t", "2"],
                    tmp_path_factory.mktemp("serve"))
    yield served
    assert served.stop() == 0
    assert not served.socket.exists()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


@pytest.fixture(scope="module")
def name(gemma_path):
    return gemma_path.stem


def solo_completion(gemma, prompt: str, n: int) -> str:
    return "".join(gemma.generate(prompt, max_tokens=n, temperature=0.0))


def test_openai_chat_and_completions_equal_the_library_at_temperature_0(client, gemma, name):
    messages = [{"role": "user", "content": "Name three colours."}]
    expected = "".join(gemma.chat(messages, max_tokens=12, temperature=0.0))
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == expected and chat.object == "chat.completion"
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.completion_tokens <= 12
    streamed = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    prompt = "The capital of France is"
    text = solo_completion(gemma, prompt, 10)
    completion = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0)
    assert completion.choices[0].text == text
    parts = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in parts) == text


def test_models_embeddings_and_logprobs(client, name):
    assert {m.id for m in client.models.list().data} == {name, "tiny"}
    vectors = client.embeddings.create(model=name, input=["a cat", "a cat", "the stock market"]).data
    a, b, c = (v.embedding for v in vectors)
    assert a == b and abs(sum(x * x for x in a) - 1) < 1e-4 and sum(x * y for x, y in zip(a, c, strict=True)) < 0.999
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy took the most likely
    completion = client.completions.create(model=name, prompt="One, two,", max_tokens=3, temperature=0, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3 and "".join(lp.tokens) == completion.choices[0].text


def test_async_client_streams(server, gemma, name):
    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none")
        stream = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}],
                                                      max_tokens=8, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    expected = "".join(gemma.chat([{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0.0))
    assert asyncio.run(run()) == expected


def test_curl_streams_sse_and_talks_over_the_unix_socket(server):
    body = json.dumps({"prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", server.url + "/v1/completions", "-d", body], capture_output=True, timeout=60)
    lines = [line for line in out.stdout.decode().splitlines() if line]
    assert lines[0].startswith("data: {") and lines[-1] == "data: [DONE]"
    unix = subprocess.run(["curl", "-s", "--unix-socket", str(server.socket), "http://llmx/v1/models"],
                          capture_output=True, timeout=30)
    assert json.loads(unix.stdout)["object"] == "list"


def test_sixteen_concurrent_streams_each_get_their_solo_text(client, gemma, name):
    words = ["rain", "salt", "maps", "glue", "iron", "wool", "rope", "clay",
             "soap", "wax", "tea", "ink", "oil", "sand", "wire", "cork"]
    prompts = [f"Item {i}: the most useful thing about {w} is" for i, w in enumerate(words)]
    solo = [solo_completion(gemma, p, 16) for p in prompts]
    got: dict[int, str] = {}

    def one(i: int) -> None:
        stream = client.completions.create(model=name, prompt=prompts[i], max_tokens=16, temperature=0, stream=True)
        got[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [got.get(i) for i in range(16)] == solo


def test_the_socket_is_private_and_a_second_server_on_it_fails_in_one_line(server, gemma_path):
    assert stat.S_IMODE(server.socket.stat().st_mode) == 0o600
    second = subprocess.run([sys.executable, "-m", "llmx.cli.main", "serve", str(gemma_path), "--port",
                             str(free_port())], env=server.env, capture_output=True, timeout=60)
    assert second.returncode == 1
    assert second.stderr.decode().strip().count("\n") == 0 and "another llmx serve" in second.stderr.decode()


def test_two_models_answer_under_their_names_and_an_unknown_one_is_404(client, name):
    for model in (name, "tiny"):
        out = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0)
        assert out.model == model and out.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="Hello", max_tokens=3)
    assert e.value.body["code"] == "model_not_found" and "tiny" in e.value.body["message"]


def test_the_response_cache_serves_the_same_body_again(server, name):
    body = {"model": name, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    first = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    second = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert first.headers["x-llmx-cache"] == "miss" and second.headers["x-llmx-cache"] == "hit"
    assert second.content == first.content
    assert "llmx_response_cache_hits_total 1.0" in httpx.get(server.url + "/metrics").text


def test_bad_requests_are_4xx_in_openai_shape(server, name):
    cases = [
        (b"{not json", 400), (b'{"prompt": 5}', 400), (b'{"prompt": "x", "n": 2}', 400),
        (b'{"prompt": "x", "temperature": "hot"}', 400), (b'{"messages": []}', 400),
        (json.dumps({"prompt": "word " * 5000}).encode(), 400),  # longer than the context
        (b'{"prompt": "\\ud800 lone surrogate"}', 400), (b'{"prompt": [1, -5]}', 400),
        (b'{"prompt": "x", "seed": -1}', 400), (b'[' * 5000 + b']' * 5000, 400),
    ]
    for body, status in cases:
        endpoint = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        r = httpx.post(server.url + endpoint, content=body, timeout=60)
        assert r.status_code == status, (body[:40], r.text)
        assert set(r.json()["error"]) == {"message", "type", "code"}
    too_long = httpx.post(server.url + "/v1/completions", content=json.dumps({"prompt": "word " * 5000}), timeout=60)
    assert "4096" in too_long.json()["error"]["message"]
    huge = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20), timeout=60)
    assert huge.status_code == 413


def test_a_client_that_disconnects_frees_its_request(server, name):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": name, "prompt": "Tell me a long story.", "max_tokens": 2000, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(server.url + "/metrics").text
        if f'llmx_requests_running{{model="{name}"}} 0.0' in metrics:
            break
        time.sleep(0.1)
    assert f'llmx_requests_running{{model="{name}"}} 0.0' in metrics
    used = _metric(metrics, "llmx_kv_blocks_used", name)
    assert used == _metric(metrics, "llmx_kv_blocks_cached", name)


def _metric(text: str, metric: str, model: str) -> float:
    prefix = f'{metric}{{model="{model}"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix))[len(prefix):])


def test_websocket_turns_and_cancel(server, name, gemma):
    from websockets.sync.client import connect

    expected = "".join(gemma.chat([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0.0))
    with connect(server.url.replace("http", "ws") + "/v1/ws") as ws:
        for _ in range(2):  # two turns on one connection
            ws.send(json.dumps({"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                                "temperature": 0}))
            events = []
            while not events or "done" not in events[-1]:
                events.append(json.loads(ws.recv(timeout=60)))
            assert "".join(e.get("delta", "") for e in events) == expected
            assert events[-1]["usage"]["completion_tokens"] <= 5
        ws.send(json.dumps({"model": name, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 3000}))
        ws.recv(timeout=60)
        ws.send(json.dumps({"cancel": True}))
        while "done" not in (event := json.loads(ws.recv(timeout=60))):
            pass
        assert event["finish_reason"] == "cancelled" and event["usage"]["completion_tokens"] < 3000


def test_llmx_run_goes_through_the_server_fast_with_the_same_text(server, gemma_path):
    env = {"LLMX_CACHE_DIR": server.env["LLMX_CACHE_DIR"]}
    args = ["run", str(gemma_path), "The capital of France is", "--temp", "0", "-n", "12"]
    here = run_llmx(*args, "--no-server", env=env)
    there = run_llmx(*args, "--verbose", env=env)
    assert there.returncode == 0 and "through the server" in there.stderr.decode()
    assert there.stdout == here.stdout
    started = time.monotonic()
    one = run_llmx("run", str(gemma_path), "Hi", "-n", "1", env=env)
    wall = time.monotonic() - started
    assert one.returncode == 0 and wall <= 0.5, wall


def test_auth_rate_limit_and_a_full_queue(tmp_path, gemma_path):
    served = Served([str(gemma_path), "--api-key", "k1", "--api-key", "k2", "--rate-limit", "3", "--parallel", "1",
                     "--max-queue", "1", "--no-socket"], tmp_path)
    try:
        url = served.url + "/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(served.url + "/health").status_code == 200
        ok = [httpx.get(url, headers={"Authorization": "Bearer k2"}).status_code for _ in range(4)]
        assert ok[:3] == [200, 200, 200] and ok[3] == 429
        limited = httpx.get(url, headers={"Authorization": "Bearer k2"})
        assert int(limited.headers["retry-after"]) >= 1 and limited.json()["error"]["code"] == "rate_limit_exceeded"
        statuses = _three_at_once(served.url, "k1")
        assert sorted(statuses)[-1] == 503 and statuses.count(200) == 2, statuses
    finally:
        assert served.stop() == 0


def _three_at_once(url: str, key: str) -> list[int]:
    """Three long requests at once against --parallel 1 --max-queue 1: one runs, one waits, one is refused."""
    statuses: list[int] = []
    body = {"prompt": "Hello", "max_tokens": 150, "temperature": 0, "ignore_eos": True}

    def one() -> None:
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    return statuses


ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize", "/v1/models",
             "/metrics", "/nothing"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
                        ["prompt", "messages", "model", "max_tokens", "temperature", "stream", "n", "stop", "input",
                         "tokens", "content", "logprobs", "role", "top_k", "seed", "x"]), inner, max_size=5),
                    max_leaves=12)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    require_reference()
    served = Served([str(TINY), "-c", "64", "--no-socket"], tmp_path_factory.mktemp("fuzz"))
    yield served
    assert served.stop() == 0


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS), body=JSON | st.binary(max_size=64),
       header=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.strip))
def test_fuzzed_bodies_and_headers_never_get_a_5xx(fuzz_server, endpoint, body, header):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": header, "Content-Type": header, "X-Whatever": header}
    r = httpx.post(fuzz_server.url + endpoint, content=content, headers=headers, timeout=60)
    assert r.status_code < 500, (endpoint, content[:80], r.text[:200])
    assert fuzz_server.proc.poll() is None


def test_chaos_script_passes_a_short_run(gemma_path):
    """scripts/chaos_serve.py, bounded: mixed SSE/JSON/WebSocket requests, some dropped midway."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "chaos_serve.py"
    result = subprocess.run([sys.executable, str(script), str(gemma_path), "--requests", "150", "--concurrency", "16"],
                            capture_output=True, timeout=600)
    assert result.returncode == 0, result.stdout.decode()[-3000:]
    assert "ok   no 5xx" in result.stdout.decode()


@needs_reference
def test_max_loaded_unloads_the_least_recently_used_model():
    from llmx.server.registry import EngineSettings, ModelRegistry

    paths = {name: MODELS_DIR / f"tiny-{name}-q8_0.gguf" for name in ("llama", "qwen2", "qwen3")}
    registry = ModelRegistry(paths, "llama", EngineSettings(threads=1, kv_cache_tokens=256), max_loaded=2)
    try:
        first = registry.engine("llama")
        registry.engine("qwen2")
        registry.engine("llama")  # now qwen2 is the least recently used
        registry.engine("qwen3")
        assert set(registry.loaded()) == {"llama", "qwen3"} and registry.engine("llama") is first
        with pytest.raises(Exception, match="not served here"):
            registry.resolve("gemma")
    finally:
        registry.close()


def test_llmx_chat_goes_through_the_server_with_the_same_replies(server, gemma_path):
    env = {"LLMX_CACHE_DIR": server.env["LLMX_CACHE_DIR"]}
    turns = b"Hello\nWhat is rain?\n"
    here = run_llmx("chat", str(gemma_path), "--temp", "0", "-n", "8", "--no-server", stdin=turns, env=env)
    there = run_llmx("chat", str(gemma_path), "--temp", "0", "-n", "8", stdin=turns, env=env)
    assert here.returncode == there.returncode == 0 and there.stdout == here.stdout and here.stdout.strip()


def test_response_format_and_grammar_constrain_served_output(client, server, name):
    """The twenty schemas of test_structured, five seeds each, through the openai client."""
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema
    from test_structured import SCHEMAS

    def ask(job):
        i, schema, seed = job
        chat = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Give one example as JSON."}], max_tokens=200,
            temperature=0.8, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        return schema, chat.choices[0]

    jobs = [(i, schema, seed) for i, schema in enumerate(SCHEMAS) for seed in range(5)]
    with ThreadPoolExecutor(16) as pool:
        for schema, choice in pool.map(ask, jobs):
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), schema)
    # Any JSON object: the grammar allows a number of any length, and a base model left to itself may
    # write one until max_tokens; two examples in the prompt make it write short objects (20 of 20 seeds).
    anything = client.completions.create(model=name, prompt='Data: {"a": 1}\nData: {"b": [2, 3]}\nData:',
                                         max_tokens=80, temperature=0.8, seed=1,
                                         extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(anything.choices[0].text), dict)
    gbnf = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": name, "prompt": "Is it raining?", "max_tokens": 10, "grammar": 'root ::= ("yes" | "no") "!"'})
    assert re.fullmatch(r"(yes|no)!", gbnf.json()["choices"][0]["text"])
    for bad in [{"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}},
                {"grammar": "root ::= missing"}, {"response_format": {"type": "regex", "regex": "[0-9"}},
                {"response_format": {"type": "xml"}}]:
        r = httpx.post(server.url + "/v1/completions", json={"model": name, "prompt": "x", **bad}, timeout=60)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "code"}, r.text
    assert httpx.get(server.url + "/health").status_code == 200


@needs_reference
def test_a_lookup_server_gives_plain_text_and_reports_acceptance(tmp_path):
    served = Served([str(TINY), "--lookup", "4", "-t", "1", "--no-socket"], tmp_path)
    try:
        body = {"prompt": "a b a b a b a b a b a b", "max_tokens": 40, "temperature": 0}
        text = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        plain = "".join(Model(TINY, threads=1).generate(body["prompt"], max_tokens=40, temperature=0.0))
        assert text == plain
        metrics = httpx.get(served.url + "/metrics").text
        accepted = re.search(r'llmx_spec_accepted_tokens_total\{model="[^"]+"\} ([0-9.]+)', metrics)
        assert accepted and float(accepted.group(1)) > 0, metrics
        assert "llmx_spec_acceptance_rate" in metrics and "llmx_spec_tokens_per_step" in metrics
    finally:
        assert served.stop() == 0


@needs_reference
def test_serve_draft_speculates_for_models_of_its_vocabulary_only(gemma_path):
    from llmx.server.registry import EngineSettings, ModelRegistry

    paths = {"tiny": MODELS_DIR / "tiny-llama-f16.gguf", "gemma": gemma_path}
    settings = EngineSettings(threads=1, kv_cache_tokens=512, draft=MODELS_DIR / "tiny-llama-q8_0.gguf", draft_max=3)
    registry = ModelRegistry(paths, "tiny", settings)
    try:
        tiny = registry.engine("tiny")
        assert tiny.speculative.method == "draft" and tiny.speculative.k == 3
        request = tiny.submit("Once upon a time", max_tokens=20, temperature=0.0)
        assert request.wait(60)
        plain = "".join(Model(paths["tiny"], threads=1).generate("Once upon a time", max_tokens=20, temperature=0.0))
        assert request.text == plain and tiny.stats()["draft_tokens"] > 0
        assert registry.engine("gemma").speculative is None  # another vocabulary: decodes plainly
    finally:
        registry.close()
