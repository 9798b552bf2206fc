"""The serving engine on a tiny model: the same greedy answers as inference.py, stop strings, seeds,
cancellation and a full queue."""

import time

import pytest

from medgpt.engine import EngineBusy, Finished, GenerationEngine, Request, SamplingParams

QUESTIONS = ["What causes anemia?", "高血压怎么办？", "Is fever dangerous?"]


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, random_adapter):
    from medgpt.generation import ChatModel, InferenceModelArguments

    # The adapter is merged: a plain transformers model, no PEFT wrapper.
    return ChatModel(InferenceModelArguments(base_model=tiny_model_dir, lora_model=random_adapter, template_name="chatml"))


@pytest.fixture(scope="module")
def engine(chat_model):
    return GenerationEngine(chat_model.model, chat_model.tokenizer, chat_model.stop_token_ids, context_length=1024)


def prompt(chat_model, question):
    return chat_model.tokenizer(chat_model.prompt([{"role": "user", "content": question}]), add_special_tokens=False)["input_ids"]


def test_greedy_answers_match_transformers_generate_and_stop_strings_cut_the_text(chat_model, engine):
    import torch

    for question in QUESTIONS:
        ids = prompt(chat_model, question)
        with torch.no_grad():
            reference = chat_model.model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                                  eos_token_id=chat_model.stop_token_ids)[0, len(ids):]
        stops = set(chat_model.stop_token_ids)
        reference = [t for t in reference.tolist() if t not in stops]  # generate keeps the stop token
        text, finished = engine.generate(ids, SamplingParams(max_new_tokens=10))
        assert text == chat_model.tokenizer.decode(reference, skip_special_tokens=True)
        assert finished.reason in ("stop", "length") and finished.completion_tokens <= 10
    text, _ = engine.generate(prompt(chat_model, QUESTIONS[0]), SamplingParams(max_new_tokens=10))
    stop = text[3:6]
    pieces = list(engine.stream(prompt(chat_model, QUESTIONS[0]), SamplingParams(max_new_tokens=10, stop=[stop])))
    assert "".join(pieces) == text[: text.index(stop)]


def test_seeded_sampling_repeats_and_cancelled_requests_end(chat_model, engine):
    ids = prompt(chat_model, QUESTIONS[1])
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    assert engine.generate(ids, sampled)[0] == engine.generate(ids, sampled)[0]
    events = []
    request = engine.submit(ids, SamplingParams(max_new_tokens=200), events.append)
    request.cancel()
    deadline = time.monotonic() + 30
    while not any(isinstance(e, Finished) for e in events) and time.monotonic() < deadline:
        time.sleep(0.05)
    finished = events[-1]
    assert finished.reason == "cancelled" and finished.completion_tokens < 200


def test_a_full_queue_is_refused_at_once(chat_model):
    engine = GenerationEngine(chat_model.model, chat_model.tokenizer, chat_model.stop_token_ids, 1024, max_queue=1)
    ids = prompt(chat_model, QUESTIONS[2])
    waiting = Request(ids, SamplingParams(), lambda event: None)
    with engine._ready:  # the worker cannot take the waiting request before the second one is refused
        engine._pending.append(waiting)
        with pytest.raises(EngineBusy, match="busy: 1 requests are waiting"):
            engine.submit(ids, SamplingParams(), lambda event: None)
        waiting.cancel()


def test_a_request_arriving_mid_answer_joins_the_running_batch(chat_model, engine):
    import queue

    alone = engine.generate(prompt(chat_model, QUESTIONS[1]), SamplingParams(max_new_tokens=6))[0]
    order, first_piece = queue.Queue(), queue.Queue()

    def sink(name):
        def put(event):
            if isinstance(event, Finished):
                order.put((name, event))
            else:
                first_piece.put(name)
        return put

    engine.submit(prompt(chat_model, QUESTIONS[0]), SamplingParams(max_new_tokens=300, stop=["never"]), sink("long"))
    assert first_piece.get(timeout=60) == "long"  # the long answer is being decoded
    pieces = []
    late = engine.submit(prompt(chat_model, QUESTIONS[1]), SamplingParams(max_new_tokens=6),
                         lambda e: order.put(("late", e)) if isinstance(e, Finished) else pieces.append(e))
    name, finished = order.get(timeout=60)
    assert name == "late", "the late request waited for the long one to finish"
    assert "".join(pieces) == alone and finished.reason in ("stop", "length")
    assert late.cancelled.is_set() is False
    assert order.get(timeout=120)[0] == "long"


def test_special_tokens_are_kept_only_when_asked(chat_model, engine):
    from medgpt.engine import _Row

    text_ids = chat_model.tokenizer("<|im_start|>call", add_special_tokens=False)["input_ids"]
    for keep, expected in ((True, "<|im_start|>call"), (False, "call")):
        pieces = []
        row = _Row(Request([1], SamplingParams(keep_special_tokens=keep), pieces.append), [], None)
        row.tokens = text_ids
        engine._flush(row, final=True)
        assert "".join(pieces) == expected


