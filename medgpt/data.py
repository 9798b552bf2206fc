"""Reading training data: file discovery, record formats, validation and train/validation splits.

Every stage reads its files through `load_records`. Each record is converted to one internal shape
(`{"messages": [...], "tools": ...}` for conversations, `{"text": ...}` for pretraining text); a record that
cannot be converted is an `InputError` naming `path:line`, or, with `--skip_invalid_records`, a counted
rejection.

Messages have OpenAI's shape, whatever the input format, so that each template can write tools and calls
the way its model family's own chat template does:

- `{"role": "system" | "user" | "assistant" | "tool", "content": str}`; content is always a string, empty
  only in an assistant message that makes tool calls.
- An assistant message that calls tools also has `"tool_calls": [{"type": "function", "function": {"name":
  str, "arguments": dict}}, ...]` (with the input's `"id"` when it gave one); arguments given as a JSON
  string are parsed.
- A tool message (a tool's result) keeps the input's `"tool_call_id"` and `"name"` when it gave them.
- `tools` is None or a list of `{"type": "function", "function": {"name", "description", "parameters"}}`;
  a bare function definition (glaive / ShareGPT style) is wrapped into that shape.

ShareGPT `function_call` turns become an assistant message with tool calls (consecutive ones, one message
with several calls) and `observation` turns become tool messages.
"""

import codecs
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from medgpt.errors import InputError

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".txt")
SKIPPED_SHOWN = 5  # names of skipped files listed in the log line, before the count alone

# Deepest nesting of lists and objects a record may have. Real records use a handful of levels (messages >
# message > tool_calls > call > function > arguments > ...); Python's JSON reader recurses and fails near
# 1,000 levels with a RecursionError, and conversion, Arrow and templates walk records recursively too.
MAX_JSON_DEPTH = 100
# A \uD800-\uDFFF escape: JSON text can hold half a UTF-16 surrogate pair, which is no character and cannot
# be written as UTF-8 or tokenized. (Decoded UTF-8 never holds one: only escapes can make one.)
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

# ShareGPT speaker names (and OpenAI roles) -> the roles templates know.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",  # the model's tool call is something it must learn to say
    "observation": "tool",
    "tool": "tool",
    "function": "tool",  # OpenAI's older name for a tool result
}
PROMPT_ROLES = ("user", "tool")


class RecordError(ValueError):
    """What is wrong with one record; `kind` groups rejections in the report."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class DataReport:
    """Counts for one split, logged at the end of preparation: nothing is dropped without a count."""

    name: str
    read: int = 0
    kept: int = 0
    truncated: int = 0
    left_out: int = 0  # read but not used because of a --max_*_samples cap
    cap_flag: str = ""
    rejected: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def reject(self, kind: str, where: str) -> None:
        self.rejected[kind] += 1
        self.examples.setdefault(kind, where)

    def summary(self) -> str:
        text = (
            f"{self.name}: read {self.read} records, kept {self.kept}, truncated {self.truncated}, "
            f"rejected {sum(self.rejected.values())}"
        )
        if self.left_out:
            text += f", left out {self.left_out} (over {self.cap_flag})"
        for kind, count in self.rejected.most_common():
            text += f"\n  rejected {count} x {kind} (first at {self.examples[kind]})"
        return text

    def log(self) -> None:
        logger.info(self.summary())


def has_suffix(path: str, suffixes) -> bool:
    """Whether a file name ends with one of `suffixes`, in any case (TRAIN.JSONL is JSON lines too)."""
    return path.lower().endswith(tuple(suffixes) if not isinstance(suffixes, str) else suffixes)


def _unreadable_folder(error: OSError):
    raise InputError(f"cannot read this folder: {error.strerror}", error.filename)


def find_data_files(path: str, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> list[str]:
    """A file, or every .jsonl/.json/.txt file (or one of `suffixes`, in any case) below a folder, sorted so
    that runs are repeatable. Other files there are logged as skipped; an unreadable folder is an error."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise InputError("no such file or folder", path) from None
    except OSError as error:
        raise InputError(f"cannot reach: {error.strerror}", path) from None
    if not os.path.isdir(path):
        return [path]
    files, skipped = [], []
    for root, dirs, names in os.walk(path, onerror=_unreadable_folder):
        dirs.sort()
        for name in sorted(names):
            (files if has_suffix(name, suffixes) else skipped).append(os.path.join(root, name))
    if skipped:
        shown = ", ".join(os.path.relpath(name, path) for name in skipped[:SKIPPED_SHOWN])
        more = f" and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
        logger.info("%s: skipped %d file(s) that are not %s: %s%s", path, len(skipped), "/".join(suffixes), shown, more)
    if not files:
        raise InputError(f"no {'/'.join(suffixes)} files in this folder", path)
    return files


