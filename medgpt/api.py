"""The OpenAI-compatible HTTP API (FastAPI) over the generation engine.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (streamed as Server-Sent Events or whole),
and the simple POST /chat and POST /diagnose. Errors are in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}: a client's mistake is a 4xx, never a 500, on every route
(unknown routes and wrong methods too). Fields that would change the answer but are not supported are
refused by name, never ignored.

One client never holds up another: bodies are capped (413 beyond --max_request_bytes), parsed, templated
and tokenized off the event loop; a client that disconnects, streaming or not, stops its rows.
"""

import asyncio
import contextlib
import hmac
from dataclasses import replace
import json
import socket
import time
import uuid

from medgpt.data import RecordError, parse_json, request_messages
from medgpt.errors import InputError
from medgpt.engine import EngineBusy, Finished, SamplingParams

SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # OpenAI documents `seed` as a signed 64-bit integer
DISCONNECT_POLL_SECONDS = 0.25  # how often a whole answer's client is checked for having left

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
                 api_key: str | None = None, max_request_bytes: int = 4 << 20):
        self.engine, self.chat_format, self.tokenizer = engine, chat_format, tokenizer
        self.models = {model_name: None, **(adapters or {})}
        self.default_model = model_name
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())


class RequestGuard:
    """The API key and the body limit, as plain ASGI middleware. (Starlette's BaseHTTPMiddleware, behind
    `@app.middleware`, hides the client's disconnect from the route: request.is_disconnected() never turns
    true under it, so an abandoned non-streaming answer would run to its end. FastAPI's own max_body_size
    answers a body whose declared length is too large in plain text, not in OpenAI's shape.)"""

    def __init__(self, app, service: ModelService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        error = None
        if self.service.api_key and scope["path"] != "/health":
            header = headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.service.api_key.encode()):
                error = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                 code="invalid_api_key", kind="authentication_error")
        limit = self.service.max_request_bytes
        declared = headers.get("content-length", "")
        if error is None and declared.isdigit() and int(declared) > limit:
            error = _too_large(limit)
        if error is not None:
            # Read (and drop) what was sent, so that the client gets to read the answer; not for a client
            # waiting for "100 Continue" (asking for the body would invite it), and little for one without
            # the key.
            if headers.get("expect", "").lower() != "100-continue":
                await _drain(receive, 16 * max(limit, 1 << 20) if error.status == 413 else 1 << 16)
            return await _send_error(send, error)

        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a body sent without its length: stopped once it passes the limit
                    raise _too_large(limit)
            return message

        await self.app(scope, counted_receive, send)


def _too_large(limit: int) -> "ApiError":
    return ApiError(413, f"the request body is larger than {limit} bytes (the server's --max_request_bytes)",
                    code="request_too_large")


async def _drain(receive, most: int) -> None:
    """Read a refused request's body without keeping it, up to `most` bytes (then the connection is cut)."""
    received = 0
    while received <= most:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body"):
            return


