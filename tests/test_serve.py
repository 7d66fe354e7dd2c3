"""`adapt serve`: real server processes on tiny checkpoints (full attention, and block diffusion with causal
clean attention), spoken to by the official `openai` package (sync, async, streaming) and plain httpx.

At temperature 0 every answer equals `adapt.generate` (what `adapt sample` runs) with the same settings;
32 concurrent clients each get their one-at-a-time answer; a client leaving mid-stream leaves its batch
unharmed; bad requests get OpenAI's error object and a 4xx, and the server answers on; the API key is
checked and never logged; a server that cannot start says why in one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, AuthenticationError, OpenAI

from adapt.sampling import SamplingConfig, generate
from adapt.tiny import SAMPLE_TEXT

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-adapt-" + secrets.token_hex(12)
WRONG_KEY = "sk-wrong-" + secrets.token_hex(12)
MAX_BODY = 65536
WORDS = SAMPLE_TEXT.split()
PROMPTS = [" ".join(WORDS[i : i + 1 + i % 7]) for i in range(32)]  # 32 prompts of 1-7 words

pytestmark = pytest.mark.usefixtures("one_thread")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPT_API_KEY", "ADAPT_DEBUG")}
    env.update(
        PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra
    )
    return env


@dataclass
class Server:
    """A running `python -m adapt serve` and everything it printed."""

    proc: subprocess.Popen
    name: str
    lines: list[str] = field(default_factory=list)
    url: str = ""

    def drain(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)


def launch(path: Path, *args: str, **env: str) -> Server:
    argv = [sys.executable, "-m", "adapt", "serve", str(path), "--port", "0", "--dtype", "float32"]
    proc = subprocess.Popen(
        [*argv, "--device", "cpu", *args],
        env=child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = Server(proc, str(path))
    threading.Thread(target=server.drain, args=(proc.stdout,), daemon=True).start()
    return server


def wait_ready(server: Server, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.url:
        found = re.search(r"at (http://\S+)/v1 ", server.output())
        if found:
            server.url = found.group(1)
        elif server.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the server did not start:\n{server.output()}")
        time.sleep(0.1)
    while True:
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny converted llama, and the same weights recorded as a joint block checkpoint (B = 4, causal
    clean attention, AR term: `verify` runs on it)."""
    from adapt.conversion.convert import convert
    from adapt.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("serve")
    full = convert(str(build_tiny_model("llama", root / "src")), root / "full").out
    block = root / "block"
    shutil.copytree(full, block)
    config = json.loads((block / "config.json").read_text())
    config["diffusion"].update(block_size=4, clean_attention="causal", ar_loss_weight=1.0)
    (block / "config.json").write_text(json.dumps(config))
    return {"src": root / "src", "full": Path(full), "block": block}


@pytest.fixture(scope="module")
def servers(checkpoints: dict[str, Path]) -> Iterator[dict[str, Server]]:
    """The full-attention server (API key from ADAPT_API_KEY) and the block one (no key), started together."""
    common = ("--max-batch", "8", "--batch-window", "0.1", "--max-body", str(MAX_BODY))
    running = {
        "full": launch(checkpoints["full"], *common, ADAPT_API_KEY=KEY),
        "block": launch(checkpoints["block"], *common),
    }
    try:
        for server in running.values():
            wait_ready(server)
        yield running
    finally:
        for server in running.values():
            server.proc.terminate()
        for server in running.values():
            try:
                server.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.proc.kill()


@pytest.fixture(scope="module")
def local(checkpoints: dict[str, Path]) -> dict[str, tuple]:
    """The same checkpoints loaded in this process: the answers `adapt sample` gives."""
    from adapt.loading.model import load_diffusion_model

    return {k: load_diffusion_model(checkpoints[k], device="cpu") for k in ("full", "block")}


def sample(local: dict, kind: str, prompts: list[str], **settings: object) -> object:
    """What `adapt sample --json` prints for these prompts and settings (greedy unless told)."""
    model, tokenizer, diffusion = local[kind]
    return generate(model, tokenizer, prompts, SamplingConfig(**settings), diffusion)


def client(servers: dict[str, Server], kind: str = "full") -> OpenAI:
    return OpenAI(base_url=servers[kind].url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def aclient(servers: dict[str, Server], kind: str = "full") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=servers[kind].url + "/v1", api_key=KEY, max_retries=0, timeout=120)


