"""The OpenAI-compatible HTTP API (FastAPI) over the generation engine.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (streamed as Server-Sent Events or whole),
and the simple POST /chat and POST /diagnose. Errors are in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}: a client's mistake is a 4xx, never a 500.
"""

import asyncio
import hmac
from dataclasses import replace
import json
import socket
import time
import uuid

from medgpt.data import RecordError, request_messages
from medgpt.errors import InputError
from medgpt.engine import EngineBusy, Finished, SamplingParams

DISCLAIMER = ("For research and education only: not medical advice. Consult a qualified clinician for diagnosis "
              "and treatment; in an emergency call your local emergency number.")


def check_port_free(host: str, port: int) -> None:
    """A one-line error now, rather than a traceback from the server after minutes of model loading."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise InputError(f"cannot listen on {host}:{port}: {error.strerror} (is another server running? "
                             "pass --port)") from None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ModelService:
    """What the routes need: the engine, the chat format, the tokenizer and the names models are served as.
    `adapters` maps a served name to a LoRA adapter name loaded into the model (None: adapters off)."""

    def __init__(self, engine, chat_format, tokenizer, model_name: str, adapters: dict[str, str] | None = None,
                 api_key: str | None = None):
        self.engine, self.chat_format, self.tokenizer = engine, chat_format, tokenizer
        self.models = {model_name: None, **(adapters or {})}
        self.default_model = model_name
        self.api_key = api_key
        self.created = int(time.time())


def _field(body: dict, name: str, kinds: tuple, default, message: str, check=None):
    """body[name] when it is of `kinds` (a JSON true/false is no number) and passes `check`; else a 400."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds) or (check and not check(value)):
        raise ApiError(400, f"'{name}' must be {message}, got {json.dumps(value)}", name)
    return value


def parse_sampling(body: dict, prompt_length: int, engine) -> tuple[SamplingParams, int]:
    """The request's sampling settings (clamped to the context) and n."""
    number = (int, float)
    temperature = _field(body, "temperature", number, 1.0, "a number from 0 to 2", lambda v: 0 <= v <= 2)
    top_p = _field(body, "top_p", number, 1.0, "a number in (0, 1]", lambda v: 0 < v <= 1)
    top_k = _field(body, "top_k", (int,), 0, "an integer, -1 or 0 for no limit", lambda v: v >= -1)
    n = _field(body, "n", (int,), 1, "an integer from 1 to 16", lambda v: 1 <= v <= 16)
    seed = _field(body, "seed", (int,), None, "an integer")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 16 strings", "stop")
    limit = None
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        limit = _field(body, name, (int,), limit, "a positive integer", lambda v: v >= 1)
    room = engine.context_length - prompt_length
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_length} tokens, the model's context is {engine.context_length}: "
                       "no room for an answer", "messages", "context_length_exceeded")
    params = SamplingParams(max_new_tokens=min(limit or room, room), temperature=float(temperature),
                            top_p=float(top_p), top_k=max(0, top_k), seed=seed, stop=stop or [])
    return params, n