def decode_lines(path: str) -> tuple[list[str], set[int]]:
    """The file's lines as text, and the numbers of the lines that are not valid UTF-8 (decoded with
    replacement characters so the rest of the file can still be read). A leading byte-order mark is dropped."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise InputError(f"cannot read this file: {error.strerror}", path) from None
    raw = raw.removeprefix(codecs.BOM_UTF8)
    lines, bad = [], set()
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("utf-8", errors="replace"))
            bad.add(number)
    return lines, bad


def invalid_utf8_error() -> RecordError:
    return RecordError("invalid UTF-8", "not valid UTF-8 text (save the file as UTF-8)")


def nesting_error() -> RecordError:
    return RecordError("too deeply nested", f"lists and objects nested more than {MAX_JSON_DEPTH} levels deep")


def surrogate_error() -> RecordError:
    return RecordError("lone surrogate", "text holds a lone surrogate (a \\ud800-\\udfff escape without its "
                       "other half), which is no character")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_json_value(value, text: str) -> RecordError | None:
    """What makes a value parsed from JSON `text` unusable although it parsed: lone surrogates in its
    strings (keys too), or nesting deeper than MAX_JSON_DEPTH. Walked without recursion, and only where the
    text could hold either."""
    surrogates = SURROGATE_ESCAPE.search(text) is not None
    if not surrogates and text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if surrogates and not _is_text(item):
                return surrogate_error()
        elif isinstance(item, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                return nesting_error()
            if isinstance(item, dict):
                if surrogates and not all(_is_text(key) for key in item):
                    return surrogate_error()
                item = item.values()
            stack.extend((child, depth + 1) for child in item)
    return None


def parse_json(text: str):
    """json.loads for record text: the value, or the RecordError that makes it unusable (check_json_value,
    or nesting deep enough to exhaust the parser). JSONDecodeError is left to the caller, who knows where
    the text stands."""
    try:
        value = json.loads(text)
    except RecursionError:
        return nesting_error()
    return check_json_value(value, text) or value


def parsed_json(text: str):
    """parse_json for JSON text inside a record (tool definitions, call arguments): a RecordError is raised."""
    value = parse_json(text)
    if isinstance(value, RecordError):
        raise value
    return value


def _end_of_value(text: str, index: int) -> int:
    """Where the JSON value starting at `index` ends, found by counting brackets outside strings (without
    recursion, for values too deep to parse); len(text) if it never closes."""
    depth, in_string, escaped = 0, False, False
    for position in range(index, len(text)):
        char = text[position]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return position + 1
    return len(text)


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def read_json_array(path: str, content: str, bad_lines: set[int]):
    """Yield (line, record) for each element of a JSON array, each at the line where it starts. A syntax
    error stops the whole file at its line: nothing after it can be trusted."""
    decoder = json.JSONDecoder()
    index = _skip_space(content, content.index("[") + 1)
    line, counted = 1, 0
    if index < len(content) and content[index] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(content, index)
            item = check_json_value(item, content[index:end]) or item
        except json.JSONDecodeError as error:
            raise InputError(f"malformed JSON: {error.msg} at column {error.colno}", path, error.lineno) from None
        except RecursionError:
            item, end = nesting_error(), _end_of_value(content, index)
        line += content.count("\n", counted, index)
        counted = index
        last_line = line + content.count("\n", index, end)
        if bad_lines & set(range(line, last_line + 1)):
            yield line, invalid_utf8_error()
        else:
            yield line, item
        index = _skip_space(content, end)
        if index < len(content) and content[index] == ",":
            index = _skip_space(content, index + 1)
            continue
        if index < len(content) and content[index] == "]":
            after = _skip_space(content, index + 1)
            if after < len(content):
                raise InputError("malformed JSON: text after the closing ']'", path, content.count("\n", 0, after) + 1)
            return
        # Reported where the comma is missing: at the end of the record before it.
        raise InputError("malformed JSON: ',' or ']' missing after the record that ends here", path, last_line)


def starts_json_lines(lines: list[str]) -> bool:
    """Whether the first non-empty line is a JSON document by itself, as in JSON lines."""
    first = next((line for line in lines if line.strip()), "")
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    except RecursionError:
        return True  # a whole document, too deep to read: its line says so
    return True


def read_raw_records(path: str):
    """Yield (line, record) pairs. .txt: one text per non-empty line. .jsonl: one JSON object per line.
    .json: a JSON array of records, one object, or JSON lines under a .json name. A record that cannot be
    read comes as a RecordError at its line."""
    lines, bad_lines = decode_lines(path)
    if has_suffix(path, ".txt"):
        for number, line in enumerate(lines, start=1):
            if number in bad_lines:
                yield number, invalid_utf8_error()
            elif line.strip():
                yield number, {"text": line.rstrip("\r")}
        return
    if has_suffix(path, ".json"):
        content = "\n".join(lines)
        if content.lstrip().startswith("["):
            yield from read_json_array(path, content, bad_lines)
            return
        start = content.count("\n", 0, _skip_space(content, 0)) + 1
        try:
            whole = parse_json(content)
        except json.JSONDecodeError as error:
            if not starts_json_lines(lines):
                # One document spread over several lines (not JSON lines): its own error, at its line.
                first_bad = min(bad_lines, default=None)
                if first_bad is not None and first_bad <= error.lineno:
                    raise InputError("not valid UTF-8 text (save the file as UTF-8)", path, first_bad) from None
                raise InputError(f"malformed JSON: {error.msg} at column {error.colno}", path, error.lineno) from None
            whole = None  # JSON lines under a .json name: read line by line below
        if isinstance(whole, RecordError) and whole.kind == "too deeply nested" and starts_json_lines(lines):
            whole = None  # JSON lines whose first record is too deep: that line says so below
        if whole is not None:
            yield (min(bad_lines), invalid_utf8_error()) if bad_lines else (start, whole)
            return
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if number in bad_lines:
            yield number, invalid_utf8_error()
            continue
        try:
            record = parse_json(line)
        except json.JSONDecodeError as error:
            yield number, RecordError("malformed JSON", f"malformed JSON: {error.msg} at column {error.colno}")
            continue
        yield number, record


def _require_string(value, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError("non-string value", f"{what} must be a string, got {type(value).__name__}")
    return value


def _system(record: dict) -> str | None:
    system = record.get("system", record.get("system_prompt"))
    if system is not None:
        system = _require_string(system, "system" if "system" in record else "system_prompt")
    return system or None


def _json_error(error: json.JSONDecodeError) -> str:
    return f"{error.msg} at column {error.colno}"


def parse_tools(value) -> list[dict] | None:
    """A record's `tools` as OpenAI-shape definitions, from a list or its JSON text; bare function
    definitions (glaive, ShareGPT) are wrapped. None when there are none, so templates have one way to
    see that no tools were given."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = parsed_json(value)
        except json.JSONDecodeError as error:
            raise RecordError("malformed tools", f"tools is not valid JSON: {_json_error(error)}") from None
    if not isinstance(value, list):
        raise RecordError("malformed tools", f"tools must be a list of tool definitions, got {type(value).__name__}")
    tools = []
    for index, entry in enumerate(value):
        function = entry["function"] if isinstance(entry, dict) and "function" in entry else entry
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
            raise RecordError("malformed tools", f"tools[{index}] is not a function definition with a string 'name'")
        tools.append({"type": "function", "function": dict(function)})
    return tools or None


