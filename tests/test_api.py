"""openai_api.py on loopback with a tiny model, driven by the official `openai` client."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import REPO, make_random_adapter

KEY = "test-key"
QUESTIONS = ["What causes anemia?", "高血压怎么办？", "Is fever dangerous?", "What is insulin?",
             "咳嗽两周了", "How much water a day?", "Why do joints ache?", "What is a normal pulse?"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    return {name: make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp(name), seed)
            for name, seed in (("doctor", 1), ("nurse", 2))}


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("api") / "server.log", "w+")
    command = [sys.executable, os.path.join(REPO, "openai_api.py"), "--base_model", tiny_model_dir,
               "--template_name", "chatml", "--port", str(port), "--api_key", KEY, "--context_length", "256",
               "--served_model_name", "tiny", "--lora_modules", *(f"{n}={p}" for n, p in adapters.items())]
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None:
                break
            time.sleep(0.5)
    else:
        process.kill()
    if process.poll() is not None:
        log.seek(0)
        pytest.fail(f"the API did not start:\n{log.read()[-3000:]}")
    yield {"base": base, "port": port, "process": process, "log": log.name}
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, question, model="doctor", **options):
    # The random base model answers with newlines only; its adapters give varied text.
    options = {"max_tokens": 8, "temperature": 0, **options}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **options)


def test_models_health_and_a_plain_answer(client, server):
    assert [model.id for model in client.models.list()] == ["tiny", "doctor", "nurse"]
    with urllib.request.urlopen(server["base"] + "/health") as response:  # open without the key
        assert json.loads(response.read()) == {"status": "ok"}
    reply = ask(client, QUESTIONS[0])
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 8
    assert ask(client, QUESTIONS[0]).id != reply.id


def test_streamed_chunks_join_to_the_plain_answer_and_usage_comes_last(client):
    whole = ask(client, QUESTIONS[1], max_tokens=12).choices[0].message.content
    chunks = list(ask(client, QUESTIONS[1], max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 12
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_stop_strings_and_n(client):
    reply = ask(client, QUESTIONS[2], max_completion_tokens=3, max_tokens=50)  # the newer name wins
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    text = ask(client, QUESTIONS[2], max_tokens=16).choices[0].message.content
    stop = text[4:7]
    stopped = ask(client, QUESTIONS[2], max_tokens=16, stop=[stop, "never appears"])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, QUESTIONS[2], max_tokens=16, stop=stop, stream=True))
    assert streamed == text[: text.index(stop)]  # cut mid-stream too
    two = ask(client, QUESTIONS[2], n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == two.choices[1].message.content  # greedy
    sampled = ask(client, QUESTIONS[2], n=2, temperature=1.0, seed=7, max_tokens=12)
    again = ask(client, QUESTIONS[2], n=2, temperature=1.0, seed=7, max_tokens=12)
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]  # seeded


def test_errors_come_in_openais_shape(client, server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as error:
        ask(client, "Hi", model="gpt-4")
    assert error.value.body["code"] == "model_not_found" and "tiny" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, "headache " * 300)
    assert "256" in error.value.body["message"] and error.value.body["code"] == "context_length_exceeded"
    for bad in ({"messages": []}, {"messages": [{"role": "assistant", "content": "Hi"}]},
                {"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="tiny", **bad)
        assert set(error.value.body) == {"message", "type", "param", "code"}
    request = urllib.request.Request(server["base"] + "/v1/chat/completions", data=b"{not json", method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request)
    assert error.value.code == 400 and "not valid JSON" in json.loads(error.value.read())["error"]["message"]


def test_adapters_chosen_by_model_answer_as_inference_does(client, tiny_model_dir, adapters):
    from medgpt.generation import ChatModel, GenerationArguments, InferenceModelArguments

    greedy = GenerationArguments(max_new_tokens=8, temperature=0)
    answers = {}
    for name, path in adapters.items():
        model = ChatModel(InferenceModelArguments(base_model=tiny_model_dir, lora_model=path, template_name="chatml"))
        expected = model.answer_batch([[{"role": "user", "content": QUESTIONS[3]}]], greedy)[0]
        answers[name] = ask(client, QUESTIONS[3], model=name).choices[0].message.content
        assert answers[name].strip() == expected
    assert answers["doctor"] != answers["nurse"] != ask(client, QUESTIONS[3], model="tiny").choices[0].message.content


def test_concurrent_requests_each_get_the_answer_they_get_alone(client):
    alone = [ask(client, question).choices[0].message.content for question in QUESTIONS]
    together = [None] * len(QUESTIONS)

    def run(index):
        together[index] = ask(client, QUESTIONS[index]).choices[0].message.content

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone
    assert len(set(alone)) > 4  # different answers: a mix-up between requests would show


def test_simple_chat_and_diagnose_endpoints(server):
    def post(path, body):
        request = urllib.request.Request(server["base"] + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read())

    first = post("/chat", {"message": "I have a headache.", "max_tokens": 6, "model": "doctor"})
    assert first["response"] and "not medical advice" in first["disclaimer"]
    assert [m["role"] for m in first["history"]] == ["user", "assistant"]
    second = post("/chat", {"message": "Two days.", "history": first["history"], "max_tokens": 6, "model": "doctor"})
    assert [m["role"] for m in second["history"]] == ["user", "assistant"] * 2
    diagnosis = post("/diagnose", {"patient_info": "男，45岁", "symptoms": "胸闷", "test_results": "血压160/100", "max_tokens": 6,
                                  "model": "doctor"})
    assert diagnosis["diagnosis"] and diagnosis["disclaimer"]  # the field medical-diagnosis clients read
    with pytest.raises(urllib.error.HTTPError) as error:
        post("/diagnose", {})
    assert error.value.code == 400


def test_a_port_in_use_is_a_one_line_error(tiny_model_dir, capsys):
    import openai_api

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            openai_api.main(["--base_model", tiny_model_dir, "--port", str(port)])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot listen on 127.0.0.1:") and "pass --port" in last


class ScriptedEngine:
    """Stands in for the model: answers every request with `answer`, piece by piece, and keeps the prompts.
    The API's own handling of tools, calls and streaming is what these tests check."""

    context_length = 4096

    def __init__(self, answer: str):
        self.answer, self.prompts, self.requests = answer, [], []
        self.busy, self.delay = False, 0.0

    def submit(self, prompt_ids, params, sink, adapter=None):
        from medgpt.engine import EngineBusy, Finished, Request

        if self.busy:
            raise EngineBusy("the server is busy: 64 requests are waiting")
        self.prompts.append(prompt_ids)
        request = Request(prompt_ids, params, sink, adapter)
        self.requests.append(request)

        def run():
            pieces = [self.answer[i:i + 5] for i in range(0, len(self.answer), 5)]
            for count, piece in enumerate(pieces):
                if request.cancelled.is_set():
                    sink(Finished("cancelled", count, len(prompt_ids)))
                    return
                sink(piece)
                time.sleep(self.delay)
            sink(Finished("stop", len(pieces), len(prompt_ids)))

        threading.Thread(target=run, daemon=True).start()
        return request


