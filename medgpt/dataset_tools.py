"""What the data tools in tools/ share: reading records from files and folders with their `path:line`,
telling their kind and format, converting conversations between ShareGPT, OpenAI messages and Alpaca,
checking records with the training code's own rules, weighted merging, and statistics. Near duplicates
(MinHash) are in medgpt/near_duplicates.py.

Every check goes through the parsers in medgpt/data.py, so a record these tools accept is one training
accepts, and a record they reject, training rejects with the same message.
"""

import json
import logging
import math
import os
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field

from medgpt.data import (
    RecordError, file_records, find_data_files, has_suffix, parse_tools, question_record, record_to_conversation,
    record_to_preference, record_to_text,
)
from medgpt.errors import InputError
from medgpt.metrics import language_of
from medgpt.outputs import check_apart_from_inputs, check_new_output_file

logger = logging.getLogger(__name__)

FORMATS = ("sharegpt", "openai", "alpaca")
KINDS = ("sft", "pt", "preference", "grpo")
# The training stage that reads each kind of data, for messages.
KIND_STAGES = {"sft": "supervised fine-tuning", "pt": "pretraining", "preference": "reward modeling / DPO / ORPO",
               "grpo": "GRPO / PPO"}
PREFERENCE_KEYS = ("chosen", "rejected", "response_chosen", "response_rejected")
QUESTION_KEYS = ("question", "query", "prompt")
MAX_REPORTED = 50  # records listed one by one in a log before the rest are only counted


@dataclass
class Record:
    """One JSON object as read, and where it was read."""

    path: str
    line: int
    data: dict

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Tally:
    """What became of the records (articles, sources) a tool read: kept, or dropped with a reason (and
    where it first happened)."""

    name: str
    unit: str = "records"
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, where)

    def summary(self) -> str:
        text = f"{self.name}: read {self.read} {self.unit}, kept {self.kept}, dropped {sum(self.dropped.values())}"
        for reason, count in self.dropped.most_common():
            text += f"\n  dropped {count} x {reason} (first at {self.examples[reason]})"
        return text

    def log(self) -> None:
        logger.info(self.summary())


def progress(items, description: str, total: int | None = None):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in logs and pipes.
    return tqdm(items, desc=description, total=total, unit=" records", disable=None)


@dataclass
class RecordFilesArguments:
    """The options every dataset tool shares: where the records are, what to do with bad ones, and
    whether existing outputs may be replaced."""

    input: list[str] = field(default_factory=list, metadata={"help": "Data files or folders (.jsonl/.json/.txt)."})
    skip_invalid: bool = field(default=False, metadata={
        "help": "Drop records training would reject (and count them by reason) instead of stopping at the first."})
    overwrite: bool = field(default=False, metadata={"help": "Replace existing output files."})

    def __post_init__(self):
        if not self.input:
            raise InputError("--input is required")


# ---- reading ----


def input_files(paths) -> list[str]:
    """The data files below every input (a file or a folder), each once, in order."""
    files, seen = [], set()
    for path in paths:
        for file_path in find_data_files(path):
            key = os.path.realpath(file_path)
            if key not in seen:
                seen.add(key)
                files.append(file_path)
    return files


def refuse_or_count(error: RecordError, where: str, tally: Tally, skip_invalid: bool) -> None:
    """A bad record: an error naming its path:line, or with --skip_invalid a counted drop."""
    if not skip_invalid:
        raise InputError.at(f"{error} (--skip_invalid True drops such records and counts them)", where)
    tally.drop(f"invalid: {error.kind}", where)


def read_records(files: list[str], tally: Tally, skip_invalid: bool) -> list[Record]:
    """Every JSON object in the files, counted in `tally.read`; unreadable lines as refuse_or_count says."""
    records = []
    for path in files:
        for line, value in file_records(path):
            tally.read += 1
            if isinstance(value, RecordError):
                refuse_or_count(value, f"{path}:{line}", tally, skip_invalid)
                continue
            records.append(Record(path, line, value))
    return records


def viewed_records(records: list[Record], tally: Tally, skip_invalid: bool) -> tuple[list[Record], list]:
    """The records training would accept, each with its RecordView; the others as refuse_or_count says."""
    kept, views = [], []
    for record in records:
        try:
            views.append(record_view(record.data))
        except RecordError as error:
            refuse_or_count(error, record.where, tally, skip_invalid)
            continue
        kept.append(record)
    return kept, views


# ---- outputs ----


def require_records(records: list, tally: Tally | None, where: str) -> None:
    """An output with no record in it helps no one: say so (after the report of why) instead of writing it."""
    if not records:
        if tally is not None:
            tally.log()
        raise InputError("no records left to write: every one was dropped (see the report above)", where)