def _tool_call(call, where: str) -> dict:
    """One call as {"type": "function", "function": {"name", "arguments": dict}}, from OpenAI's shape or a
    bare {"name", "arguments"}; arguments as JSON text are parsed, since templates write them their own way."""
    if not isinstance(call, dict):
        raise RecordError("malformed tool call", f"{where} must be an object, got {type(call).__name__}")
    if "function" in call:
        if call.get("type", "function") != "function":
            raise RecordError("malformed tool call", f"{where} is a '{call['type']}' call: only function calls are supported")
        function, where_function = call["function"], f"{where}.function"
    else:
        function, where_function = call, where
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        raise RecordError("malformed tool call", f"{where_function} has no string 'name'")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}  # a call without arguments
    elif isinstance(arguments, str):
        try:
            arguments = parsed_json(arguments)
        except json.JSONDecodeError as error:
            raise RecordError(
                "malformed tool call", f"{where_function}.arguments is not a JSON object ({_json_error(error)})"
            ) from None
    if not isinstance(arguments, dict):
        raise RecordError(
            "malformed tool call", f"{where_function}.arguments is not a JSON object (got {type(arguments).__name__})"
        )
    converted = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if call.get("id") is not None:
        converted = {"id": _require_string(call["id"], f"{where}.id"), **converted}
    return converted


