"""One generation engine for serving: a worker thread owns the model and answers queued requests in batches.

Requests are taken from the queue in waves of up to `max_batch_size`, left-padded into one batch and decoded
together step by step, each row with its own sampling settings (temperature, top_p, top_k, seed, maximum
length, stop strings). Only the worker thread touches the model, so concurrent callers never race on it.
Text is streamed per request as it is decoded: a stop string is cut from the text, also when it arrives
split over several tokens (text that could still become a stop string is held back until it cannot), and
incomplete UTF-8 characters wait for their last byte (and an answer cut inside one ends before it). A
request whose client went away is cancelled and stops using the batch; a full queue is refused at once
(EngineBusy), never left to hang.

Requests are isolated: settings are checked before a request is queued, and a failure while serving one row
(its sampling, its sink) ends that row alone with a Finished("error") while the others go on. A failure of
the model's forward pass ends the rows that shared it; every request taken from the queue gets its Finished.
"""

import atexit
import contextlib
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

logger = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """The request queue is full."""


# torch.Generator.manual_seed takes 64 bits: larger seeds (a client's seed plus a choice's index) are folded in.
SEED_BITS = (1 << 64) - 1


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0  # above 1 discourages tokens already in the prompt or the answer
    keep_special_tokens: bool = False  # tool-call markers are special tokens the parser needs

    def check(self) -> None:
        """A ValueError naming the first setting the engine cannot use: raised before a request is queued,
        so that one request's settings never fail the batch it would have joined."""
        checks = (
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", _number(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
            ("repetition_penalty", _number(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0"),
            ("stop", isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop), "a list of strings"),
        )
        for name, good, expected in checks:
            if not good:
                raise ValueError(f"sampling setting {name} must be {expected}, got {getattr(self, name)!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Finished:
    """The last event of a request."""
    reason: str  # "stop" (end of turn or a stop string), "length", "cancelled", "error"
    completion_tokens: int
    prompt_tokens: int
    error: str = ""


class Request:
    """One prompt being answered. Events go to `sink`: text pieces (str), then one Finished."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink, adapter: str | None = None):
        self.id = uuid.uuid4().hex
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.adapter = adapter  # a LoRA adapter's name, or None for the model as loaded
        self.cancelled = threading.Event()
        self.created = time.monotonic()
        self.finished = False  # its Finished event was sent

    def emit(self, event) -> None:
        """Hand an event to the caller. A sink that fails (its caller gone wrong) cancels this request only."""
        if self.finished:
            return
        self.finished = isinstance(event, Finished)
        try:
            self.sink(event)
        except Exception:
            logger.exception("a request's sink failed: the request is cancelled")
            self.cancel()

    def cancel(self) -> None:
        self.cancelled.set()


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, request: Request, stop_strings: list[str], generator):
        self.request = request
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stop_strings = stop_strings
        self.generator = generator
        self.done = False


class GenerationEngine:
    def __init__(self, model, tokenizer, stop_token_ids: list[int], context_length: int,
                 max_batch_size: int = 8, max_queue: int = 64, gather_seconds: float = 0.05):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_token_ids or [0])[0]
        self.max_queue = max_queue
        self.gather_seconds = gather_seconds
        self._pending: deque[Request] = deque()
        self._taken: list[Request] = []
        self.active_rows = 0  # rows being decoded now (for monitoring, and tests of cancellation)
        self._ready = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="generation-engine", daemon=True)
        self._worker.start()
        # A daemon thread still inside a torch operation when the interpreter exits aborts the process
        # ("terminate called without an active exception"): let the worker finish its step and stop first.
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the worker after its current step; requests still waiting end as cancelled. The engine then
        lets go of the model, so a process that moves on to another model can free this one's memory."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._worker.join(timeout=60)
        atexit.unregister(self.close)
        if not self._worker.is_alive():
            self.model = None

    # ----- callers --------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink, adapter: str | None = None) -> Request:
        """Queue a request; its events go to `sink` (called from the worker thread). EngineBusy when full,
        ValueError for settings the engine cannot use (see SamplingParams.check)."""
        params.check()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        request = Request(prompt_ids, params, sink, adapter)
        with self._ready:
            if self._closed:
                raise EngineBusy("the server is stopping")
            if len(self._pending) >= self.max_queue:  # requests whose clients left give their places up first
                for waiting in [waiting for waiting in self._pending if waiting.cancelled.is_set()]:
                    self._pending.remove(waiting)
                    self._skip_cancelled(waiting)
            if len(self._pending) >= self.max_queue:
                raise EngineBusy(f"the server is busy: {self.max_queue} requests are waiting")
            self._pending.append(request)
            self._ready.notify()
        return request

    def stream(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None):
        """Yield text pieces as they are generated; returns (via StopIteration.value) the Finished event.
        Closing the generator early cancels the request."""
        events: queue.Queue = queue.Queue()
        request = self.submit(prompt_ids, params, events.put, adapter)
        try:
            while True:
                event = events.get()
                if isinstance(event, Finished):
                    return event
                yield event
        finally:
            request.cancel()

    def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> tuple[str, Finished]:
        """The whole answer and its Finished event."""
        pieces, stream = [], self.stream(prompt_ids, params, adapter)
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as stop:
                return "".join(pieces), stop.value

    def max_new_tokens(self, prompt_length: int, requested: int) -> int:
        """The answer length a prompt leaves room for in the context."""
        return max(0, min(requested, self.context_length - prompt_length))

    # ----- the worker -----------------------------------------------------------------------------------

    def _next_batch(self) -> list[Request]:
        """Up to max_batch_size waiting requests, oldest first, all for the same adapter. Requests that arrive
        within `gather_seconds` of the first join it: clients that ask at the same moment share a batch."""
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if self._closed:
                batch, self._pending = list(self._pending), deque()
                for request in batch:
                    request.cancel()
                return [request for request in batch if not self._skip_cancelled(request)]
            deadline = time.monotonic() + self.gather_seconds
            while len(self._pending) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._ready.wait(left)
            batch = self._pop_waiting(self._pending[0].adapter, self.max_batch_size)
        return [request for request in batch if not self._skip_cancelled(request)]

    def _pop_waiting(self, adapter: str | None, room: int) -> list[Request]:
        """Take up to `room` waiting requests for `adapter`, oldest first (the caller holds `_ready`)."""
        taken = [request for request in self._pending if request.adapter == adapter][:room]
        for request in taken:
            self._pending.remove(request)
        return taken

    def _adapter(self, name: str | None):
        """The model with `name`'s LoRA adapter active, or (None) with adapters off."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return contextlib.nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def _serve(self) -> None:
        while not self._closed:
            batch = self._next_batch()
            if not batch:
                continue
            self._taken = list(batch)  # every request of this run, those that join it later included
            try:
                with self._adapter(batch[0].adapter):
                    self._run(batch)
            except Exception as error:  # never leave a caller waiting: every row still running ends
                logger.exception("generation failed")
                for request in self._taken:
                    _fail(request, error)
            finally:
                self.active_rows = 0
                for request in self._taken:  # a safety net: no request taken from the queue waits forever
                    if not request.finished:
                        request.emit(Finished("cancelled", 0, len(request.prompt_ids)))
                self._taken = []

    @staticmethod
    def _skip_cancelled(request: Request) -> bool:
        if request.cancelled.is_set():
            request.emit(Finished("cancelled", 0, len(request.prompt_ids)))
            return True
        return False

    @torch.inference_mode()
    def _run(self, batch: list[Request]) -> None:
        """Decode `batch` step by step. Finished rows leave the batch; requests for the same adapter that
        arrive meanwhile join it (continuous batching) when the model's cache allows it."""
        adapter = batch[0].adapter
        prefilled = self._prefill(batch)
        if prefilled is None:
            return
        rows, cache, attention, tokens = prefilled
        while True:
            if self._closed:  # the process is ending: every row stops at its next token
                for row in rows:
                    row.request.cancel()
            active = [index for index, row in enumerate(rows) if not row.done]
            self.active_rows = len(active)
            if len(active) < len(rows):
                if not active:
                    return
                keep = torch.tensor(active, device=attention.device)
                cache.batch_select_indices(keep)
                rows, attention, tokens = [rows[i] for i in active], attention[keep], tokens[keep]
            if len(rows) < self.max_batch_size and _joinable(cache):
                newcomers = self._take_waiting(adapter, self.max_batch_size - len(rows))
                self._taken += newcomers
                # The newcomers' prefill is their own forward pass: if it fails, they end and the rows
                # already decoding go on with their cache untouched.
                prefilled = self._prefill(newcomers) if newcomers else None
                if prefilled is not None:
                    new_rows, new_cache, new_attention, new_tokens = prefilled
                    attention = _merge(cache, new_cache, attention, new_attention)
                    rows, tokens = rows + new_rows, torch.cat([tokens, new_tokens])
                    continue  # newcomers may have finished at once (a stop token first)
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], -1)
            positions = attention.sum(-1, keepdim=True) - 1
            output = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=attention, position_ids=positions,
                                past_key_values=cache, use_cache=True)
            tokens = self._step(rows, output.logits[:, -1, :])

    def _prefill(self, batch: list[Request]):
        """Run the prompts of `batch` (left-padded) and choose each row's first token:
        (rows, cache, attention mask, tokens), or None when no row could start (each has its Finished)."""
        rows = []
        for request in batch:
            try:
                rows.append(_Row(request, [s for s in request.params.stop if s], _generator(request.params)))
            except Exception as error:  # this request's settings: it alone ends
                logger.exception("a request could not start")
                _fail(request, error)
        if not rows:
            return None
        device = self.model.device
        longest = max(len(row.request.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        for index, row in enumerate(rows):
            ids = row.request.prompt_ids
            input_ids[index, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[index, longest - len(ids):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        try:
            # logits_to_keep=1: only the last position's logits are needed (the vocabulary projection of every
            # prompt token would be a fifth of the prefill's work).
            output = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                past_key_values=DynamicCache(config=self.model.config), use_cache=True,
                                logits_to_keep=1)
        except Exception as error:  # e.g. out of memory on these prompts: the rows of this prefill end
            logger.exception("the prefill of %d request(s) failed", len(rows))
            for row in rows:
                _fail(row.request, error)
            return None
        return rows, output.past_key_values, attention, self._step(rows, output.logits[:, -1, :])

    def _step(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Choose every row's next token, hand it to the row, and return them as the next input."""
        logits = logits.float().cpu()
        for index, row in enumerate(rows):
            penalty = row.request.params.repetition_penalty
            if penalty != 1 and not row.done:  # as transformers applies it: divide positive logits, multiply negative
                seen = torch.tensor(sorted(set(row.request.prompt_ids) | set(row.tokens)), dtype=torch.long)
                values = logits[index, seen]
                logits[index, seen] = torch.where(values > 0, values / penalty, values * penalty)
        greedy = logits.argmax(-1).tolist()
        chosen = list(greedy)
        for index, row in enumerate(rows):
            if row.done:
                continue
            try:
                if row.request.params.temperature > 0:
                    chosen[index] = self._sample(logits[index], row)
                self._advance(row, chosen[index])
            except Exception as error:  # this row's sampling or text: it alone ends, the batch goes on
                logger.exception("a request failed while decoding")
                row.done = True
                _fail(row.request, error)
        return torch.tensor(chosen, dtype=torch.long, device=self.model.device)

    def _take_waiting(self, adapter: str | None, room: int) -> list[Request]:
        """Requests for `adapter` waiting now, up to `room`. Each join costs a forward pass over the newcomers'
        prompts, so newcomers are taken together: once they fill the room, or once the oldest has waited
        `gather_seconds` (clients that ask one after another within a step then share one prefill)."""
        with self._ready:
            waiting = [request for request in self._pending if request.adapter == adapter]
            if not waiting or (len(waiting) < room and time.monotonic() - waiting[0].created < self.gather_seconds):
                return []
            taken = self._pop_waiting(adapter, room)
        return [request for request in taken if not self._skip_cancelled(request)]

    @staticmethod
    def _sample(logits: torch.Tensor, row: _Row) -> int:
        params = row.request.params
        likeliest = int(logits.argmax())
        logits = (logits - logits.max()) / params.temperature  # shifted first: a tiny temperature cannot overflow
        if params.top_k > 0:
            threshold = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        probabilities = torch.softmax(logits, -1)
        if params.top_p < 1:
            ordered, order = probabilities.sort(descending=True)
            outside = ordered.cumsum(-1) - ordered > params.top_p  # keep the smallest set reaching top_p
            ordered[outside] = 0
            probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
        if not bool(torch.isfinite(probabilities).all()) or float(probabilities.sum()) <= 0:
            return likeliest  # settings at the edge of what floats hold (e.g. a tiny repetition_penalty)
        return int(torch.multinomial(probabilities, 1, generator=row.generator))

    def _advance(self, row: _Row, token: int) -> None:
        request = row.request
        if request.cancelled.is_set():
            self._finish(row, "cancelled")
            return
        if token in self.stop_token_ids:
            self._flush(row, final=True)
            self._finish(row, "stop")
            return
        row.tokens.append(token)
        if self._flush(row, final=False):
            self._finish(row, "stop")
        elif len(row.tokens) >= request.params.max_new_tokens:
            self._flush(row, final=True)
            self._finish(row, "length")

    def _flush(self, row: _Row, final: bool) -> bool:
        """Emit the decoded text not sent yet; True when a stop string ended the answer."""
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=not row.request.params.keep_special_tokens)
        for stop in row.stop_strings:
            at = text.find(stop, max(0, row.sent - len(stop) + 1))
            if at >= 0:
                if at > row.sent:
                    row.request.emit(text[row.sent:at])
                row.sent = at
                return True
        ready = len(text)
        # A character whose last bytes are still to come; at the end (an answer cut at its token limit
        # inside a character) they never come: the answer ends before it, not with a replacement sign.
        if text.endswith("\ufffd"):
            ready = len(text.rstrip("\ufffd"))
        if not final:
            for stop in row.stop_strings:  # the tail that may still grow into a stop string
                for size in range(min(len(stop) - 1, ready), 0, -1):
                    if text.endswith(stop[:size], 0, ready):  # no copy of the text per size
                        ready -= size
                        break
        if ready > row.sent:
            row.request.emit(text[row.sent:ready])
            row.sent = ready
        return False

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        row.request.emit(Finished(reason, len(row.tokens), len(row.request.prompt_ids)))


def _fail(request: Request, error: Exception) -> None:
    request.emit(Finished("error", 0, len(request.prompt_ids), f"{type(error).__name__}: {error}"))


def _generator(params: SamplingParams):
    """The row's random numbers: seeded when asked (any integer, folded to the 64 bits torch takes), else fresh."""
    if params.temperature <= 0:
        return None
    generator = torch.Generator(device="cpu")
    seed = params.seed if params.seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "little")
    generator.manual_seed(seed & SEED_BITS)
    return generator


def _joinable(cache) -> bool:
    """Whether rows can be added to this cache: plain per-layer key/value tensors (no sliding windows)."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None]))


def _merge(cache, new_cache, attention: torch.Tensor, new_attention: torch.Tensor) -> torch.Tensor:
    """Append `new_cache`'s rows to `cache` (both left-padded to the longer one) and return the joined mask."""
    length = max(attention.shape[1], new_attention.shape[1])

    def pad_left(tensor, dim):
        missing = length - tensor.shape[dim]
        if not missing:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim)

    for layer, new_layer in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([pad_left(layer.keys, 2), pad_left(new_layer.keys, 2)])
        layer.values = torch.cat([pad_left(layer.values, 2), pad_left(new_layer.values, 2)])
    return torch.cat([pad_left(attention, 1), pad_left(new_attention, 1)])