def check_jsonl_output(path: str | None, overwrite: bool, files: list[str], flag: str = "--output_file",
                       inputs: list[str] = (), input_flag: str = "--input") -> None:
    """Before any work: a new (or --overwrite) JSON lines file that is none of the input files and lies in
    none of the input folders (`inputs`, as given)."""
    check_new_output_file(path, overwrite, flag)
    check_jsonl_path(path, files, flag, inputs, input_flag)


def check_jsonl_path(path: str, files: list[str], flag: str = "--output_file", inputs: list[str] = (),
                     input_flag: str = "--input") -> None:
    """A .jsonl name that is none of the input files, in none of the input folders. A .txt or .json name is
    refused: training would read JSON lines under a .txt name as plain text."""
    if not has_suffix(path, ".jsonl"):
        raise InputError(f"{flag} must be a .jsonl file (one JSON record a line)", path)
    check_not_an_input(path, files, flag, inputs, input_flag)


def check_not_an_input(path: str, files: list[str], flag: str = "--output_file", inputs: list[str] = (),
                       input_flag: str = "--input") -> None:
    if os.path.exists(path) and any(os.path.exists(name) and os.path.samefile(path, name) for name in files):
        raise InputError(f"{flag} is one of the input files, which it would replace: write elsewhere", path)
    check_apart_from_inputs(path, [(input_flag, folder) for folder in inputs], flag)


# ---- kinds and formats ----


def guess_kind(record: dict) -> str:
    """sft, pt, preference or grpo, from the record's keys, checking nothing else."""
    if any(key in record for key in PREFERENCE_KEYS):
        return "preference"
    if "conversations" in record or "messages" in record or ("instruction" in record and "output" in record):
        return "sft"
    if "instruction" in record or any(key in record for key in QUESTION_KEYS):
        return "grpo"
    if "text" in record:
        return "pt"
    return "sft"  # the training parser then says what is missing


def record_format(record: dict) -> str:
    """sharegpt, openai, alpaca, text, preference or question."""
    kind = guess_kind(record)
    if kind == "sft":
        return "sharegpt" if "conversations" in record else "openai" if "messages" in record else "alpaca"
    return {"pt": "text", "preference": "preference", "grpo": "question"}[kind]


def rl_question(record: dict, needs_answer: bool) -> dict:
    """A GRPO / PPO question, refused as load_question_splits refuses it (tool use in RL)."""
    question = question_record(record, needs_answer)
    if question["tools"] or any(message.get("tool_calls") for message in question["prompt"]):
        raise RecordError("tool use in an RL question", "tool definitions and calls are not supported by the "
                          "RL stages (GRPO, PPO); train tool use with SFT, DPO or ORPO")
    return question


def kind_parser(kind: str, needs_answer: bool = True):
    """The training code's converter for one kind of data: returns the parsed record or raises RecordError."""
    return {
        "sft": record_to_conversation,
        "pt": lambda record: {"text": record_to_text(record)},
        "preference": record_to_preference,
        "grpo": lambda record: rl_question(record, needs_answer),
    }[kind]


# ---- conversion ----


class CannotHold(Exception):
    """A valid conversation that the target format has no place for."""


ALPACA_KEYS = ("instruction", "input", "output", "history")


def conversation_keys(record: dict) -> set[str]:
    """The keys that hold a record's conversation (everything else is carried over unchanged). `tools`
    that hold no tools (glaive writes "") stay as they are."""
    keys = {"system", "system_prompt"}
    if "conversations" in record:
        keys.add("conversations")
    elif "messages" in record:
        keys.add("messages")
    else:
        keys.update(ALPACA_KEYS)
    if parse_tools(record.get("tools")) is not None:
        keys.add("tools")
    return keys & set(record)


def _call_json(call: dict) -> dict:
    function = call["function"]
    return ({"id": call["id"]} if "id" in call else {}) | {"name": function["name"], "arguments": function["arguments"]}


def bare_tools(tools: list[dict]) -> str:
    """Tool definitions as ShareGPT data writes them: JSON text of bare function definitions."""
    return json.dumps([tool["function"] for tool in tools], ensure_ascii=False)


def to_sharegpt(messages: list[dict], tools) -> dict:
    speakers = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    turns = []
    for message in messages:
        if message.get("tool_calls"):
            if message["content"]:
                raise CannotHold("an assistant turn with both text and tool calls (ShareGPT writes calls as turns of their own)")
            for call in message["tool_calls"]:
                turns.append({"from": "function_call", "value": json.dumps(_call_json(call), ensure_ascii=False)})
            continue
        turn = {"from": speakers[message["role"]], "value": message["content"]}
        turn.update({key: message[key] for key in ("tool_call_id", "name") if key in message})
        turns.append(turn)
    return {"conversations": turns} | ({"tools": bare_tools(tools)} if tools else {})


