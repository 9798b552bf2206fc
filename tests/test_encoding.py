"""Loss masks and truncation of conversations, through a real tokenizer and the chatml template."""

import pytest
from transformers import AutoTokenizer

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
        encode_conversation(single, chatml, tokenizer, prompt_length)


def test_prompt_too_long_is_an_error_or_a_counted_rejection(tokenizer, chatml):
    records = [{"messages": CONVERSATION[:3], "source": "train.jsonl:4"}]
    with pytest.raises(InputError, match=r"^train.jsonl:4: the prompt alone is longer than 8 tokens"):
        encode_conversations(records, chatml, tokenizer, 8, False, DataReport("train"), skip_invalid=False)
    report = DataReport("train")
    assert encode_conversations(records, chatml, tokenizer, 8, False, report, skip_invalid=True) == []
    assert report.rejected["prompt longer than model_max_length"] == 1


def test_auto_uses_the_models_own_template_and_splits_it(tokenizer):
    own = ChatFormat.for_model("auto", tokenizer)
    assert own.render(CONVERSATION) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    pairs = own.split(CONVERSATION)
    assert "".join(p + a for p, a in pairs) == own.render(CONVERSATION)
    assert [a.split("<|im_end|>")[0] for _, a in pairs] == [CONVERSATION[2]["content"], CONVERSATION[4]["content"]]