def _tool_calls(value, where: str) -> list[dict]:
    """OpenAI's `tool_calls` list."""
    if not isinstance(value, list):
        raise RecordError("malformed tool call", f"{where} must be a list, got {type(value).__name__}")
    return [_tool_call(call, f"{where}[{index}]") for index, call in enumerate(value)]


def _function_call_turn(value, where: str) -> list[dict]:
    """A ShareGPT `function_call` turn's calls: JSON text of one call, or of a list of calls."""
    if isinstance(value, str):
        try:
            value = parsed_json(value)
        except json.JSONDecodeError as error:
            raise RecordError("malformed tool call", f"{where} is not a JSON tool call ({_json_error(error)})") from None
    if isinstance(value, list):
        if not value:
            raise RecordError("malformed tool call", f"{where} is an empty list of calls")
        return [_tool_call(call, f"{where}[{index}]") for index, call in enumerate(value)]
    return [_tool_call(value, where)]


def content_text(value, what: str) -> str:
    """A message's content: a string, or (OpenAI shape) a list of text parts joined into one string."""
    if isinstance(value, list):
        pieces = []
        for index, part in enumerate(value):
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecordError("non-text content", f"{what}[{index}] is a '{kind}' part: only text parts can be trained on")
        return "".join(pieces)
    return _require_string(value, what)