def test_the_chat_page_drops_the_oldest_exchanges_never_the_system_prompt(chat_model):
    from gradio_demo import fit_to_context

    system = {"role": "system", "content": "You are a careful doctor."}
    history = []
    for turn in range(6):
        history += [{"role": "user", "content": f"Question {turn}: " + "symptoms " * 20},
                    {"role": "assistant", "content": f"Answer {turn}: " + "advice " * 20}]
    messages = [system] + history + [{"role": "user", "content": "The newest question?"}]
    full = len(chat_model._ids(messages))
    ids = fit_to_context(chat_model, messages, room=full // 2)
    text = chat_model.tokenizer.decode(ids)
    assert len(ids) <= full // 2
    assert "You are a careful doctor." in text and "The newest question?" in text
    assert "Question 0" not in text and "Question 5" in text
    assert fit_to_context(chat_model, messages, room=full) == chat_model._ids(messages)  # it fits: untouched


def test_closing_stops_the_worker_and_ends_running_requests(chat_model):
    engine = GenerationEngine(chat_model.model, chat_model.tokenizer, chat_model.stop_token_ids, 1024)
    events = []
    engine.submit(prompt(chat_model, QUESTIONS[0]), SamplingParams(max_new_tokens=500, stop=["never"]), events.append)
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:  # generation has started
        time.sleep(0.01)
    engine.close()
    assert not engine._worker.is_alive()
    with pytest.raises(EngineBusy, match="the server is stopping"):  # never queued where no worker answers
        engine.submit(prompt(chat_model, QUESTIONS[0]), SamplingParams(), events.append)
    assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled" and events[-1].completion_tokens < 500


class FailingPrefill:
    """The tiny model, except that a prefill whose prompts hold `poison` fails (as a model running out of
    memory on one request's prompt would)."""

    def __init__(self, model, poison: int):
        self.model, self.poison = model, poison

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, **kwargs):
        if input_ids.shape[1] > 1 and (input_ids == self.poison).any():
            raise RuntimeError("out of memory (simulated)")
        return self.model(input_ids=input_ids, **kwargs)


def test_one_failing_request_ends_alone_and_every_other_is_answered(chat_model):
    import queue

    ids = [prompt(chat_model, question) for question in QUESTIONS]
    poison = chat_model.tokenizer("☢", add_special_tokens=False)["input_ids"][-1]
    model = FailingPrefill(chat_model.model, poison)
    engine = GenerationEngine(model, chat_model.tokenizer, chat_model.stop_token_ids, 1024, gather_seconds=0.5)
    try:
        alone = [engine.generate(row, SamplingParams(max_new_tokens=8, stop=["never"]))[0] for row in ids]
        # Settings the engine cannot use are refused before they reach a batch.
        with pytest.raises(ValueError, match="top_p must be a number in"):
            engine.submit(ids[0], SamplingParams(top_p=float("nan")), lambda event: None)
        # Three requests in one batch: the second one's caller fails on its first piece of text.
        events = {name: queue.Queue() for name in ("first", "broken", "third", "late")}

        def broken_sink(event):
            events["broken"].put(event)
            raise RuntimeError("the caller's sink failed")

        long = SamplingParams(max_new_tokens=200, stop=["never"])
        engine.submit(ids[0], long, events["first"].put)
        engine.submit(ids[1], SamplingParams(max_new_tokens=8, stop=["never"]), broken_sink)
        engine.submit(ids[2], SamplingParams(max_new_tokens=8, stop=["never"]), events["third"].put)

        def whole(name):
            pieces = []
            while not isinstance(event := events[name].get(timeout=120), Finished):
                pieces.append(event)
            return "".join(pieces), event

        assert whole("third") == (alone[2], Finished("length", 8, len(ids[2])))
        assert whole("broken")[1].reason == "cancelled"
        # A request that joins the running batch and whose prefill fails ends with an error; the rest go on.
        while engine.active_rows != 1:
            time.sleep(0.01)
        engine.submit(ids[1][:-1] + [poison, ids[1][-1]], SamplingParams(max_new_tokens=8), events["late"].put)
        text, finished = whole("late")
        assert (text, finished.reason) == ("", "error") and "out of memory (simulated)" in finished.error
        text, finished = whole("first")
        assert finished.reason == "length" and finished.completion_tokens == 200 and text.startswith(alone[0])
    finally:
        engine.close()


def test_an_answer_cut_inside_a_character_ends_before_it(chat_model, engine):
    from medgpt.engine import _Row

    tokens = chat_model.tokenizer("高血压患者", add_special_tokens=False)["input_ids"]
    cut = next(k for k in range(1, len(tokens)) if chat_model.tokenizer.decode(tokens[:k]).endswith("\ufffd")
               and chat_model.tokenizer.decode(tokens[:k]).rstrip("\ufffd"))  # inside a character after the first
    pieces, finished = [], []
    row = _Row(Request([1], SamplingParams(max_new_tokens=cut), lambda e: (finished if isinstance(e, Finished) else pieces).append(e)), [], None)
    for token in tokens[:cut]:
        engine._advance(row, token)
    assert finished[0].reason == "length"
    text = "".join(pieces)
    assert text and "\ufffd" not in text and "高血压患者".startswith(text)
