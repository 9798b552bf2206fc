"""Turning records into token ids: chat conversations with loss masks, and pretraining text in blocks."""

import logging

from medgpt.data import DataReport

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _tokenize(tokenizer, text: str) -> list[int]:
    # Special tokens are written into the text by the template itself, so none are added here.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_segments(segments, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of (prompt, answer) segments and, per token, whether it belongs to an answer."""
    input_ids, is_answer = [], []
    for prompt, answer in segments:
        prompt_ids, answer_ids = _tokenize(tokenizer, prompt), _tokenize(tokenizer, answer)
        input_ids += prompt_ids + answer_ids
        is_answer += [False] * len(prompt_ids) + [True] * len(answer_ids)
    return input_ids, is_answer


def drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """The conversation without its first user exchange (the system turn stays); None if one is left."""
    start = 1 if messages[0]["role"] == "system" else 0
    user_turns = [i for i in range(start, len(messages)) if messages[i]["role"] == "user"]
    if len(user_turns) < 2:
        return None
    return messages[:start] + messages[user_turns[1]:]


class PromptTooLong(ValueError):
    pass


def encode_conversation(messages, chat_format, tokenizer, max_length: int, train_on_inputs: bool = False):
    """(input_ids, labels, truncated) for one conversation, at most `max_length` tokens.

    Too long: first drop the oldest exchanges, then cut the tail of the last answer that fits. The cut
    never lands inside a prompt, so the model never learns from a prompt whose assistant header is missing.
    """
    truncated = False
    while True:
        input_ids, is_answer = encode_segments(chat_format.split(messages), tokenizer)
        if len(input_ids) <= max_length:
            break
        shorter = drop_oldest_exchange(messages)
        if shorter is None:
            answer_positions = [i for i in range(max_length) if is_answer[i]]
            if not answer_positions:
                raise PromptTooLong(f"the prompt alone is longer than {max_length} tokens")
            cut = answer_positions[-1] + 1
            input_ids, is_answer = input_ids[:cut], is_answer[:cut]
            truncated = True
            break
        messages, truncated = shorter, True
    if train_on_inputs:
        labels = list(input_ids)
    else:
        labels = [token if answer else IGNORE_INDEX for token, answer in zip(input_ids, is_answer)]
    return input_ids, labels, truncated


def encode_conversations(records, chat_format, tokenizer, max_length, train_on_inputs, report: DataReport, skip_invalid: bool):
    """Encode every record; count truncations; a prompt too long to keep is an error or a counted rejection."""
    from medgpt.errors import InputError

    rows = []
    for record in records:
        try:
            input_ids, labels, truncated = encode_conversation(
                record["messages"], chat_format, tokenizer, max_length, train_on_inputs
            )
        except PromptTooLong as error:
            if not skip_invalid:
                path, _, line = record["source"].rpartition(":")
                raise InputError(f"{error} (raise --model_max_length or pass --skip_invalid_records)", path, line) from None
            report.reject("prompt longer than model_max_length", record["source"])
            continue
        report.truncated += truncated
        rows.append({"input_ids": input_ids, "labels": labels})
    report.kept = len(rows)
    return rows


def pack_documents(documents: list[list[int]], block_size: int, separator_id: int) -> list[list[int]]:
    """Concatenate token lists with a separator after each document and cut into `block_size` blocks.
    The last block may be shorter; it is kept (and padded by the collator), so no text is lost."""
    stream = []
    for tokens in documents:
        stream += tokens + [separator_id]
    return [stream[start : start + block_size] for start in range(0, len(stream), block_size)]


def encode_text_blocks(records, tokenizer, block_size: int, report: DataReport) -> list[dict]:
    """Pretraining rows: every document, an end-of-text token after each, in blocks of `block_size`."""
    separator = tokenizer.eos_token_id
    if separator is None:
        from medgpt.errors import InputError

        raise InputError("the tokenizer has no eos token to separate documents")
    documents = tokenizer([record["text"] for record in records], add_special_tokens=False)["input_ids"]
    blocks = pack_documents(documents, block_size, separator)
    report.kept = len(documents)
    total = sum(len(block) for block in blocks)
    logger.info("%s: %d documents, %d tokens in %d blocks of up to %d", report.name, len(documents), total, len(blocks), block_size)
    report.log()
    return [{"input_ids": block, "labels": list(block)} for block in blocks]