def build_app(service: ModelService):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="MedGPT API")

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error):
        return JSONResponse(ApiError(400, f"invalid request: {error.errors()[:1]}").body(), status_code=400)

    @app.middleware("http")
    async def bearer_auth(request: Request, call_next):
        if service.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), service.api_key.encode()):
                error = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                 code="invalid_api_key", kind="authentication_error")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": service.created,
                                            "owned_by": "medgpt"} for name in service.models]}

    def prompt_ids(messages, tools) -> list[int]:
        from template import TemplateError

        try:
            text = service.chat_format.render(messages, add_generation_prompt=True, tools=tools)
        except TemplateError as error:
            raise ApiError(400, str(error), "messages") from None
        return service.tokenizer(text, add_special_tokens=False)["input_ids"]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        model = served_model(body)
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        try:
            messages, tools = request_messages(body["messages"], body.get("tools"))
        except RecordError as error:
            raise ApiError(400, str(error), "messages") from None
        ids = prompt_ids(messages, tools)
        params, n = parse_sampling(body, len(ids), service.engine)
        params.keep_special_tokens = bool(tools)
        stream = _field(body, "stream", (bool,), False, "true or false")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events, requests = asyncio.Queue(), []
        loop = asyncio.get_running_loop()
        try:
            for index in range(n):
                choice_params = replace(params, seed=None if params.seed is None else params.seed + index)
                requests.append(service.engine.submit(ids, choice_params, _sink(loop, events, index),
                                                      service.models[model]))
        except EngineBusy as error:
            for submitted in requests:
                submitted.cancel()
            raise ApiError(503, str(error), code="server_busy", kind="server_error") from None

        def finish(text: str, finished: Finished) -> tuple[str | None, list, str]:
            if finished.reason == "error":
                raise ApiError(500, f"generation failed: {finished.error}", kind="server_error")
            content, calls = (service.chat_format.parse_tool_calls(text, tools) if tools else (text, []))
            reason = "tool_calls" if calls else ("length" if finished.reason == "length" else "stop")
            return content, [_openai_call(call, number) for number, call in enumerate(calls)], reason

        def chunk(delta: dict, index: int, reason=None) -> str:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": index, "delta": delta, "finish_reason": reason}]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        if stream:
            async def event_stream():
                texts, done, completion_tokens = [""] * n, 0, 0
                try:
                    for index in range(n):
                        yield chunk({"role": "assistant", "content": ""}, index)
                    while done < n:
                        index, event = await events.get()
                        if isinstance(event, Finished):
                            done += 1
                            completion_tokens += event.completion_tokens
                            content, calls, reason = finish(texts[index], event)
                            if tools:  # calls are known only once the answer is whole
                                delta = {"content": content} if content else {}
                                if calls:
                                    delta["tool_calls"] = calls
                                if delta:
                                    yield chunk(delta, index)
                            yield chunk({}, index, reason)
                        else:
                            texts[index] += event
                            if not tools:
                                yield chunk({"content": event}, index)
                    if include_usage:
                        usage = _usage(len(ids), completion_tokens)
                        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": model, "choices": [], "usage": usage}
                        yield f"data: {json.dumps(payload)}\n\n"
                    yield "data: [DONE]\n\n"
                except ApiError as error:  # the status line is sent already: the error goes in the stream
                    yield f"data: {json.dumps(error.body())}\n\n"
                finally:  # the client went away, or the answer is complete: nothing keeps generating
                    for submitted in requests:
                        submitted.cancel()

            return StreamingResponse(event_stream(), media_type="text/event-stream")

        texts, results = [""] * n, [None] * n
        try:
            while any(result is None for result in results):
                try:
                    index, event = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise
                    continue
                if isinstance(event, Finished):
                    results[index] = event
                else:
                    texts[index] += event
        finally:
            for submitted in requests:
                submitted.cancel()
        choices = []
        for index, (text, finished) in enumerate(zip(texts, results)):
            content, calls, reason = finish(text, finished)
            message = {"role": "assistant", "content": content if (content or not calls) else None}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": index, "message": message, "finish_reason": reason})
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": _usage(len(ids), sum(r.completion_tokens for r in results))}

    def served_model(body: dict) -> str:
        model = body.get("model", service.default_model)
        if model not in service.models:
            raise ApiError(404, f"model '{model}' does not exist; served: {', '.join(service.models)}", "model",
                           "model_not_found")
        return model

    async def answer(messages: list[dict], body: dict) -> str:
        """The greedy (unless asked otherwise) answer of the simple endpoints."""
        adapter = service.models[served_model(body)]
        ids = prompt_ids(messages, None)
        options = {k: v for k, v in body.items() if k in ("max_tokens", "temperature", "seed")}
        params, _ = parse_sampling({"temperature": 0, **options}, len(ids), service.engine)
        events, loop = asyncio.Queue(), asyncio.get_running_loop()
        try:
            submitted = service.engine.submit(ids, params, _sink(loop, events),
                                              adapter)
        except EngineBusy as error:
            raise ApiError(503, str(error), code="server_busy", kind="server_error") from None
        pieces = []
        try:
            while not isinstance(event := await events.get(), Finished):
                pieces.append(event)
        finally:
            submitted.cancel()
        if event.reason == "error":
            raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
        return "".join(pieces).strip()

    @app.post("/chat")
    async def chat(request: Request):
        """{"message": text, "history": [messages], optional "model", "max_tokens", "temperature", "seed"}
        -> {"response", "history", "disclaimer"}."""
        body = await json_body(request)
        message = body.get("message")
        if not isinstance(message, str) or not message.strip():
            raise ApiError(400, "'message' must be a non-empty string", "message")
        history = body.get("history") or []
        try:
            messages, _ = request_messages(history + [{"role": "user", "content": message}])
        except (RecordError, TypeError) as error:
            raise ApiError(400, f"'history' must be a list of chat messages: {error}", "history") from None
        response = await answer(messages, body)
        return {"response": response, "history": messages + [{"role": "assistant", "content": response}],
                "disclaimer": DISCLAIMER}

    @app.post("/diagnose")
    async def diagnose(request: Request):
        """{"patient_info", "symptoms", "test_results"} -> {"assessment", "disclaimer"}, asked the way the
        medical_inquiry template frames a consultation."""
        from template import get_template

        body = await json_body(request)
        fields = {name: body.get(name, "") for name in ("patient_info", "symptoms", "test_results")}
        for name, value in fields.items():
            if not isinstance(value, str):
                raise ApiError(400, f"'{name}' must be a string", name)
        if not any(value.strip() for value in fields.values()):
            raise ApiError(400, "give at least one of 'patient_info', 'symptoms', 'test_results'", "symptoms")
        case = "\n".join(f"{label}: {fields[name].strip()}" for name, label in (
            ("patient_info", "基本情况 / Patient information"), ("symptoms", "症状 / Symptoms"),
            ("test_results", "检查结果 / Test results")) if fields[name].strip())
        messages = [{"role": "system", "content": get_template("medical_inquiry").default_system},
                    {"role": "user", "content": case}]
        assessment = await answer(messages, body)
        return {"assessment": assessment, "disclaimer": DISCLAIMER}

    return app


def _sink(loop, events: asyncio.Queue, index: int | None = None):
    """Where the engine's worker thread delivers a request's events: the request handler's queue, on its loop
    (tagged with the choice's index when given). Once the server has stopped, events are dropped."""
    def put(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, event if index is None else (index, event))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
    return put


def _openai_call(call: dict, index: int) -> dict:
    return {"index": index, "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["function"]["name"],
                         "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