async def _send_error(send, error: "ApiError") -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object, or a 400 saying why not: invalid JSON or UTF-8, or what makes parsed
    JSON unusable as records are judged in training data (nesting too deep, a lone UTF-16 surrogate such as
    \\ud800, which JSON can escape but no tokenizer can encode)."""
    try:
        body = parse_json(raw.decode("utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    if isinstance(body, RecordError):
        raise ApiError(400, f"the body is not usable: {body}")
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


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
    seed = _field(body, "seed", (int,), None, f"an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}",
                  lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1])
    penalty = _field(body, "repetition_penalty", number, 1.0, "a number in (0, 2]", lambda v: 0 < v <= 2)
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
                            top_p=float(top_p), top_k=max(0, top_k), seed=seed, stop=stop or [],
                            repetition_penalty=float(penalty))
    return params, n


# Chat-completion fields: those read above and below, those that change nothing in the answer, and those
# accepted only at their default because the answer would not be what they ask for.
CHAT_FIELDS = {"model", "messages", "tools", "tool_choice", "stream", "stream_options", "temperature", "top_p",
               "top_k", "n", "seed", "stop", "max_tokens", "max_completion_tokens", "repetition_penalty"}
NEUTRAL_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                  "safety_identifier"}
UNSUPPORTED_UNLESS_DEFAULT = {
    "logprobs": (lambda v: v in (None, False), "log-probabilities are not returned by this server"),
    "top_logprobs": (lambda v: v in (None, 0), "log-probabilities are not returned by this server"),
    "presence_penalty": (lambda v: v in (None, 0), "use 'repetition_penalty' (above 1 discourages repeats)"),
    "frequency_penalty": (lambda v: v in (None, 0), "use 'repetition_penalty' (above 1 discourages repeats)"),
    "logit_bias": (lambda v: v in (None, {}), "biasing tokens is not supported"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "only {\"type\": \"text\"} is supported "
                        "(no JSON mode or schemas)"),
}
SIMPLE_FIELDS = {"model", "max_tokens", "temperature", "seed"}


def check_fields(body: dict, known: set[str]) -> None:
    """A 400 naming the first field this route does not know, or supports only at its default."""
    for name, value in body.items():
        if name in UNSUPPORTED_UNLESS_DEFAULT and name not in known:
            is_default, why = UNSUPPORTED_UNLESS_DEFAULT[name]
            if not is_default(value):
                raise ApiError(400, f"'{name}' is not supported: {why}", name, "unsupported_parameter")
        elif name not in known and name not in NEUTRAL_FIELDS and name not in UNSUPPORTED_UNLESS_DEFAULT:
            raise ApiError(400, f"unrecognized request argument '{name}'", name, "unknown_parameter")


def chat_tools(body: dict):
    """The request's tool definitions as the template should see them, after `tool_choice`."""
    choice = body.get("tool_choice")
    if choice in (None, "auto"):
        return body.get("tools")
    if choice == "none":  # no call may be made: the model is not shown the tools
        return None
    if choice == "required" or isinstance(choice, dict):
        raise ApiError(400, "'tool_choice' can be 'auto' or 'none': forcing a call is not supported", "tool_choice",
                       "unsupported_parameter")
    raise ApiError(400, f"'tool_choice' must be 'auto' or 'none', got {json.dumps(choice)}", "tool_choice")