def to_openai(messages: list[dict], tools) -> dict:
    converted = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            # OpenAI's own files carry call arguments as JSON text.
            message["tool_calls"] = [
                ({"id": call["id"]} if "id" in call else {}) | {"type": "function", "function": {
                    "name": call["function"]["name"],
                    "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
                for call in message["tool_calls"]
            ]
        converted.append(message)
    return {"messages": converted} | ({"tools": tools} if tools else {})


def to_alpaca(messages: list[dict], tools) -> dict:
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    if any(message["role"] == "tool" or message.get("tool_calls") for message in turns):
        raise CannotHold("tool calls and results (Alpaca has no place for them)")
    pairs = [[turns[index]["content"], turns[index + 1]["content"]] for index in range(0, len(turns), 2)]
    record = {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]}
    if system is not None:
        record["system"] = system
    if len(pairs) > 1:
        record["history"] = pairs[:-1]
    if tools:
        record["tools"] = bare_tools(tools)
    return record


WRITERS = {"sharegpt": to_sharegpt, "openai": to_openai, "alpaca": to_alpaca}


def question_answer_record(question: str, answer: str, output_format: str, **extra) -> dict:
    """One question and its answer as a training record in `output_format`, with `extra` keys after it."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return WRITERS[output_format](messages, None) | extra
NOT_CONVERSATIONS = {"pt": "pretraining text", "preference": "a preference pair", "grpo": "a GRPO / PPO question"}


def convert_record(record: dict, target: str) -> dict:
    """The record in the `target` format, training exactly as the original does. Keys outside the
    conversation stay where they were. RecordError: training would reject the record; CannotHold: the
    target has no place for part of it."""
    kind = guess_kind(record)
    if kind != "sft":
        raise CannotHold(f"{NOT_CONVERSATIONS[kind]}: only conversations are converted")
    conversation = record_to_conversation(record)
    body = WRITERS[target](conversation["messages"], conversation["tools"])
    replaced = conversation_keys(record)
    converted, placed = {}, False
    for key, value in record.items():
        if key in replaced:
            if not placed:
                converted.update(body)
                placed = True
        elif key in body:
            raise CannotHold(f"its '{key}' key is a {target} field, which the conversation needs")
        else:
            converted[key] = value
    if not placed:
        converted.update(body)
    # The proof that nothing was lost: the converted record must be read back as the same conversation
    # (ShareGPT's tool result after a plain answer, for one, has no OpenAI equivalent).
    try:
        same = record_to_conversation(converted) == conversation
    except RecordError as error:
        raise CannotHold(f"the {target} format cannot hold it ({error})") from None
    if not same:
        raise CannotHold(f"the {target} format would read it as a different conversation")
    return converted


def convert_records(records: list[Record], target: str, tally: Tally, skip_invalid: bool, strict: bool) -> list[Record]:
    """Convert every record (kept in a Record with the original's path:line); invalid ones as
    refuse_or_count says, ones the target cannot hold are an error with --strict, else counted and logged
    with their path:line."""
    converted, reported = [], 0
    for record in progress(records, f"converting to {target}"):
        try:
            converted.append(Record(record.path, record.line, convert_record(record.data, target)))
        except RecordError as error:
            refuse_or_count(error, record.where, tally, skip_invalid)
        except CannotHold as reason:
            if strict:
                raise InputError.at(f"not convertible to {target}: {reason}", record.where) from None
            tally.drop(f"not convertible to {target}: {reason}", record.where)
            reported += 1
            if reported <= MAX_REPORTED:
                logger.warning("%s: not converted: %s", record.where, reason)
    if reported > MAX_REPORTED:
        logger.warning("... and %d more records not converted (--strict True stops at the first)", reported - MAX_REPORTED)
    tally.kept = len(converted)
    return converted


# ---- validation ----


@dataclass
class Validation:
    """Every problem found (`path:line: message`), counted by reason, and notes on records that would be
    truncated."""

    kind: str
    read: int = 0
    valid: int = 0
    problems: list = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    notes: list = field(default_factory=list)

    def problem(self, where: str, message: str, reason: str) -> None:
        self.problems.append(f"{where}: {message}")
        self.reasons[reason] += 1

    @property
    def invalid(self) -> int:
        return sum(self.reasons.values())


def load_tokenizer(path: str, flag: str = "--tokenizer"):
    """A model or tokenizer folder's tokenizer (or a cached hub id), checked as the training scripts check it."""
    from medgpt.modeling import check_model_path, hub_kwargs, open_tokenizer

    path = check_model_path(path, flag, needs_weights=False)
    return open_tokenizer(path, **hub_kwargs(path))


class LengthCheck:
    """Which records training would truncate or refuse at a token length: the SFT / preference encoding
    itself (medgpt/encoding.py), run on each valid record."""

    def __init__(self, tokenizer_path: str, template_name: str, max_length: int, max_prompt_length: int,
                 truncate_long_prompts: bool):
        from medgpt.chat import ChatFormat

        self.tokenizer = load_tokenizer(tokenizer_path)
        self.chat_format = ChatFormat.for_model(template_name, self.tokenizer)
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.truncate_long_prompts = truncate_long_prompts

    def truncated(self, kind: str, parsed: dict) -> bool:
        """Whether training would cut this record; RecordError when it would refuse it."""
        from medgpt.encoding import PromptTooLong, encode_conversation, encode_preference
        from template import TemplateError

        try:
            if kind == "sft":
                return encode_conversation(parsed["messages"], self.chat_format, self.tokenizer, self.max_length,
                                           truncate_long_prompts=self.truncate_long_prompts, tools=parsed["tools"])[2]
            return encode_preference(parsed, self.chat_format, self.tokenizer, self.max_length, self.max_prompt_length)[3]
        except PromptTooLong as error:
            raise RecordError("prompt longer than max_length", f"{error} (at --max_length {self.max_length})") from None
        except TemplateError as error:
            raise RecordError("the template cannot render it", str(error)) from None


def first_kind(files: list[str]) -> str:
    """The kind of data the first readable record is (a .txt file is pretraining text)."""
    for path in files:
        try:
            for _, value in file_records(path):
                if isinstance(value, dict):
                    return guess_kind(value)
        except InputError:
            if not os.access(path, os.R_OK):
                raise  # not a record's fault: --kind would not help
            continue
    raise InputError("no readable record to guess the kind of data from: pass --kind", files[0] if files else None)


def validate_files(files: list[str], kind: str, needs_answer: bool = True, length_check: LengthCheck | None = None) -> Validation:
    """Check every record as the training stage for `kind` would; nothing stops at the first problem."""
    parse = kind_parser(kind, needs_answer)
    result = Validation(kind)
    for path in files:
        for line, value in progress(_readable_records(path, result), f"checking {os.path.basename(path)}"):
            result.read += 1
            where = f"{path}:{line}"
            try:
                if isinstance(value, RecordError):
                    raise value
                parsed = parse(value)
                if length_check is not None and length_check.truncated(kind, parsed):
                    result.notes.append(f"{where}: note: longer than --max_length {length_check.max_length} "
                                        "tokens: training truncates it")
            except RecordError as error:
                result.problem(where, str(error), error.kind)
                continue
            result.valid += 1
    return result


def _readable_records(path: str, result: Validation):
    """file_records, with a file that cannot be read further (training stops there) as one problem: the
    other files are still checked."""
    try:
        yield from file_records(path)
    except InputError as error:
        where = f"{error.path}:{error.line}" if error.line is not None else error.path
        result.problem(where, f"{error.message} (the rest of this file cannot be read)", "unreadable file")


def validation_summary(result: Validation, max_errors: int) -> str:
    lines = result.problems[:max_errors]
    if len(result.problems) > max_errors:
        lines.append(f"... and {len(result.problems) - max_errors} more problems (--max_errors shows more)")
    lines += result.notes[:max_errors]
    if len(result.notes) > max_errors:
        lines.append(f"... and {len(result.notes) - max_errors} more truncated records")
    lines.append(f"{result.kind} data for {KIND_STAGES[result.kind]}: read {result.read} records, "
                 f"{result.valid} valid, {result.invalid} invalid")
    for reason, count in result.reasons.most_common():
        lines.append(f"  invalid: {count} x {reason}")
    if result.read == 0:
        lines.append("  no records: training would have nothing to train on")
    if result.notes:
        lines.append(f"  valid but truncated by training: {len(result.notes)}")
    return "\n".join(lines)


# ---- merging ----


def weighted_sample(records: list, weight: float, rng: random.Random) -> list:
    """Each record int(weight) times, plus a random fraction of them (rounded half up) once more."""
    whole, fraction = int(weight), weight - int(weight)
    extra = rng.sample(records, int(fraction * len(records) + 0.5)) if fraction else []
    return records * whole + extra


# ---- statistics ----


@dataclass
class RecordView:
    """A record reduced to what statistics and near-duplicate search look at: its format, its texts by
    role (system, user, assistant, call, tool, chosen, rejected, answer, text), its turns and its tools."""

    format: str
    parts: list
    turns: int | None = None
    tools: list | None = None

    @property
    def system(self) -> str | None:
        return next((text for role, text in self.parts if role == "system"), None)


def _message_parts(messages: list[dict]) -> list[tuple[str, str]]:
    parts = []
    for message in messages:
        if message["content"] or not message.get("tool_calls"):
            parts.append((message["role"], message["content"]))
        for call in message.get("tool_calls") or []:
            parts.append(("call", json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
                                             ensure_ascii=False)))
    return parts


def record_view(record: dict) -> RecordView:
    """Parsed with the training parser of the record's kind (questions without a required answer);
    RecordError when training would reject it."""
    kind, form = guess_kind(record), record_format(record)
    if kind == "sft":
        conversation = record_to_conversation(record)
        messages = conversation["messages"]
        turns = sum(message["role"] != "system" for message in messages)
        return RecordView(form, _message_parts(messages), turns, conversation["tools"])
    if kind == "preference":
        pair = record_to_preference(record)
        return RecordView(form, _message_parts(pair["prompt"]) + [("chosen", pair["chosen"]), ("rejected", pair["rejected"])],
                          tools=pair["tools"])
    if kind == "grpo":
        question = question_record(record, needs_answer=False)
        answer = [("answer", question["answer"])] if question["answer"] else []
        return RecordView(form, _message_parts(question["prompt"]) + answer, tools=question["tools"])
    return RecordView(form, [("text", record_to_text(record))])


LANGUAGE_ROLES = ("user", "assistant", "chosen", "rejected", "answer", "text")


def describe(values: list) -> dict:
    """mean, median, 95th percentile (nearest rank) and max."""
    if not values:
        return {"mean": 0, "median": 0, "p95": 0, "max": 0}
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(ordered), 1),
        "median": statistics.median(ordered),
        "p95": ordered[math.ceil(0.95 * len(ordered)) - 1],
        "max": ordered[-1],
    }


