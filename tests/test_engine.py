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
    assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled" and events[-1].completion_tokens < 500
