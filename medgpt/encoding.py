"""Turning records into token ids: chat conversations with loss masks, and pretraining text in blocks."""

import logging

from medgpt.data import DataReport
from medgpt.errors import InputError

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


def shorten_prompt(messages: list[dict], chat_format, tokenizer, max_length: int, tools=None) -> list[dict]:
    """A one-exchange conversation whose prompt leaves no room for its answer, shortened so that the answer
    gets at least half of `max_length` (or all it needs): the user turn keeps its last tokens (the question
    is usually at its end), the template's assistant header stays, and the system turn stays when it takes
    at most half of what the prompt may use."""
    has_system = messages[0]["role"] == "system"
    user_index = 1 if has_system else 0
    answer_text = chat_format.split(messages, tools)[0][1]
    answer_length = len(_tokenize(tokenizer, answer_text))
    budget = max_length - min(answer_length, max(1, max_length // 2))
    content_ids = _tokenize(tokenizer, messages[user_index]["content"])

    def prompt_length(candidate):
        return len(_tokenize(tokenizer, chat_format.split(candidate, tools)[0][0]))

    def with_user_text(candidate, text):
        candidate = [dict(message) for message in candidate]
        candidate[1 if candidate[0]["role"] == "system" else 0]["content"] = text
        return candidate

    candidate = with_user_text(messages, "")
    overhead = prompt_length(candidate)
    if has_system and overhead - prompt_length(candidate[1:]) > budget // 2:
        candidate = candidate[1:]  # the system turn would crowd out the question
        overhead = prompt_length(candidate)
    if overhead >= budget:
        raise PromptTooLong(
            f"the prompt without its question takes {overhead} tokens, more than the {budget} of {max_length} "
            "left beside the answer"
        )
    keep = budget - overhead
    while keep > 0:
        text = tokenizer.decode(content_ids[-keep:]).lstrip("\ufffd")  # no half character at the cut
        shortened = with_user_text(candidate, text)
        excess = prompt_length(shortened) - budget
        if excess <= 0:
            return shortened
        keep -= excess
    return candidate


def encode_conversation(messages, chat_format, tokenizer, max_length: int, train_on_inputs: bool = False,
                        truncate_long_prompts: bool = True, tools: list[dict] | None = None):
    """(input_ids, labels, truncated) for one conversation, at most `max_length` tokens.

    Too long: first drop the oldest exchanges; if the last exchange's prompt alone leaves no room for its
    answer, shorten that prompt (see `shorten_prompt`; with `truncate_long_prompts=False` that is an error);
    then cut the tail of the last answer that fits. The cut never lands inside a prompt, so the model never
    learns from a prompt whose assistant header is missing.
    """
    truncated = False
    while True:
        input_ids, is_answer = encode_segments(chat_format.split(messages, tools), tokenizer)
        if len(input_ids) <= max_length:
            break
        truncated = True
        shorter = drop_oldest_exchange(messages)
        if shorter is not None:
            messages = shorter
            continue
        if not any(is_answer[:max_length]):
            if not truncate_long_prompts:
                raise PromptTooLong(f"the prompt alone is longer than {max_length} tokens")
            messages = shorten_prompt(messages, chat_format, tokenizer, max_length, tools)
            input_ids, is_answer = encode_segments(chat_format.split(messages, tools), tokenizer)
        if len(input_ids) > max_length:
            cut = max(i for i in range(max_length) if is_answer[i]) + 1
            input_ids, is_answer = input_ids[:cut], is_answer[:cut]
        break
    if train_on_inputs:
        labels = list(input_ids)
    else:
        labels = [token if answer else IGNORE_INDEX for token, answer in zip(input_ids, is_answer)]
    return input_ids, labels, truncated


def refuse_or_count(error: Exception, record: dict, report: DataReport, skip_invalid: bool) -> None:
    """A record the template cannot render (tools it has no format for, ...): an error naming the record's
    line, or with --skip_invalid_records a counted rejection."""
    if not skip_invalid:
        raise InputError.at(str(error), record["source"]) from None
    report.reject("the template cannot render it", record["source"])


def encode_conversations(records, chat_format, tokenizer, max_length, train_on_inputs, report: DataReport, skip_invalid: bool,
                         truncate_long_prompts: bool = True):
    """Encode every record; count truncations; a prompt too long to keep is an error or a counted rejection."""
    from template import TemplateError  # template.py sits beside the scripts, like chat.py imports it

    rows = []
    for record in records:
        try:
            input_ids, labels, truncated = encode_conversation(
                record["messages"], chat_format, tokenizer, max_length, train_on_inputs, truncate_long_prompts,
                record.get("tools"),
            )
        except PromptTooLong as error:
            if not skip_invalid:
                hint = "raise --model_max_length, pass --skip_invalid_records True"
                if not truncate_long_prompts:
                    hint += " or --truncate_long_prompts True"
                raise InputError.at(f"{error} ({hint})", record["source"]) from None
            report.reject("prompt longer than model_max_length", record["source"])
            continue
        except TemplateError as error:
            refuse_or_count(error, record, report, skip_invalid)
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
        raise InputError("the tokenizer has no eos token to separate documents")
    documents = tokenizer([record["text"] for record in records], add_special_tokens=False)["input_ids"]
    blocks = pack_documents(documents, block_size, separator)
    report.kept = len(documents)
    total = sum(len(block) for block in blocks)
    logger.info("%s: %d documents, %d tokens in %d blocks of up to %d", report.name, len(documents), total, len(blocks), block_size)
    report.log()
    return [{"input_ids": block, "labels": list(block)} for block in blocks]


def preference_texts(record: dict, chat_format) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts: the prompt rendered up to the assistant header, each response
    with the template's end-of-turn, split exactly as SFT splits an answer from its prompt."""
    texts = {}
    for key in ("chosen", "rejected"):
        segments = chat_format.split(record["prompt"] + [{"role": "assistant", "content": record[key]}],
                                     record.get("tools"))
        prompt = "".join(p + a for p, a in segments[:-1]) + segments[-1][0]
        texts[key] = (prompt, segments[-1][1])
    if texts["chosen"][0] != texts["rejected"][0]:
        raise ValueError("the template renders the prompt differently for the two responses")
    return texts["chosen"][0], texts["chosen"][1], texts["rejected"][1]


def encode_preference(record, chat_format, tokenizer, max_length: int, max_prompt_length: int):
    """(prompt_ids, chosen_ids, rejected_ids, truncated) with prompt + longer response <= max_length.

    Too long: the prompt keeps its last `max_prompt_length` tokens (its end, with the question and the
    assistant header, matters most), then the responses lose their tails."""
    prompt, chosen, rejected = preference_texts(record, chat_format)
    prompt_ids, chosen_ids, rejected_ids = (_tokenize(tokenizer, text) for text in (prompt, chosen, rejected))
    if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) <= max_length:
        return prompt_ids, chosen_ids, rejected_ids, False
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    return prompt_ids, chosen_ids[:room], rejected_ids[:room], True


def encode_preferences(records, chat_format, tokenizer, max_length: int, max_prompt_length: int, report: DataReport,
                       skip_invalid: bool = False):
    """Token ids for every preference pair; truncations are counted in the report, nothing is dropped."""
    if max_prompt_length >= max_length:
        raise InputError("--max_prompt_length must be smaller than --max_length, to leave room for the responses")
    from template import TemplateError

    rows = []
    for record in records:
        try:
            prompt_ids, chosen_ids, rejected_ids, truncated = encode_preference(
                record, chat_format, tokenizer, max_length, max_prompt_length
            )
        except TemplateError as error:
            refuse_or_count(error, record, report, skip_invalid)
            continue
        report.truncated += truncated
        rows.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    report.kept = len(rows)
    return rows


def load_preference_rows(data_args, preference_args, chat_format, tokenizer, seed: int):
    """Training and validation preference pairs as token ids, with their reports logged."""
    from medgpt.data import load_splits, log_reports

    train, evaluation, train_report, eval_report = load_splits(data_args, "preference", seed)
    lengths = dict(max_length=preference_args.max_length, max_prompt_length=preference_args.max_prompt_length,
                   skip_invalid=data_args.skip_invalid_records)
    train_rows = encode_preferences(train, chat_format, tokenizer, report=train_report, **lengths)
    eval_rows = encode_preferences(evaluation, chat_format, tokenizer, report=eval_report, **lengths) if evaluation else []
    log_reports(train_report, eval_report, eval_rows)
    return train_rows, eval_rows