AUTH = {"Authorization": f"Bearer {KEY}"}


def sse(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


# ----------------------------------------------------------------------------- answers


def test_models_and_health(servers: dict[str, Server]) -> None:
    full = servers["full"]
    assert httpx.get(full.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client(servers).models.list()] == [full.name]
    assert client(servers).models.retrieve(full.name).id == full.name


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"strategy": "threshold", "threshold": 0.5, "block_length": 4},
        {"strategy": "margin", "steps": 4, "cache": "prefix"},
    ],
    ids=["defaults", "threshold", "margin-cache"],
)
def test_completions_equal_the_sampler(servers: dict[str, Server], local: dict, settings: dict) -> None:
    api = client(servers)
    for prompt in PROMPTS[:3]:
        got = api.completions.create(
            model=servers["full"].name, prompt=prompt, max_tokens=8, temperature=0, extra_body=settings
        )
        want = sample(local, "full", [prompt], gen_length=8, **settings)
        assert got.choices[0].text == want.texts[0]
        assert got.usage.completion_tokens == len(want.sequences[0])
        assert got.usage.prompt_tokens == len(want.prompts[0]) - 8
        assert got.choices[0].finish_reason == ("length" if len(want.sequences[0]) == 8 else "stop")


def test_chat_and_a_seeded_sample_equal_the_sampler(servers: dict[str, Server], local: dict) -> None:
    api, name = client(servers), servers["full"].name
    got = api.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "The river"}], max_tokens=8, temperature=0
    )
    want = sample(local, "full", ["The river"], gen_length=8, chat=True)
    assert got.choices[0].message.content == want.texts[0] and got.choices[0].message.role == "assistant"
    sampled = dict(temperature=0.8, top_p=0.9, seed=3)
    got = api.completions.create(model=name, prompt="The river", max_tokens=8, **sampled)
    assert got.choices[0].text == sample(local, "full", ["The river"], gen_length=8, **sampled).texts[0]
    stops = api.completions.create(model=name, prompt="The river", max_tokens=8, temperature=0, stop=["e"])
    assert stops.choices[0].text == sample(local, "full", ["The river"], gen_length=8, stop=("e",)).texts[0]