def _turns_from_list(turns, key: str, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(turns, list):
        raise RecordError("non-list conversation", f"{key} must be a list, got {type(turns).__name__}")
    if not turns:
        raise RecordError("empty conversation", f"{key} is empty")
    messages = []
    previous_speaker = None
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict) or role_key not in turn:
            raise RecordError("malformed turn", f"{where} must be an object with '{role_key}' and '{content_key}'")
        speaker = _require_string(turn[role_key], f"{where}.{role_key}")
        if speaker not in ROLE_ALIASES:
            raise RecordError("unknown role", f"{where}.{role_key} is '{speaker}', expected one of {sorted(ROLE_ALIASES)}")
        role = ROLE_ALIASES[speaker]
        calls = turn.get("tool_calls") or None  # OpenAI writes null or [] for "no calls" too
        if calls is None and turn.get("function_call"):  # OpenAI's older single-call field
            calls = [{"type": "function", "function": turn["function_call"]}]
        if calls is not None and role != "assistant":
            raise RecordError(
                "malformed tool call", f"{where} is a '{role}' turn with tool_calls: only assistant turns call tools"
            )
        if content_key not in turn and calls is None:
            raise RecordError("malformed turn", f"{where} must be an object with '{role_key}' and '{content_key}'")
        if speaker == "function_call":
            calls = _function_call_turn(turn[content_key], f"{where}.{content_key}")
            if previous_speaker == "function_call":  # consecutive calls: one assistant turn making several
                messages[-1]["tool_calls"] += calls
                continue
            message = {"role": "assistant", "content": "", "tool_calls": calls}
        elif calls is not None:
            content = turn.get(content_key)
            content = "" if content is None else content_text(content, f"{where}.{content_key}")
            message = {"role": "assistant", "content": content, "tool_calls": _tool_calls(calls, f"{where}.tool_calls")}
        else:
            message = {"role": role, "content": content_text(turn[content_key], f"{where}.{content_key}")}
        if role == "tool":
            for name in ("tool_call_id", "name"):
                if turn.get(name) is not None:
                    message[name] = _require_string(turn[name], f"{where}.{name}")
        messages.append(message)
        previous_speaker = speaker
    return messages