def record_text(view: RecordView) -> str:
    """All the text of a record's messages, one part a line (no template markers)."""
    return "\n".join(text for _, text in view.parts)


def dataset_stats(views: list[RecordView], tokenizer=None) -> dict:
    conversations = [view.turns for view in views if view.turns is not None]
    texts = [record_text(view) for view in views]
    stats = {
        "records": len(views),
        "formats": dict(Counter(view.format for view in views).most_common()),
        "turns_per_conversation": {
            "conversations": len(conversations),
            "mean": round(statistics.fmean(conversations), 2) if conversations else 0,
            "max": max(conversations, default=0),
        },
        "with_system_prompt": sum(view.system is not None for view in views),
        "with_tools": sum(bool(view.tools) for view in views),
        "characters_per_record": describe([len(text) for text in texts]),
    }
    if tokenizer is not None:
        counts = []
        for start in progress(range(0, len(texts), 256), "counting tokens", total=math.ceil(len(texts) / 256)):
            batch = tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]
            counts += [len(ids) for ids in batch]
        stats["tokens_per_record"] = describe(counts)
    languages = Counter(language_of(" ".join(text for role, text in view.parts if role in LANGUAGE_ROLES)) for view in views)
    stats["languages"] = {name: languages.get(name, 0) for name in ("zh", "en", "mixed", "other")}
    return stats


def stats_table(stats: dict) -> str:
    count = stats["records"]

    def share(value: int) -> str:
        return f"{value} ({100 * value / count:.1f}%)" if count else str(value)

    def spread(values: dict) -> str:
        return "  ".join(f"{name} {value}" for name, value in values.items())

    turns = stats["turns_per_conversation"]
    rows = [("records", str(count))]
    rows += [(f"  {name}", share(value)) for name, value in stats["formats"].items()]
    rows.append(("turns per conversation", f"mean {turns['mean']}  max {turns['max']}  ({turns['conversations']} conversations)"))
    rows.append(("with a system prompt", share(stats["with_system_prompt"])))
    rows.append(("with tools", share(stats["with_tools"])))
    rows.append(("characters per record", spread(stats["characters_per_record"])))
    if "tokens_per_record" in stats:
        rows.append(("tokens per record", spread(stats["tokens_per_record"])))
    rows.append(("languages", ", ".join(f"{name} {share(value)}" for name, value in stats["languages"].items())))
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name:<{width}}{value}" for name, value in rows)