@contextlib.contextmanager
def served_in_thread(service):
    """The API over `service` on a free loopback port in a thread of this process: its base URL."""
    import uvicorn

    from medgpt.api import build_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def scripted(tokenizer_dir):
    from transformers import AutoTokenizer

    from medgpt.api import ModelService
    from medgpt.chat import ChatFormat

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    engine = ScriptedEngine('Let me check.\n<tool_call>\n{"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}\n</tool_call>')
    service = ModelService(engine, ChatFormat.for_model("qwen", tokenizer), tokenizer, "scripted")
    with served_in_thread(service) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0), engine, tokenizer


BMI_TOOL = {"type": "function", "function": {"name": "bmi", "description": "Body-mass index",
                                             "parameters": {"type": "object", "properties": {"kg": {"type": "number"}}}}}


def test_tool_calls_in_the_answer_come_back_as_openai_tool_calls(scripted):
    client, engine, tokenizer = scripted
    history = [{"role": "user", "content": "BMI for 70 kg, 1.75 m?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "bmi", "arguments": '{"kg": 70, "m": 1.75}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"bmi": 22.9}'}]
    reply = client.chat.completions.create(model="scripted", messages=history, tools=[BMI_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    call, = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "bmi" and call.id
    assert json.loads(call.function.arguments) == {"kg": 70, "m": 1.75}
    # The prompt carried the definitions, the earlier call and its result in Qwen's format.
    prompt = tokenizer.decode(engine.prompts[-1])
    assert '<tools>\n{"type": "function", "function": {"name": "bmi"' in prompt
    assert '<tool_call>\n{"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}\n</tool_call>' in prompt
    assert "<tool_response>\n{\"bmi\": 22.9}\n</tool_response>" in prompt

    chunks = list(client.chat.completions.create(model="scripted", messages=history, tools=[BMI_TOOL], stream=True))
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["bmi"] and json.loads(calls[0].function.arguments) == {"kg": 70, "m": 1.75}
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # Without tools in the request the same text is plain content.
    plain = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}])
    assert plain.choices[0].finish_reason == "stop" and "<tool_call>" in plain.choices[0].message.content


def test_a_full_queue_is_a_503_and_a_client_that_leaves_stops_its_generation(scripted):
    import httpx

    client, engine, _ = scripted
    engine.busy = True
    try:
        with pytest.raises(openai.InternalServerError) as error:
            client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Hi"}])
        assert error.value.status_code == 503 and error.value.body["code"] == "server_busy"
    finally:
        engine.busy = False
    engine.delay = 0.2  # about 5 s for the whole answer
    try:
        body = {"model": "scripted", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
        with httpx.stream("POST", str(client.base_url) + "chat/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if '"content": "Let' in line or '"content":"Let' in line:
                    break  # the first words arrived; the client goes away
        request = engine.requests[-1]
        deadline = time.monotonic() + 10
        while not request.cancelled.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert request.cancelled.is_set(), "the generation went on after the client left"
    finally:
        engine.delay = 0.0


def raw_post(base, path, data: bytes, key=KEY, timeout=30, method="POST"):
    """(status, parsed body) of a request sent as given, no client library in between."""
    import httpx

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    response = httpx.request(method, base + path, content=data, headers=headers, timeout=timeout)
    return response.status_code, response.json()


MALFORMED = [  # (route, body, status, param the error names)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "stream_options": "x"},
     400, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "stream_options": [1]},
     400, "stream_options"),
    ("/v1/chat/completions", {"model": ["tiny"], "messages": [{"role": "user", "content": "Hi"}]}, 400, "model"),
    ("/v1/chat/completions", {"model": {"id": "tiny"}, "messages": [{"role": "user", "content": "Hi"}]}, 400, "model"),
    ("/chat", {"model": ["tiny"], "message": "Hi"}, 400, "model"),
    ("/chat", {"message": "Hi", "history": "earlier"}, 400, "history"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "presence_penalty": 1}, 400,
     "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "required",
                              "tools": [BMI_TOOL]}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_token": 5}, 400, "max_token"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "seed": 2 ** 70, "temperature": 1},
     400, "seed"),
    ("/diagnose", {"symptoms": "fever", "assessment_style": "short"}, 400, "assessment_style"),
]