def build_app(service: ModelService):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(_):
        yield
        # The server is stopping (its requests answered, or cut off after the graceful timeout): rows still
        # decoding end now, so no handler waits on the engine.
        close = getattr(service.engine, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    app = FastAPI(title="MedGPT API", lifespan=lifespan)
    app.add_middleware(RequestGuard, service=service)

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error):
        return JSONResponse(ApiError(400, f"invalid request: {error.errors()[:1]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_, error: Exception):  # a fault of ours: logged with its traceback, answered in shape
        body = ApiError(500, f"internal error: {type(error).__name__}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # unknown routes, wrong methods
        messages = {404: f"no such route: {request.method} {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        body = ApiError(error.status_code, messages.get(error.status_code, str(error.detail))).body()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    async def json_body(request: Request, known: set[str]) -> dict:
        body = await asyncio.to_thread(parse_body, await request.body())  # megabytes parse off the event loop
        check_fields(body, known)
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": service.created,
                                            "owned_by": "medgpt"} for name in service.models]}

    def prompt_ids(messages, tools) -> list[int]:
        """The prompt's token ids (called in a worker thread: templating and tokenizing a long prompt take
        time the event loop owes to other clients)."""
        from template import TemplateError

        try:
            text = service.chat_format.render(messages, add_generation_prompt=True, tools=tools)
        except TemplateError as error:
            raise ApiError(400, str(error), "messages") from None
        return service.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(body: dict):
        messages_value = body.get("messages")
        if not isinstance(messages_value, list) or not messages_value:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        try:
            messages, tools = request_messages(messages_value, chat_tools(body))
        except RecordError as error:
            raise ApiError(400, str(error), "tools" if error.kind == "malformed tools" else "messages") from None
        return tools, prompt_ids(messages, tools)

    def submit(ids, params, sink, adapter):
        try:
            return service.engine.submit(ids, params, sink, adapter)
        except EngineBusy as error:
            raise ApiError(503, str(error), code="server_busy", kind="server_error") from None
        except ValueError as error:  # settings the engine cannot use
            raise ApiError(400, str(error)) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request, CHAT_FIELDS)
        model = served_model(body)
        stream = _field(body, "stream", (bool,), False, "true or false")
        stream_options = _field(body, "stream_options", (dict,), {}, "an object such as {\"include_usage\": true}")
        include_usage = _field(stream_options, "include_usage", (bool,), False, "true or false") if stream else False
        tools, ids = await asyncio.to_thread(chat_prompt, body)
        params, n = parse_sampling(body, len(ids), service.engine)
        params.keep_special_tokens = bool(tools)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events, requests = asyncio.Queue(), []
        loop = asyncio.get_running_loop()
        try:
            for index in range(n):
                choice_params = replace(params, seed=None if params.seed is None else params.seed + index)
                requests.append(submit(ids, choice_params, _sink(loop, events, index), service.models[model]))
        except ApiError:
            for submitted in requests:
                submitted.cancel()
            raise

        def finish(text: str, finished: Finished) -> tuple[str | None, list, str]:
            _check_finished(finished)
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
        async with _cancel_on_disconnect(request, requests):
            while any(result is None for result in results):
                index, event = await events.get()
                if isinstance(event, Finished):
                    results[index] = event
                else:
                    texts[index] += event
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
        if not isinstance(model, str):
            raise ApiError(400, f"'model' must be a string, one of: {', '.join(service.models)}", "model")
        if model not in service.models:
            raise ApiError(404, f"model '{model}' does not exist; served: {', '.join(service.models)}", "model",
                           "model_not_found")
        return model

    async def answer(request: Request, messages: list[dict], body: dict) -> str:
        """The greedy (unless asked otherwise) answer of the simple endpoints."""
        adapter = service.models[served_model(body)]
        ids = await asyncio.to_thread(prompt_ids, messages, None)
        options = {k: v for k, v in body.items() if k in ("max_tokens", "temperature", "seed")}
        params, _ = parse_sampling({"temperature": 0, **options}, len(ids), service.engine)
        events, loop = asyncio.Queue(), asyncio.get_running_loop()
        submitted = submit(ids, params, _sink(loop, events), adapter)
        pieces = []
        async with _cancel_on_disconnect(request, [submitted]):
            while not isinstance(event := await events.get(), Finished):
                pieces.append(event)
        _check_finished(event)
        return "".join(pieces).strip()

    @app.post("/chat")
    async def chat(request: Request):
        """{"message": text, "history": [messages], optional "model", "max_tokens", "temperature", "seed"}
        -> {"response", "history", "disclaimer"}."""
        body = await json_body(request, SIMPLE_FIELDS | {"message", "history"})
        message = body.get("message")
        if not isinstance(message, str) or not message.strip():
            raise ApiError(400, "'message' must be a non-empty string", "message")
        history = body.get("history") or []
        if not isinstance(history, list):
            raise ApiError(400, "'history' must be a list of chat messages", "history")
        try:
            messages, _ = request_messages(history + [{"role": "user", "content": message}])
        except RecordError as error:
            raise ApiError(400, f"'history' must be a list of chat messages: {error}", "history") from None
        response = await answer(request, messages, body)
        return {"response": response, "history": messages + [{"role": "assistant", "content": response}],
                "disclaimer": DISCLAIMER}

    @app.post("/diagnose")
    async def diagnose(request: Request):
        """{"patient_info", "symptoms", "test_results"} -> {"diagnosis", "disclaimer"}, asked the way the
        medical_inquiry template frames a consultation."""
        from template import get_template

        case_fields = ("patient_info", "symptoms", "test_results")
        body = await json_body(request, SIMPLE_FIELDS | set(case_fields))
        fields = {name: body.get(name, "") for name in case_fields}
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
        return {"diagnosis": await answer(request, messages, body), "disclaimer": DISCLAIMER}

    return app


def _check_finished(finished: Finished) -> None:
    """An answer that did not end on its own is an error, not a short answer."""
    if finished.reason == "error":
        raise ApiError(500, f"generation failed: {finished.error}", kind="server_error")
    if finished.reason == "cancelled":  # the server is stopping (or the client left: then nobody reads this)
        raise ApiError(503, "the answer was cut off: the server is stopping", code="server_shutting_down",
                       kind="server_error")


def serve(service: ModelService, host: str, port: int, grace_seconds: float = 5) -> None:
    """Run the API until SIGTERM or Ctrl-C. Then no new request is accepted; those in flight get
    `grace_seconds` to finish, after which the engine stops their rows and they are answered 503, so the
    server always exits, a few seconds later at most."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            async def stop_engine_after_grace():
                await asyncio.sleep(grace_seconds)
                close = getattr(service.engine, "close", None)
                if close is not None:
                    await asyncio.to_thread(close)

            stopper = asyncio.create_task(stop_engine_after_grace())
            try:
                await super().shutdown(sockets)
            finally:
                stopper.cancel()

    # uvicorn's own timeout is the backstop: it cuts off handlers that still have not finished.
    config = uvicorn.Config(build_app(service), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=grace_seconds + 5)
    Server(config).run()


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(request, requests: list):
    """While a whole (non-streamed) answer is being generated, watch the client: once it has gone, its
    requests are cancelled and the engine stops their rows at the next token. Leaving the block cancels them
    too, so an answer abandoned for any reason stops generating."""
    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        for submitted in requests:
            submitted.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        for submitted in requests:
            submitted.cancel()


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