def check_conversation(messages: list[dict], key: str = "conversation", tool_after_answer: bool = False) -> None:
    """An optional leading system turn, then a user turn, each answered by an assistant turn. An assistant
    turn that calls tools is followed by one or more tool turns (the results), then an assistant turn
    again. The conversation ends with an assistant turn: text, or calls (which are trained on too).
    `tool_after_answer` also accepts a tool turn where a user turn belongs: ShareGPT data (glaive's
    among it) has results after an answer that wrote its call as text."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    turns = messages[start:]
    if not turns:
        raise RecordError("empty conversation", f"{key} has no user or assistant turns")
    for offset, message in enumerate(turns):
        index = start + offset
        role = message["role"]
        previous = turns[offset - 1] if offset else None
        if previous is None:
            expected = ("user",)
        elif previous["role"] == "user":
            expected = ("assistant",)
        elif previous["role"] == "tool":
            expected = ("tool", "assistant")
        elif previous.get("tool_calls"):
            expected = ("tool",)
        else:
            expected = ("user", "tool") if tool_after_answer else ("user",)
        if role not in expected:
            if role == "tool" and previous is not None and previous["role"] == "assistant":
                raise RecordError(
                    "tool turn without a call",
                    f"{key}[{index}] is a 'tool' turn, but the assistant turn before it ({key}[{index - 1}]) calls no tool",
                )
            hint = f" (the results of {key}[{index - 1}]'s tool calls)" if expected == ("tool",) else ""
            raise RecordError(
                "wrong role order", f"{key}[{index}] is a '{role}' turn where a '{'/'.join(expected)}' turn belongs{hint}"
            )
        if role == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
            raise RecordError("empty turn", f"{key}[{index}] is an empty assistant reply")
        if role == "user" and not message["content"].strip():
            raise RecordError("empty turn", f"{key}[{index}] is an empty user turn")
    if turns[-1]["role"] != "assistant":
        raise RecordError("no final answer", f"{key} ends with a '{turns[-1]['role']}' turn, not an answer")


def record_to_messages(record: dict) -> list[dict]:
    """Convert one ShareGPT / OpenAI messages / Alpaca record into checked chat messages (the record's
    tools are read by `record_to_conversation`)."""
    if "conversations" in record:
        messages = _turns_from_list(record["conversations"], "conversations", "from", "value")
        key = "conversations"
    elif "messages" in record:
        messages = _turns_from_list(record["messages"], "messages", "role", "content")
        key = "messages"
    elif "instruction" in record:
        key = "instruction"
        instruction = _require_string(record["instruction"], "instruction")
        extra = _require_string(record.get("input") or "", "input")
        output = _require_string(record.get("output", ""), "output")
        messages = []
        history = record.get("history") or []
        if not isinstance(history, list):
            raise RecordError("malformed history", "history must be a list of [question, answer] pairs")
        for index, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise RecordError("malformed history", f"history[{index}] must be a [question, answer] pair")
            messages.append({"role": "user", "content": _require_string(pair[0], f"history[{index}][0]")})
            messages.append({"role": "assistant", "content": _require_string(pair[1], f"history[{index}][1]")})
        messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
        messages.append({"role": "assistant", "content": output})
    elif "text" in record:
        raise RecordError("pretraining text in a conversation dataset", "a {'text': ...} record has no conversation")
    else:
        raise RecordError(
            "unknown format",
            f"record in no known format (keys: {', '.join(sorted(record)) or 'none'}); expected 'conversations', "
            "'messages', 'instruction'/'output' or 'text'",
        )
    system = _system(record)
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    check_conversation(messages, key, tool_after_answer=key == "conversations")
    return messages


def record_to_conversation(record: dict) -> dict:
    """A training conversation: {"messages": checked messages, "tools": definitions or None}."""
    return {"messages": record_to_messages(record), "tools": parse_tools(record.get("tools"))}


def record_to_text(record: dict) -> str:
    if "text" not in record:
        raise RecordError(
            "unknown format", f"expected a plain text line or a {{'text': ...}} record, got keys: {', '.join(sorted(record))}"
        )
    text = _require_string(record["text"], "text")
    if not text.strip():
        raise RecordError("empty text", "text is empty")
    return text


CONVERTERS = {
    "conversation": record_to_conversation,
    "text": lambda record: {"text": record_to_text(record)},
}


def file_records(path: str):
    """Yield (line, record) for one file, a record being a JSON object (dict) or the RecordError that
    says why that line is not one. A file that cannot be read past some point raises InputError."""
    for line, value in read_raw_records(path):
        if not isinstance(value, (dict, RecordError)):
            value = RecordError("not an object", f"a record must be a JSON object, got {type(value).__name__}")
        yield line, value


def load_records(path: str, kind: str, report: DataReport, skip_invalid: bool, converter=None) -> list[dict]:
    """Read and convert every record under `path`. `kind` names a converter in CONVERTERS, or pass one."""
    convert = converter or CONVERTERS[kind]
    records = []
    for file_path in find_data_files(path):
        for line, raw in file_records(file_path):
            report.read += 1
            try:
                if isinstance(raw, RecordError):
                    raise raw
                converted = convert(raw)
            except RecordError as error:
                if not skip_invalid:
                    raise InputError(str(error), file_path, line) from None
                report.reject(error.kind, f"{file_path}:{line}")
                continue
            converted["source"] = f"{file_path}:{line}"
            records.append(converted)
    return records


def load_splits(data_args, kind: str, seed: int = 42, converter=None):
    """Training and validation records plus their reports, as the data arguments ask."""
    if not data_args.train_file_dir:
        raise InputError("--train_file_dir is required")
    train_report, eval_report = DataReport("train"), DataReport("validation")
    skip = data_args.skip_invalid_records
    train = load_records(data_args.train_file_dir, kind, train_report, skip, converter)
    evaluation = []
    if data_args.validation_file_dir:
        evaluation = load_records(data_args.validation_file_dir, kind, eval_report, skip, converter)
    elif data_args.validation_split_percentage > 0 and len(train) > 1:
        shuffled = train[:]
        random.Random(seed).shuffle(shuffled)
        held_out = max(1, int(len(train) * data_args.validation_split_percentage / 100))
        evaluation, train = shuffled[:held_out], shuffled[held_out:]
        eval_report.read = held_out
        train_report.read -= held_out
    train = apply_cap(train, data_args.max_train_samples, train_report, "--max_train_samples")
    evaluation = apply_cap(evaluation, data_args.max_eval_samples, eval_report, "--max_eval_samples")
    if not train:
        raise InputError("no usable training records", data_args.train_file_dir)
    if data_args.validation_file_dir and not evaluation:
        eval_report.log()
        raise InputError("no usable validation records: every one was rejected", data_args.validation_file_dir)
    return train, evaluation, train_report, eval_report


def apply_cap(records: list, cap: int | None, report: DataReport, flag: str) -> list:
    if cap is None or len(records) <= cap:
        return records
    report.left_out, report.cap_flag = len(records) - cap, flag
    return records[:cap]


def log_reports(train_report: DataReport, eval_report: DataReport, eval_rows: list) -> None:
    """Log what became of every record; a validation set asked for but left empty by encoding is an error,
    not a run that silently skips evaluation."""
    train_report.log()
    if eval_report.read:
        eval_report.log()
        if not eval_rows:
            raise InputError("no usable validation records: every one was rejected (see the report above)")


QUERY_TEXT_KEYS = ("question", "query", "prompt", "instruction")


def query_to_messages(record: dict) -> tuple[list[dict], str | None, list[dict] | None]:
    """An inference query as chat messages ending with a user (or tool) turn, plus a reference answer if
    the record carried one (a trailing assistant turn, or an `answer`/`output`/`response` field), plus the
    record's tools. A trailing assistant turn that calls tools is dropped with no text reference."""
    if "conversations" in record or "messages" in record:
        key = "conversations" if "conversations" in record else "messages"
        role_key, content_key = ("from", "value") if key == "conversations" else ("role", "content")
        messages = _turns_from_list(record[key], key, role_key, content_key)
        reference = None
        if messages[-1]["role"] == "assistant":
            last = messages.pop()
            reference = None if last.get("tool_calls") else last["content"]
        if not messages or messages[-1]["role"] not in PROMPT_ROLES:
            raise RecordError("wrong role order", f"{key} must end with a user turn to be answered")
        system = _system(record)
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return messages, reference, parse_tools(record.get("tools"))
    for key in QUERY_TEXT_KEYS:
        if key in record:
            text = _require_string(record[key], key)
            extra = _require_string(record.get("input") or "", "input") if key == "instruction" else ""
            if not text.strip():
                raise RecordError("empty text", f"{key} is empty")
            messages = []
            system = _system(record)
            if system:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": f"{text}\n{extra}" if extra else text})
            reference = record.get("answer", record.get("output", record.get("response")))
            return messages, reference if isinstance(reference, str) else None, parse_tools(record.get("tools"))
    if "text" in record:  # a line of a .txt file
        return [{"role": "user", "content": _require_string(record["text"], "text")}], None, None
    raise RecordError(
        "unknown format",
        f"query in no known format (keys: {', '.join(sorted(record)) or 'none'}); expected one of "
        f"{', '.join(QUERY_TEXT_KEYS)}, 'conversations' or 'messages'",
    )