def test_client_mistakes_are_4xx_in_openais_shape_on_every_route_with_no_traceback(server):
    with open(server["log"]) as log:
        log.seek(0, os.SEEK_END)
        start = log.tell()
    for route, body, status, param in MALFORMED:
        code, answer = raw_post(server["base"], route, json.dumps(body).encode())
        assert (code, answer["error"]["param"]) == (status, param), (route, body, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    code, answer = raw_post(server["base"], "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}')
    assert code == 400 and "lone surrogate" in answer["error"]["message"]
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    code, answer = raw_post(server["base"], "/v1/chat/completions", deep)
    assert code == 400 and "nested more than 100 levels deep" in answer["error"]["message"]
    code, answer = raw_post(server["base"], "/v1/chat/completions", b'{"seed": ' + b"7" * 5000 + b"}")
    assert code == 400 and "not valid JSON" in answer["error"]["message"]  # Python's cap on integer digits
    code, answer = raw_post(server["base"], "/v1/no/such/route", b"{}")
    assert code == 404 and answer["error"]["message"] == "no such route: POST /v1/no/such/route"
    code, answer = raw_post(server["base"], "/v1/chat/completions", b"", method="GET")
    assert code == 405 and answer["error"]["type"] == "invalid_request_error"
    # Defaults of the refused fields, and fields that change nothing, are accepted.
    fine = {"messages": [{"role": "user", "content": "Hi"}], "model": "doctor", "max_tokens": 2, "logprobs": False,
            "presence_penalty": 0, "response_format": {"type": "text"}, "user": "u1", "tool_choice": "none",
            "seed": -(2 ** 63), "temperature": 0.5}
    assert raw_post(server["base"], "/v1/chat/completions", json.dumps(fine).encode())[0] == 200
    edge = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 1e-45,
            "repetition_penalty": 1e-45}  # at the edge of what floats hold: still an answer
    code, answer = raw_post(server["base"], "/v1/chat/completions", json.dumps(edge).encode())
    assert code == 200 and answer["usage"]["completion_tokens"] >= 1
    with open(server["log"]) as log:
        log.seek(start)
        assert "Traceback" not in log.read()


def test_a_body_over_the_limit_is_a_413_at_once_and_health_answers_meanwhile(server):
    import httpx

    results = {}

    def send_big():
        started = time.monotonic()
        results["big"] = raw_post(server["base"], "/v1/chat/completions", b" " * (10 << 20))
        results["big_seconds"] = time.monotonic() - started

    sender = threading.Thread(target=send_big)
    sender.start()
    started = time.monotonic()
    assert httpx.get(server["base"] + "/health", timeout=5).status_code == 200
    health_seconds = time.monotonic() - started
    sender.join(timeout=30)
    code, answer = results["big"]
    assert code == 413 and answer["error"]["code"] == "request_too_large" and "4194304 bytes" in answer["error"]["message"]
    assert results["big_seconds"] < 1 and health_seconds < 1

    def chunks():  # no Content-Length: the body is stopped once it passes the limit
        for _ in range(12):
            yield b" " * (1 << 20)

    response = httpx.post(server["base"] + "/v1/chat/completions", content=chunks(), timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_a_poisoned_request_harms_no_other_and_sigterm_stops_the_server(tiny_model_dir, tmp_path):
    import signal

    import httpx

    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "openai_api.py"), "--base_model", tiny_model_dir,
                                "--template_name", "chatml", "--port", str(port)], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        bodies = [{"messages": [{"role": "user", "content": q}], "max_tokens": 40, "temperature": 1, **extra}
                  for q, extra in ((QUESTIONS[0], {"seed": 1}), ("Hi", {"seed": 2 ** 70}), (QUESTIONS[1], {"seed": 2}))]
        replies = [None] * 3

        def send(index):
            replies[index] = raw_post(base, "/v1/chat/completions", json.dumps(bodies[index]).encode(), key=None)

        threads = [threading.Thread(target=send, args=(index,)) for index in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert replies[1][0] == 400 and "-9223372036854775808 to 9223372036854775807" in replies[1][1]["error"]["message"]
        for code, answer in (replies[0], replies[2]):
            assert code == 200 and answer["usage"]["completion_tokens"] >= 1
        # A long answer in flight does not keep the server from stopping.
        body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 900, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            try:  # the answer ends, or is cut off once the server stops
                for _ in lines:
                    pass
            except httpx.HTTPError:
                pass
        process.wait(timeout=10)
        assert time.monotonic() - stopped < 10
    finally:
        if process.poll() is None:
            process.kill()
        log.seek(0)
        assert "Traceback" not in log.read()


@pytest.fixture()
def endless_server(tiny_model_dir):
    """The real engine over the tiny model, with no stop token (it answers until its limit), in this process so
    that the test can watch the engine's rows; an API key is set."""
    from medgpt.api import ModelService
    from medgpt.engine import GenerationEngine
    from medgpt.generation import ChatModel, InferenceModelArguments

    chat_model = ChatModel(InferenceModelArguments(base_model=tiny_model_dir, template_name="chatml"))
    engine = GenerationEngine(chat_model.model, chat_model.tokenizer, [], context_length=1 << 20)
    service = ModelService(engine, chat_model.chat_format, chat_model.tokenizer, "tiny", api_key=KEY)
    with served_in_thread(service) as base:
        yield base, engine
    engine.close()


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/chat"])
def test_a_client_that_leaves_a_whole_answer_stops_its_row(endless_server, route):
    import httpx

    base, engine = endless_server
    body = ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100_000} if route != "/chat"
            else {"message": "Hi", "max_tokens": 100_000})
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s and closes the connection
        httpx.post(base + route, json=body, timeout=2, headers={"Authorization": f"Bearer {KEY}"})
    assert engine.active_rows == 1  # still decoding when the client left
    left = time.monotonic()
    while engine.active_rows and time.monotonic() - left < 2:
        time.sleep(0.02)
    assert engine.active_rows == 0, "the row went on after its client left"