def test_several_prompts_are_choices_and_neutral_openai_fields_pass(
    servers: dict[str, Server], local: dict
) -> None:
    full, prompts = servers["full"], PROMPTS[8:11]
    want = [sample(local, "full", [p], gen_length=8).texts[0] for p in prompts]
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": None, "echo": False, "best_of": 1}
    body = {"model": full.name, "prompt": prompts, "max_tokens": 8, "temperature": 0, **neutral}
    whole = httpx.post(full.url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
    assert [c["text"] for c in whole["choices"]] == want and [c["index"] for c in whole["choices"]] == [
        0,
        1,
        2,
    ]
    with httpx.stream("POST", full.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH) as r:
        chunks = [json.loads(e) for e in sse(r) if e != "[DONE]"]
    streamed = [
        "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(3)
    ]
    assert streamed == want


def test_stream_sends_committed_text_and_ends_with_done(servers: dict[str, Server]) -> None:
    full = servers["full"]
    body = {"model": full.name, "prompt": "The river", "max_tokens": 24, "block_length": 8, "temperature": 0}
    whole = httpx.post(full.url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", full.url + "/v1/completions", json=streamed, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["text"]]
    assert len(texts) >= 2, "text is sent as it is committed, not at the end"
    assert "".join(texts) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_openai_streaming_sync_and_async(servers: dict[str, Server]) -> None:
    api, name = client(servers), servers["full"].name
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The river"}]
    whole = api.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0)
    parts = api.chat.completions.create(
        model=name, messages=messages, max_tokens=16, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text == whole.choices[0].message.content

    async def both() -> tuple[str, str]:
        async with aclient(servers) as a:
            done = await a.completions.create(model=name, prompt="A traveller", max_tokens=16, temperature=0)
            stream = await a.completions.create(
                model=name, prompt="A traveller", max_tokens=16, temperature=0, stream=True
            )
            return done.choices[0].text, "".join([c.choices[0].text async for c in stream])

    whole_text, streamed_text = asyncio.run(both())
    assert whole_text == streamed_text


@pytest.mark.parametrize("strategy", ["low_confidence", "verify"])
def test_block_checkpoint_streams_and_equals_the_sampler(
    servers: dict[str, Server], local: dict, strategy: str
) -> None:
    api, name = client(servers, "block"), servers["block"].name
    settings = {"strategy": strategy}
    want = sample(local, "block", ["The river ran"], gen_length=16, **settings).texts[0]
    got = api.completions.create(model=name, prompt="The river ran", max_tokens=16, extra_body=settings)
    assert got.choices[0].text == want
    stream = api.completions.create(
        model=name, prompt="The river ran", max_tokens=16, extra_body=settings, stream=True
    )
    pieces = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
    assert "".join(pieces) == want and len(pieces) >= 2  # a block (a verify pass) at a time


def test_32_concurrent_clients_each_get_their_alone_answer(servers: dict[str, Server], local: dict) -> None:
    name = servers["full"].name
    alone = [sample(local, "full", [p], gen_length=8).texts[0] for p in PROMPTS]

    async def everyone() -> list[str]:
        async with aclient(servers) as a:
            answers = await asyncio.gather(
                *(a.completions.create(model=name, prompt=p, max_tokens=8, temperature=0) for p in PROMPTS)
            )
        return [r.choices[0].text for r in answers]

    assert asyncio.run(everyone()) == alone
    assert len(set(alone)) > 1  # the prompts really differ


def test_a_client_leaving_mid_stream_does_not_disturb_its_batch(
    servers: dict[str, Server], local: dict
) -> None:
    full = servers["full"]
    prompts = PROMPTS[3:7]
    want = sample(local, "full", prompts, gen_length=48, block_length=8).texts
    results: dict[int, str] = {}

    def talk(i: int) -> None:
        body = {"model": full.name, "prompt": prompts[i], "max_tokens": 48, "block_length": 8, "stream": True}
        with httpx.stream("POST", full.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            text = ""
            for event in sse(r) if i else r.iter_lines():
                if i == 0:  # reads one event, then hangs up
                    results[i] = event
                    return
                if event != "[DONE]":
                    text += json.loads(event)["choices"][0]["text"]
            results[i] = text

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(1, len(prompts))] == want[1:]
    assert client(servers).completions.create(model=full.name, prompt="a", max_tokens=2).choices


# ----------------------------------------------------------------------------- refusals

GOOD = {"model": "MODEL", "prompt": "The river", "max_tokens": 4}
BAD = [  # (route, body: dict merged into GOOD, or raw bytes), status, param, code
    ("completions", b"{not json", 400, None, None),
    ("completions", b"[1, 2]", 400, None, None),
    ("completions", b'{"model": "MODEL", "prompt": "a", "temperature": NaN}', 400, None, None),
    ("completions", {"max_tokens": "5"}, 400, "max_tokens", None),
    ("completions", {"max_tokens": True}, 400, "max_tokens", None),
    ("completions", {"temperature": "hot"}, 400, "temperature", None),
    ("completions", {"prompt": 12}, 400, "prompt", None),
    ("completions", {"stream": "yes"}, 400, "stream", None),
    ("completions", {"model": "gpt-4"}, 404, "model", "model_not_found"),
    ("completions", {"max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"max_tokens": -3}, 400, "max_tokens", None),
    ("completions", {"max_tokens": 100000}, 400, "max_tokens", "context_length_exceeded"),
    ("completions", {"temperature": -0.5}, 400, "temperature", None),
    ("completions", {"top_p": 0}, 400, "top_p", None),
    ("completions", {"top_p": 1.5}, 400, "top_p", None),
    ("completions", {"n": 2}, 400, "n", None),
    ("completions", {"prompt": "river " * 400}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"logprobs": 3}, 400, "logprobs", None),
    ("completions", {"presence_penalty": 0.5}, 400, "presence_penalty", None),
    ("completions", {"suffix": "the end"}, 400, "suffix", None),
    ("completions", {"strategy": "best"}, 400, "strategy", None),
    ("completions", {"strategy": "verify"}, 400, None, None),  # a full-attention checkpoint has no AR stream
    ("completions", {"max_tokens": 8, "block_length": 3}, 400, None, None),
    ("completions", {"prompt": "fill <|mask|>*4 here"}, 400, "prompt", None),
    ("completions", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("chat/completions", {"prompt": None, "messages": []}, 400, "messages", None),
    (
        "chat/completions",
        {"prompt": None, "messages": [{"role": "user", "content": 3}]},
        400,
        "messages[0].content",
        None,
    ),
]


def body_of(case: dict | bytes, name: str) -> bytes:
    if isinstance(case, bytes):
        return case.replace(b"MODEL", name.encode())
    merged = {**GOOD, "model": name, **case}
    return json.dumps({k: v for k, v in merged.items() if v is not None}).encode()


def still_answers(server: Server) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    body = {"model": server.name, "prompt": "a", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=60).status_code == 200


def assert_openai_error(response: httpx.Response, status: int, param: str | None, code: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code


@pytest.mark.parametrize(("route", "case", "status", "param", "code"), BAD, ids=lambda v: str(v)[:40])
def test_a_bad_request_is_refused_and_the_server_answers_on(
    servers: dict[str, Server],
    route: str,
    case: dict | bytes,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    full = servers["full"]
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(f"{full.url}/v1/{route}", content=body_of(case, full.name), headers=headers)
    assert_openai_error(response, status, param, code)
    still_answers(full)


def raw_request(url: str, head: str, body: bytes) -> tuple[int, dict]:
    """Send a request's head and only `body` of it; the status and JSON of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_oversized_bodies_are_refused_before_being_read(servers: dict[str, Server]) -> None:
    full = servers["full"]
    path = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY
    declared = f"{path}\r\nContent-Type: application/json\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n"
    status, body = raw_request(full.url, declared, b'{"model": ')  # 100 MB announced, 10 bytes sent
    assert status == 413 and body["error"]["code"] == "request_too_large"
    chunked = f"{path}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"x" * 8192
    stream = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * (MAX_BODY // len(piece) + 2)
    status, body = raw_request(full.url, chunked, stream)  # past the limit, no length, never ended
    assert status == 413 and body["error"]["code"] == "request_too_large"
    still_answers(full)


def test_the_api_key_is_required_except_on_health(servers: dict[str, Server]) -> None:
    full = servers["full"]
    url = full.url + "/v1/models"
    for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": f"Basic {KEY}"}):
        assert_openai_error(httpx.get(url, headers=headers), 401, None, "invalid_api_key")
    wrong = OpenAI(base_url=full.url + "/v1", api_key=WRONG_KEY, max_retries=0)
    with pytest.raises(AuthenticationError) as refused:
        wrong.completions.create(model=full.name, prompt="a", max_tokens=2)
    assert refused.value.code == "invalid_api_key"
    assert httpx.get(full.url + "/health").status_code == 200
    assert httpx.get(url, headers=AUTH).status_code == 200
    assert httpx.get(servers["block"].url + "/v1/models").status_code == 200  # no key set: open


# ----------------------------------------------------------------------------- in process


def test_batcher_batches_compatible_requests_and_answers_finished_rows_early(
    local: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapt.serving import batcher as module
    from adapt.serving.api import ApiError, batch_key
    from adapt.serving.batcher import Batcher, Done, Job

    model, tokenizer, settings = local["full"]
    batcher = Batcher(model, tokenizer, settings, max_batch=4, window=0.5)
    events: list[object] = []
    greedy = SamplingConfig(gen_length=32)
    sampled = SamplingConfig(gen_length=32, temperature=1.0, seed=1)
    assert batch_key(greedy) is not None and batch_key(sampled) is None
    prompts = ["The river ran", "A traveller came to the mill", "def add(a, b):", "He told", "In the"]
    jobs = [Job(tokenizer(p)["input_ids"], greedy, i, events.append) for i, p in enumerate(prompts)]
    jobs.append(Job(tokenizer("The river")["input_ids"], sampled, 9, events.append))
    monkeypatch.setattr(module, "MAX_WAITING", len(jobs))
    batcher.submit(jobs)
    with pytest.raises(ApiError) as busy:  # more waiting than allowed: refused, not queued without bound
        batcher.submit(jobs[:1])
    assert busy.value.status == 503
    batcher.start()
    deadline = time.monotonic() + 120
    while sum(isinstance(e, Done) for e in events) < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    batcher.stop()
    assert sorted(batcher.batches) == [1, 1, 4]  # 4 greedy rows together, the rest alone
    assert batcher.waiting == 0
    done = {e.index: e for e in events if isinstance(e, Done)}
    for i, p in enumerate(prompts):
        want = sample(local, "full", [p], gen_length=32)
        assert (done[i].final.text, done[i].final.tokens) == (want.texts[0], want.sequences[0])
        sent = "".join(e.text for e in events if getattr(e, "index", None) == i)
        assert sent == want.texts[0]
    # the traveller's answer ends at an EOS (16 tokens of 32): it is sent before its batch ends
    assert done[1].final.finish_reason == "stop" and len(done[1].final.tokens) < 32
    order = [e.index for e in events if isinstance(e, Done)]
    assert order.index(1) < order.index(0)


def test_a_late_request_waits_steps_not_answers_and_a_batch_nobody_reads_stops(local: dict) -> None:
    from adapt.serving.batcher import DECODER, Batcher, Delta, Done, Job

    model, tokenizer, settings = local["full"]
    passes = []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    batcher = Batcher(model, tokenizer, settings, max_batch=8, window=0.0)
    batcher.start()
    ended: list[str] = []
    ids = tokenizer("The river")["input_ids"]

    def until(ok: object) -> None:
        deadline = time.monotonic() + 120
        while not ok() and time.monotonic() < deadline:  # type: ignore[operator]
            time.sleep(0.01)

    long = Job(ids, SamplingConfig(gen_length=200), 0, lambda e: isinstance(e, Done) and ended.append("long"))
    batcher.submit([long])
    until(lambda: len(passes) >= 5)  # the long answer is being decoded
    short = Job(ids, SamplingConfig(gen_length=4), 0, lambda e: isinstance(e, Done) and ended.append("short"))
    batcher.submit([short])
    until(lambda: len(ended) == 2)
    assert ended == ["short", "long"]  # 4 steps taken in turn with the 200 of the answer already running

    def leave(event: object) -> None:  # the client reads one piece, then is gone
        if isinstance(event, Delta):
            gone.cancelled = True

    passes.clear()
    gone = Job(ids, SamplingConfig(gen_length=200, block_length=8), 0, leave)
    batcher.submit([gone])
    until(lambda: gone.cancelled and not any(t.name == DECODER for t in threading.enumerate()))
    batcher.stop()
    hook.remove()
    assert gone.cancelled and len(passes) < 50  # stopped soon after, not run to its 200 steps


def test_settled_text_holds_back_what_could_change() -> None:
    from adapt.serving.stream import settled

    assert settled("hello wor", ("world",)) == "hello "
    assert settled("hello world and", ("world",)) == "hello "
    assert settled("xab", ("abc", "b")) == "x"  # "abc" may still start at 1, before the "b" at 2
    assert settled("caf\ufffd", ()) == "caf"  # half a character
    assert settled("plain", ("zz",)) == "plain"


# ----------------------------------------------------------------------------- start


def test_server_start_failures_are_one_error_line(checkpoints: dict[str, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        base = [sys.executable, "-m", "adapt", "serve"]
        no_extra = "import sys; sys.modules['fastapi'] = None; from adapt.cli import main; main()"
        runs = {
            "in use": [*base, str(checkpoints["full"]), "--port", port],
            "not diffusion": [*base, str(checkpoints["src"]), "--port", "0"],
            "no extra": [sys.executable, "-c", no_extra, "serve", str(checkpoints["full"])],
        }
        procs = {
            k: subprocess.Popen(
                argv, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for k, argv in runs.items()
        }
        done = {k: (p.communicate(timeout=120), p.returncode) for k, p in procs.items()}
    expected = {
        "in use": f"cannot listen on 127.0.0.1:{port}",
        "not diffusion": "is not a diffusion checkpoint",
        "no extra": "pip install 'adapt[serve]'",
    }
    for k, ((out, err), code) in done.items():
        assert code == 1, (k, out, err)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected[k] in errors[0], (k, err)
        assert "Traceback" not in err and "serving" not in out


def test_the_cli_imports_no_server_library() -> None:
    code = "import sys, adapt.cli; assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], env=child_env(), check=True)


def test_the_api_key_is_never_logged(servers: dict[str, Server]) -> None:
    for server in servers.values():
        text = server.output()
        assert KEY not in text and WRONG_KEY not in text
    assert "serving" in servers["full"].output() and "API key required" in servers["full"].output()