def _response_text(value, key: str) -> str:
    """A preference response: a string, or a message list whose last turn is the assistant's answer."""
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            raise RecordError("malformed response", f"{key} as a list must end with an assistant message")
        value = value[-1].get("content")
    text = content_text(value, key)
    if not text.strip():
        raise RecordError(f"empty {key}", f"{key} is empty")
    return text


PREFERENCE_PAIRS = (("chosen", "rejected"), ("response_chosen", "response_rejected"))


def request_messages(turns, tools=None) -> tuple[list[dict], list[dict] | None]:
    """An API request's messages (OpenAI shape, ending with a user or tool turn) and tools, converted and
    checked as training records are; a RecordError says what is wrong."""
    messages = _turns_from_list(turns, "messages", "role", "content")
    if messages[-1]["role"] not in PROMPT_ROLES:
        raise RecordError("wrong role order", f"messages end with a '{messages[-1]['role']}' turn: the last one "
                          "must be a user or tool turn to answer")
    check_conversation(messages + [{"role": "assistant", "content": "."}], "messages")
    return messages, parse_tools(tools)


def record_to_preference(record: dict) -> dict:
    """A preference pair as {"prompt": messages ending with a user (or tool) turn, "chosen": text,
    "rejected": text, "tools": definitions or None}, from MedicalGPT's `conversations` + `chosen`/`rejected`,
    `question` + `response_chosen`/`response_rejected`, or `prompt` (text or messages) + `chosen`/`rejected`."""
    if "question" in record:
        chosen_key, rejected_key = PREFERENCE_PAIRS[1]
    else:
        chosen_key, rejected_key = PREFERENCE_PAIRS[0]
    if not any(key in record for key in ("conversations", "messages", "question", "prompt")):
        raise RecordError(
            "unknown format",
            f"preference record in no known format (keys: {', '.join(sorted(record)) or 'none'}); expected "
            "'conversations' + 'chosen'/'rejected', 'question' + 'response_chosen'/'response_rejected', "
            "or 'prompt' + 'chosen'/'rejected'",
        )
    for key in (chosen_key, rejected_key):
        if key not in record or record[key] is None:
            raise RecordError(f"missing {key}", f"preference record has no '{key}'")
    chosen = _response_text(record[chosen_key], chosen_key)
    rejected = _response_text(record[rejected_key], rejected_key)
    if chosen.strip() == rejected.strip():
        raise RecordError("chosen equals rejected", f"{chosen_key} and {rejected_key} are the same answer: the pair teaches nothing")

    if "conversations" in record:
        prompt = _turns_from_list(record["conversations"], "conversations", "from", "value")
    elif "messages" in record:
        prompt = _turns_from_list(record["messages"], "messages", "role", "content")
    elif "question" in record:
        prompt = [{"role": "user", "content": _require_string(record["question"], "question")}]
    elif isinstance(record["prompt"], list):
        prompt = _turns_from_list(record["prompt"], "prompt", "role", "content")
    else:
        prompt = [{"role": "user", "content": _require_string(record["prompt"], "prompt")}]
    system = _system(record)
    if system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    # The prompt must be a conversation that an answer can follow.
    answered = prompt + [{"role": "assistant", "content": chosen}]
    check_conversation(answered, "prompt", tool_after_answer="conversations" in record)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": parse_tools(record.get("tools"))}


