"""Loss masks and truncation of conversations, through a real tokenizer and the chatml template."""

import os

import pytest
from transformers import AutoTokenizer

from conftest import FIXTURES, TEST_DATA, needs_medicalgpt_files
from medgpt.chat import ChatFormat
from medgpt.data import DataReport
from medgpt.encoding import IGNORE_INDEX, encode_conversation, encode_conversations
from medgpt.errors import InputError

CONVERSATION = [
    {"role": "system", "content": "You are a careful doctor."},
    {"role": "user", "content": "I have had a headache for three days."},
    {"role": "assistant", "content": "Do you also have a fever?"},
    {"role": "user", "content": "Yes, 38.5 degrees."},
    {"role": "assistant", "content": "Rest, drink water, and see a doctor if it lasts."},
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def chatml(tokenizer):
    return ChatFormat.for_model("chatml", tokenizer)


def labelled_text(tokenizer, input_ids, labels):
    """The text of the trained tokens, with a | wherever a masked stretch separates two trained ones."""
    pieces, previous = [], False
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if trained and not previous and pieces:
            pieces.append("|")
        if trained:
            pieces.append(tokenizer.decode([token]))
        previous = trained
    return "".join(pieces)


def test_multi_turn_labels_cover_exactly_the_answers_and_their_end_of_turn(tokenizer, chatml):
    input_ids, labels, truncated = encode_conversation(CONVERSATION, chatml, tokenizer, max_length=512)
    assert not truncated
    assert tokenizer.decode(input_ids) == chatml.render(CONVERSATION)
    answers = [answer for _, answer in chatml.split(CONVERSATION)]
    assert labelled_text(tokenizer, input_ids, labels) == "|".join(answers)
    assert answers[0].startswith("Do you also have a fever?<|im_end|>")
    assert answers[1].startswith("Rest, drink water, and see a doctor if it lasts.<|im_end|>")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_ends = [t for t, l in zip(input_ids, labels) if t == end_of_turn and l != IGNORE_INDEX]
    assert len(trained_ends) == 2  # each answer's <|im_end|> is learned; the prompts' ones are not
    for prompt_text in ("headache", "38.5", "careful doctor", "<|im_start|>assistant"):
        assert prompt_text not in labelled_text(tokenizer, input_ids, labels)


def test_train_on_inputs_labels_every_token(tokenizer, chatml):
    input_ids, labels, _ = encode_conversation(CONVERSATION, chatml, tokenizer, 512, train_on_inputs=True)
    assert labels == input_ids


def test_too_long_drops_oldest_exchange_but_keeps_the_system_turn(tokenizer, chatml):
    full, _, _ = encode_conversation(CONVERSATION, chatml, tokenizer, 512)
    input_ids, labels, truncated = encode_conversation(CONVERSATION, chatml, tokenizer, len(full) - 1)
    assert truncated
    text = tokenizer.decode(input_ids)
    assert text == chatml.render([CONVERSATION[0]] + CONVERSATION[3:])
    assert "headache" not in text and "careful doctor" in text


def test_too_long_single_exchange_cuts_the_answer_tail_never_the_prompt(tokenizer, chatml):
    single = CONVERSATION[:3]
    prompt, answer = chatml.split(single)[0]
    prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    input_ids, labels, truncated = encode_conversation(single, chatml, tokenizer, prompt_length + 2)
    assert truncated and len(input_ids) == prompt_length + 2
    assert tokenizer.decode(input_ids[:prompt_length]) == prompt  # header intact
    assert sum(l != IGNORE_INDEX for l in labels) == 2
    with pytest.raises(ValueError, match="prompt alone is longer"):
        encode_conversation(single, chatml, tokenizer, prompt_length, truncate_long_prompts=False)


LONG_QUESTION = [
    {"role": "system", "content": "You are a careful doctor."},
    {"role": "user", "content": "Background: " + "my blood pressure was normal last year, " * 30 + "so what does 150/95 mean now?"},
    {"role": "assistant", "content": "It is high: see your doctor, who may repeat it and check your kidneys."},
]


def test_a_prompt_longer_than_the_limit_keeps_its_end_and_trains_on_the_answer(tokenizer, chatml):
    answer_text = chatml.split(LONG_QUESTION)[0][1]
    answer_length = len(tokenizer(answer_text, add_special_tokens=False)["input_ids"])
    input_ids, labels, truncated = encode_conversation(LONG_QUESTION, chatml, tokenizer, max_length=64)
    assert truncated and len(input_ids) <= 64
    text = tokenizer.decode(input_ids)
    # the system turn (it fits), the end of the question and the assistant header survive; the start does not
    assert text.startswith("<|im_start|>system\nYou are a careful doctor.<|im_end|>\n<|im_start|>user\n")
    assert "so what does 150/95 mean now?<|im_end|>\n<|im_start|>assistant\n" in text
    assert "Background" not in text
    # the whole answer (it needs less than half the length) is kept, and the loss is on it alone
    assert answer_length < 32
    assert labelled_text(tokenizer, input_ids, labels) == answer_text


def test_a_system_turn_too_large_to_fit_gives_way_to_the_question(tokenizer, chatml):
    conversation = [{"role": "system", "content": "Rules: " + "be careful and kind, " * 40}] + LONG_QUESTION[1:]
    input_ids, labels, truncated = encode_conversation(conversation, chatml, tokenizer, max_length=64)
    text = tokenizer.decode(input_ids)
    assert truncated and len(input_ids) <= 64
    assert "Rules" not in text and text.startswith("<|im_start|>user\n")
    assert "mean now?<|im_end|>\n<|im_start|>assistant\nIt is high" in text


def test_prompt_too_long_is_truncated_by_default_or_an_error_or_a_counted_rejection(tokenizer, chatml):
    records = [{"messages": LONG_QUESTION, "source": "train.jsonl:4"}]
    report = DataReport("train")
    rows = encode_conversations(records, chatml, tokenizer, 64, False, report, skip_invalid=False)
    assert len(rows) == 1 and (report.kept, report.truncated) == (1, 1)
    strict = dict(skip_invalid=False, truncate_long_prompts=False)
    with pytest.raises(InputError, match=r"^train.jsonl:4: the prompt alone is longer than 64 tokens"):
        encode_conversations(records, chatml, tokenizer, 64, False, DataReport("train"), **strict)
    report = DataReport("train")
    assert encode_conversations(records, chatml, tokenizer, 64, False, report, skip_invalid=True, truncate_long_prompts=False) == []
    assert report.rejected["prompt longer than model_max_length"] == 1


def test_auto_uses_the_models_own_template_and_splits_it(tokenizer):
    own = ChatFormat.for_model("auto", tokenizer)
    assert own.render(CONVERSATION) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    pairs = own.split(CONVERSATION)
    assert "".join(p + a for p, a in pairs) == own.render(CONVERSATION)
    assert [a.split("<|im_end|>")[0] for _, a in pairs] == [CONVERSATION[2]["content"], CONVERSATION[4]["content"]]


@pytest.mark.parametrize("tool_file", [
    os.path.join(TEST_DATA, "sft", "toolcall_zh.jsonl"),
    pytest.param(os.path.join(FIXTURES, "sft", "glaive_toolcall_zh_demo.jsonl"), marks=needs_medicalgpt_files),
], ids=["glaive-format", "medicalgpt-glaive"])
@pytest.mark.parametrize("template_name", ["qwen", "qwen3", "chatml", "llama3.1", "deepseek"])
def test_tool_use_records_train_on_the_calls_and_answers_only(tokenizer, template_name, tool_file):
    """Tool-call records in MedicalGPT's glaive format: the trained tokens are exactly the answers (calls
    included) with their end-of-turn; tool definitions, questions and tool results are never trained on."""
    import json

    from medgpt.data import load_records

    chat_format = ChatFormat.for_model(template_name, tokenizer)
    template = chat_format.template
    records = load_records(tool_file, "conversation", DataReport("train"), skip_invalid=False)
    if template_name == "llama3.1":  # one call per answer in Llama 3.1's format
        records = [r for r in records if all(len(m.get("tool_calls", [])) <= 1 for m in r["messages"])]
    with_calls = [r for r in records if any(m.get("tool_calls") for m in r["messages"])]
    assert len(with_calls) >= 7
    for record in with_calls[:40]:
        messages, tools = record["messages"], record["tools"]
        input_ids, labels, truncated = encode_conversation(messages, chat_format, tokenizer, 4096, tools=tools)
        assert not truncated
        pairs = chat_format.split(messages, tools)
        trained = [token for token, label in zip(input_ids, labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(trained) == "".join(answer for _, answer in pairs)
        prompts = "".join(prompt for prompt, _ in pairs)
        for message in messages:
            if message["role"] in ("user", "tool"):
                quoted = json.dumps(message["content"], ensure_ascii=False)[1:21]  # Llama 3.1 quotes results
                assert message["content"].strip()[:20] in prompts or quoted in prompts
        if tools and template.tools.system_jinja():  # definitions are written into the prompt, never trained
            assert tools[0]["function"]["name"] in pairs[0][0]
        # Every call is in a trained answer and the parser reads it back.
        answers = [answer for _, answer in pairs]
        for message, answer in zip([m for m in messages if m["role"] == "assistant"], answers):
            expected = [{"type": "function", "function": call["function"]} for call in message.get("tool_calls", [])]
            stop = min((answer.find(w) for w in chat_format.template.stop_words if w in answer), default=len(answer))
            assert chat_format.parse_tool_calls(answer[:stop])[1] == expected