CONVERTERS["preference"] = record_to_preference


def question_record(record: dict, needs_answer: bool) -> dict:
    """A question to answer during RL (GRPO, PPO): {"prompt": messages, "answer": reference or None,
    "tools": definitions or None}."""
    messages, answer, tools = query_to_messages(record)
    if needs_answer and not (isinstance(answer, str) and answer.strip()):
        raise RecordError("missing answer", "question has no 'answer', which the accuracy reward needs")
    return {"prompt": messages, "answer": answer, "tools": tools}


CONVERTERS["question"] = lambda record: question_record(record, needs_answer=False)


def load_question_splits(data_args, seed: int, needs_answer: bool):
    """Training and validation questions for RL stages, their counts logged."""
    def convert(record):
        question = question_record(record, needs_answer)
        # RL prompts go through datasets.Dataset, which merges the keys of every row's call arguments
        # ({"x": 1} becomes {"x": 1, "y": None}) and would change what the template renders.
        if question["tools"] or any(message.get("tool_calls") for message in question["prompt"]):
            raise RecordError("tool use in an RL question", "tool definitions and calls are not supported by the "
                              "RL stages (GRPO, PPO); train tool use with SFT, DPO or ORPO")
        return question

    train, evaluation, train_report, eval_report = load_splits(data_args, "question", seed, converter=convert)
    train_report.kept, eval_report.kept = len(train), len(evaluation)
    log_reports(train_report, eval_report, evaluation)
    strip = lambda rows: [{"prompt": row["prompt"], "answer": row["answer"]} for row in rows]  # noqa: E731
    return strip(train), strip(evaluation)


def read_queries(path: str) -> list[dict]:
    """Questions to answer, each {"messages", "reference", "tools", "source"}, from any query format."""
    def convert(record):
        messages, reference, tools = query_to_messages(record)
        return {"messages": messages, "reference": reference, "tools": tools}

    return load_records(path, "query", DataReport("queries"), skip_invalid=False, converter=convert)
