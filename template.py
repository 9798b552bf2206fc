"""Conversation templates: the prompt format a model is trained and served with.

A template is data. Each role has a slot, a string in which "{content}" marks where the message goes:

    Template(name="chatml",
             system="<|im_start|>system\\n{content}<|im_end|>\\n",
             user="<|im_start|>user\\n{content}<|im_end|>\\n",
             assistant="<|im_start|>assistant\\n{content}<|im_end|>\\n",
             stop_words=["<|im_end|>"])

From the slots the template builds one Jinja chat_template, and everything else uses that one text, so the
jobs below can never drift apart:
  to_jinja()       -> the chat_template in plain Jinja2. The toolkit writes it into the tokenizer of every
                      saved model, so inference, the API, vLLM, llama.cpp and any other engine render exactly
                      what training saw. (Tool definitions and call arguments are written with the engine's
                      `tojson`: transformers and vLLM write JSON as training did; plain Jinja2's own filter
                      sorts keys and escapes "<", ">", "&" and "'".) to_jinja(mark_answers=True) adds transformers' {% generation %} blocks
                      around each answer, for `return_assistant_tokens_mask=True`; other engines cannot parse
                      that tag, so it is never saved with a model.
  render(messages) -> the conversation as text (what the model sees): that Jinja, rendered.
  split(messages)  -> (prompt, answer) text pairs for loss masking, from the same rendering with each answer
                      marked. An answer is the assistant's text through its end-of-turn marker, so the model
                      learns to stop; the assistant header (the generation prompt) belongs to the prompt.

Every registered template renders what its family's own chat template renders; where it deliberately does
not, the registration says why (README lists the differences).

Special tokens. Slots may contain "{bos}" and "{eos}": the tokenizer's bos/eos text. Families whose turn ends
with the tokenizer's eos write "{eos}", never a literal "</s>", so they work with any tokenizer. render/split
take `bos_token=`/`eos_token=` (the toolkit passes the tokenizer's); left out, they default to the family's
own text (`Template.bos_token`, `Template.eos_token`). stop_words may hold "{eos}" too.

Messages (OpenAI shape): {"role": "system" | "user" | "assistant" | "tool", "content": str}. A system message
may only come first; without one, `default_system` is used when non-empty. Content may also be a list of text
parts ({"type": "text", "text": ...}), which is joined. An assistant message may carry
"tool_calls": [{"type": "function", "function": {"name": ..., "arguments": {...}}}] (content then may be
empty or None); "tool" messages are the results. The functions the model may call are passed as
`tools=[{"type": "function", "function": {"name", "description", "parameters"}}]`. How definitions, calls and
results are written is the family's ToolFormat (`Template.tools`); `parse_tool_calls` reads calls back out of
generated text. A template without a ToolFormat refuses tools and calls, and renders tool results with its
`tool` slot (or the user slot).

`--template_name auto` (use the model's own chat_template) is not a template: medgpt.chat.ChatFormat
handles it, and get_template("auto") says so.

To add your own template, copy the `medical_inquiry` registration at the bottom of this file.
"""

import json
import re
from dataclasses import dataclass, field
from functools import cached_property

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

class TemplateError(ValueError):
    """A conversation the template cannot render (a role out of place, tools it has no format for, ...)."""


CONTENT = "{content}"
_SPECIAL = re.compile(r"(\{bos\}|\{eos\})")
# Private-use characters that bracket each answer while rendering for split(); never part of a result.
_OPEN, _CLOSE = "\U000f0001", "\U000f0002"
ROLES = ("system", "user", "assistant", "tool")


def _literal(text: str) -> str:
    # JSON string escapes are valid Jinja string escapes.
    return json.dumps(text, ensure_ascii=False)


def _expr(text: str) -> str:
    """A Jinja expression for slot text: string literals joined with the bos/eos variables."""
    parts = [{"{bos}": "bos", "{eos}": "eos"}.get(piece, _literal(piece)) for piece in _SPECIAL.split(text) if piece]
    return " ~ ".join(parts) or "''"


def _turn(slot: str, variable: str) -> str:
    """A Jinja expression for a slot with `variable` in place of {content}."""
    before, after = slot.split(CONTENT)
    return " ~ ".join([_expr(before)] * bool(before) + [f"({variable})"] + [_expr(after)] * bool(after))


def _content_text(variable: str, source: str) -> list[str]:
    """Jinja lines that set `variable` to the text of a message content: None -> "", text parts joined."""
    return [f"{{%- set {variable} = {source} -%}}",
            f"{{%- if {variable} is none -%}}{{%- set {variable} = '' -%}}",
            f"{{%- elif {variable} is not string -%}}{{%- set {variable} = {variable} | map(attribute='text') | join('') -%}}",
            "{%- endif -%}"]


# The arguments of a call as JSON text: given as text, used as they are; given as an object, serialized.
_ARGUMENTS = "(call.arguments if call.arguments is string else call.arguments | tojson)"
_CALL = "{%- set call = tool_call.function if tool_call.function is defined else tool_call -%}"


def _json_object(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _call(name: str, arguments) -> dict:
    """An OpenAI-shape call; arguments written as JSON text are read into an object when they hold one."""
    if isinstance(arguments, str) and _json_object(arguments) is not None:
        arguments = _json_object(arguments)
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass
class ToolFormat:
    """How one family writes tool definitions, calls and results (the family's official format).

    result:               slot for one tool result ("{content}").
    results_open/_close:  text before/after a run of consecutive results (Qwen puts them in one user turn);
    results_separator:    text between two results of one run.
    header_after_results: the assistant header that follows results, when it is not the usual one.
    quote_results:        write each result as a JSON string, quotes and escapes included.
    The Jinja hooks below are overridden per family; `parse` reads the calls back out of an answer.
    """

    name: str
    result: str
    results_open: str = ""
    results_separator: str = ""
    results_close: str = ""
    header_after_results: str | None = None
    quote_results: bool = False  # results written as JSON strings (Llama 3.1's template does so)

    def system_jinja(self) -> list[str]:
        """Jinja lines run when `tools` is given, before the system turn is written: they may rewrite
        `system` (its text) and `has_system`."""
        return []

    def first_user_jinja(self) -> list[str]:
        """Jinja lines run for the first user message when `tools` is given; they may rewrite `content`."""
        return []

    def before_last_user_jinja(self) -> list[str]:
        """Jinja lines run before the last user turn is written when `tools` is given; they may write text."""
        return []

    def calls_jinja(self) -> list[str]:
        """Jinja lines that set `body` (the answer text before the end-of-turn marker) from `content` and
        `message.tool_calls`; they may also set `lead` (the template's answer_prefix) to ''."""
        raise NotImplementedError

    def result_jinja(self) -> list[str]:
        """Jinja lines that write one tool result (`content`, the message is `message`)."""
        return [f"{{{{- {_turn(self.result, 'content | tojson' if self.quote_results else 'content')} -}}}}"]

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """(content, calls) of a generated answer (end-of-turn marker removed)."""
        raise NotImplementedError


_HERMES_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                       "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_HERMES_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                       "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                       '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
# One block: never spans another <tool_call>; an unclosed last block (the answer ran out of tokens) counts.
_HERMES_CALL = re.compile(r"<tool_call>\s*((?:(?!<tool_call>).)*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesTools(ToolFormat):
    """Qwen2.5/Qwen3 (and Hermes-style ChatML): definitions as JSON lines in a <tools> block of the system
    turn, each call a JSON object in <tool_call> tags on its own line after the content."""

    def system_jinja(self):
        return ["{%- set tool_lines = namespace(text='') -%}",
                "{%- for tool in tools -%}{%- set tool_lines.text = tool_lines.text ~ '\\n' ~ (tool | tojson) -%}{%- endfor -%}",
                f"{{%- set system = (system ~ '\\n\\n' if has_system else '') ~ {_literal(_HERMES_TOOLS_INTRO)} "
                f"~ tool_lines.text ~ {_literal(_HERMES_TOOLS_OUTRO)} -%}}",
                "{%- set has_system = true -%}"]

    def calls_jinja(self):
        # A namespace: a plain `set` inside a for loop would not outlive the loop.
        return ["{%- set calls = namespace(text=content) -%}",
                "{%- for tool_call in message.tool_calls -%}",
                f"    {_CALL}",
                "    {%- if content or not loop.first -%}{%- set calls.text = calls.text ~ '\\n' -%}{%- endif -%}",
                "    {%- set calls.text = calls.text ~ '<tool_call>\\n{\"name\": \"' ~ call.name ~ '\", \"arguments\": ' "
                f"~ {_ARGUMENTS} ~ '}}\\n</tool_call>' -%}}",
                "{%- endfor -%}",
                "{%- set body = calls.text -%}"]

    def parse(self, text):
        calls, kept, position = [], [], 0
        for match in _HERMES_CALL.finditer(text):
            value = _json_object(match.group(1))
            if value is None or not isinstance(value.get("name"), str):
                continue  # not a call the format can express: left in the content
            calls.append(_call(value["name"], value.get("arguments", {})))
            kept.append(text[position: match.start()])
            position = match.end()
        if not calls:
            return text, []
        kept.append(text[position:])
        return "\n".join(piece.strip("\n") for piece in kept if piece.strip()), calls


_LLAMA31_TOOLS_NOTE = ("Given the following functions, please respond with a JSON for a function call with its proper "
                       "arguments that best answers the given prompt.\n\n"
                       'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                       'value}.Do not use variables.\n\n')


class Llama31Tools(ToolFormat):
    """Llama 3.1/3.2/3.3: "Environment: ipython" in the system turn, definitions (JSON, indent 4) in front of
    the first user message, one call per answer as {"name": ..., "parameters": {...}} (the message's content
    is not written, as in Meta's template), results in an `ipython` turn."""

    def system_jinja(self):
        return ["{%- set system = 'Environment: ipython\\n' ~ system -%}"]

    def first_user_jinja(self):
        return ["{%- set tool_lines = namespace(text='') -%}",
                "{%- for tool in tools -%}"
                "{%- set tool_lines.text = tool_lines.text ~ (tool | tojson(indent=4)) ~ '\\n\\n' -%}{%- endfor -%}",
                f"{{%- set content = {_literal(_LLAMA31_TOOLS_NOTE)} ~ tool_lines.text ~ content -%}}"]

    def calls_jinja(self):
        return ["{%- if message.tool_calls | length != 1 -%}"
                "{{- raise_exception('Llama 3.1 answers with one tool call at a time, got ' ~ "
                "(message.tool_calls | length)) -}}{%- endif -%}",
                "{%- set tool_call = message.tool_calls[0] -%}",
                _CALL,
                "{%- set body = '{\"name\": \"' ~ call.name ~ '\", \"parameters\": ' ~ " + _ARGUMENTS + " ~ '}' -%}"]

    def parse(self, text):
        stripped = text.strip()
        if stripped.startswith("<|python_tag|>"):
            stripped = stripped[len("<|python_tag|>"):].strip()
        value = _json_object(stripped)
        if value is None or not isinstance(value.get("name"), str) or not isinstance(value.get("parameters"), dict):
            return text, []
        return "", [_call(value["name"], value["parameters"])]


_DEEPSEEK_CALL = re.compile(r"<｜tool▁call▁begin｜>(\w+)<｜tool▁sep｜>(.*?)\n```json\n(.*?)\n```<｜tool▁call▁end｜>",
                            re.DOTALL)


class DeepSeekTools(ToolFormat):
    """DeepSeek-V3: calls between <｜tool▁calls▁begin｜> and <｜tool▁calls▁end｜>, each with its arguments in
    a json code block; results in one <｜tool▁outputs▁begin｜> block, after which the answer follows without
    an assistant marker. Tool definitions have no place in DeepSeek-V3's template and are not written."""

    def calls_jinja(self):
        return ["{%- set calls = namespace(text='') -%}",
                "{%- for tool_call in message.tool_calls -%}",
                f"    {_CALL}",
                "    {%- set calls.text = calls.text ~ ('\\n' if not loop.first else '') ~ '<｜tool▁call▁begin｜>' ~ "
                "(tool_call.type if tool_call.type is defined else 'function') ~ '<｜tool▁sep｜>' ~ call.name ~ "
                f"'\\n```json\\n' ~ {_ARGUMENTS} ~ '\\n```<｜tool▁call▁end｜>' -%}}",
                "{%- endfor -%}",
                "{%- set body = content ~ '<｜tool▁calls▁begin｜>' ~ calls.text ~ '<｜tool▁calls▁end｜>' -%}"]

    def parse(self, text):
        if "<｜tool▁calls▁begin｜>" not in text:
            return text, []
        content, rest = text.split("<｜tool▁calls▁begin｜>", 1)
        calls = []
        for _kind, name, arguments in _DEEPSEEK_CALL.findall(rest):
            value = _json_object(arguments)
            if value is not None:
                calls.append(_call(name.strip(), value))
        return (content, calls) if calls else (text, [])



_MISTRAL_ID = ("{%- if not ID is defined or ID is none or ID | length != 9 -%}{{- raise_exception('the Mistral tool "
               "format needs a 9-character id on every tool call and on its result (tool_call_id)') -}}{%- endif -%}")


class MistralTools(ToolFormat):
    """Mistral Instruct v0.3 ("v3"): definitions in an [AVAILABLE_TOOLS] block before the last user turn,
    calls as a JSON list after [TOOL_CALLS] (the message's text is not written, as in Mistral's template),
    each result in [TOOL_RESULTS] with the id of its call. Ids of 9 characters are required, as Mistral's
    template requires them."""

    def before_last_user_jinja(self):
        # Mistral writes each definition's fields itself: text values unescaped, others as JSON.
        return ["{%- set definitions = namespace(text='') -%}",
                "{%- for tool in tools -%}",
                "    {%- set function = tool.function if tool.function is defined else tool -%}",
                "    {%- set fields = namespace(text='') -%}",
                "    {%- for key, value in function.items() if key != 'return' -%}",
                "        {%- set fields.text = fields.text ~ (', ' if not loop.first else '') ~ '\"' ~ key ~ '\": ' ~ "
                "('\"' ~ value ~ '\"' if value is string else value | tojson) -%}",
                "    {%- endfor -%}",
                "    {%- set definitions.text = definitions.text ~ (', ' if not loop.first else '') ~ "
                "'{\"type\": \"function\", \"function\": {' ~ fields.text ~ '}}' -%}",
                "{%- endfor -%}",
                "{{- '[AVAILABLE_TOOLS] [' ~ definitions.text ~ '][/AVAILABLE_TOOLS]' -}}"]

    def calls_jinja(self):
        return ["{%- set calls = namespace(text='') -%}",
                "{%- for tool_call in message.tool_calls -%}",
                f"    {_CALL}",
                "    " + _MISTRAL_ID.replace("ID", "tool_call.id"),
                "    {%- set calls.text = calls.text ~ (', ' if not loop.first else '') ~ (call | tojson)[:-1] ~ "
                "', \"id\": \"' ~ tool_call.id ~ '\"}' -%}",
                "{%- endfor -%}",
                "{%- set body = '[TOOL_CALLS] [' ~ calls.text ~ ']' -%}",
                "{%- set lead = '' -%}"]

    def result_jinja(self):
        return [_MISTRAL_ID.replace("ID", "message.tool_call_id"),
                "{{- '[TOOL_RESULTS] {\"content\": ' ~ content ~ ', \"call_id\": \"' ~ message.tool_call_id ~ "
                "'\"}[/TOOL_RESULTS]' -}}"]

    def parse(self, text):
        start = text.find("[TOOL_CALLS]")
        try:  # the JSON list right after the marker; text after it is not part of the calls
            values = json.JSONDecoder().raw_decode(text[start + len("[TOOL_CALLS]"):].lstrip())[0] if start >= 0 else None
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, list) or not all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                                   for v in values):
            return text, []
        calls = []
        for value in values:
            call = _call(value["name"], value.get("arguments", {}))
            if isinstance(value.get("id"), str):
                call["id"] = value["id"]
            calls.append(call)
        return text[:start], calls


_ENVIRONMENT = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
# As transformers renders chat templates: JSON without ASCII escapes, keys in the order given.
_ENVIRONMENT.filters["tojson"] = lambda value, indent=None, separators=None, sort_keys=False: json.dumps(
    value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
SYSTEM_PLACEMENTS = ("turn", "first_user", "last_user")


@dataclass
class Template:
    """A prompt format. Slots are strings with one "{content}"; they may use "{bos}" and "{eos}".

    prefix:            text at the very start of every conversation (e.g. "{bos}").
    system_placement:  "turn" (a system turn of its own); "first_user" / "last_user": the family has no system
                       turn (gemma, llama2, mistral), so the system slot is put in front of that user message.
    system_preamble:   text put in front of every system prompt (Llama 3.1's knowledge-date lines);
    system_always:     write the system turn even when there is no system prompt.
    strip_content:     roles whose content is stripped of surrounding whitespace, as the family's own template
                       does (True: all); strip_merged_turn: strip the first user turn after the system prompt
                       is put in front of it (Llama 2 strips the joined text).
    thought:           reasoning block of a thinking model, e.g. "<think>\\n{content}\\n</think>\\n\\n" (qwen3);
                       enables the `enable_thinking` keyword and Qwen3's history rule, see `_thought_jinja`.
    answer_prefix:     text that starts every answer but not the generation prompt: the model writes it (Llama 2
                       and Vicuna answer " ..." after a prompt that ends without the space).
    closing:           text after a final answer (ChatGLM3's and Baichuan2's fine-tuning end with eos); it is
                       part of that answer, so the model learns to stop. closing_always: also after a conversation
                       that ends otherwise, when no generation prompt is asked for (Phi-3's template).
    tools:             the family's ToolFormat, or None: tools and tool calls are then refused.
    bos_token, eos_token: the family's own text for "{bos}"/"{eos}" when the caller gives none.
    """

    name: str
    user: str
    assistant: str
    system: str = CONTENT
    tool: str = ""  # tool results without a ToolFormat; "" renders them with the user slot
    prefix: str = ""
    default_system: str = ""
    system_preamble: str = ""
    system_always: bool = False
    system_placement: str = "turn"
    stop_words: list[str] = field(default_factory=list)
    strip_content: bool | tuple[str, ...] = ()
    strip_merged_turn: bool = False
    thought: str = ""
    answer_prefix: str = ""
    closing: str = ""
    closing_always: bool = False
    tools: ToolFormat | None = None
    bos_token: str = ""
    eos_token: str = "</s>"

    def __post_init__(self):
        if self.strip_content is True:
            self.strip_content = ROLES
        self.strip_content = tuple(self.strip_content or ())
        slots = {"user": self.user, "assistant": self.assistant, "system": self.system}
        slots.update({"tool": self.tool} if self.tool else {})
        slots.update({"thought": self.thought} if self.thought else {})
        slots.update({"tools.result": self.tools.result} if self.tools else {})
        for slot, text in slots.items():
            if text.count(CONTENT) != 1:
                raise ValueError(f"template {self.name!r}: the {slot} slot must contain {CONTENT} exactly once")
        for slot in ("prefix", "answer_prefix", "closing", "system_preamble"):
            if CONTENT in getattr(self, slot):
                raise ValueError(f"template {self.name!r}: {slot} cannot contain {CONTENT}")
        if self.system_placement not in SYSTEM_PLACEMENTS:
            raise ValueError(f"template {self.name!r}: system_placement must be one of {', '.join(SYSTEM_PLACEMENTS)}, "
                             f"got {self.system_placement!r}")
        # The end-of-turn marker must be part of the answer, or the model never learns to stop.
        answer_end = self.assistant.split(CONTENT)[1] + self.closing
        if not any(word and word in answer_end for word in self.stop_words):
            raise ValueError(
                f"template {self.name!r}: no stop word appears after {CONTENT} in the assistant slot "
                f"{self.assistant!r} or in closing; list the end-of-turn marker in stop_words"
            )

    # ----- rendering ------------------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = False, *, tools: list[dict] | None = None,
               enable_thinking: bool = True, bos_token: str | None = None, eos_token: str | None = None) -> str:
        """The conversation as text; with add_generation_prompt, followed by the assistant header."""
        text = self._render(messages, add_generation_prompt, tools, enable_thinking, bos_token, eos_token)
        return text.replace(_OPEN, "").replace(_CLOSE, "")

    def split(self, messages: list[dict], *, tools: list[dict] | None = None, enable_thinking: bool = True,
              bos_token: str | None = None, eos_token: str | None = None) -> list[tuple[str, str]]:
        """One (prompt, answer) pair per assistant message. A prompt holds everything since the previous
        answer; an answer is the assistant's text through its end-of-turn marker. For a conversation that
        ends with an assistant message, "".join(p + a for p, a in pairs) == render(messages); text after the
        last answer (a trailing user turn) belongs to no pair."""
        text = self._render(messages, False, tools, enable_thinking, bos_token, eos_token)
        pairs, prompt = [], text.split(_OPEN)[0]
        for piece in text.split(_OPEN)[1:]:
            answer, _, after = piece.partition(_CLOSE)
            pairs.append((prompt, answer))
            prompt = after
        return pairs

    def parse_tool_calls(self, text: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
        """(content, calls) of a generated answer in this family's format; calls are OpenAI-shape
        {"type": "function", "function": {"name": ..., "arguments": {...}}}. Without a ToolFormat, when the
        text holds no well-formed call, or (given `tools`) when a call names a function not among them, the
        text comes back whole with no calls."""
        if self.tools is None:
            return text, []
        content, calls = self.tools.parse(text)
        if tools is not None:
            known = {(tool.get("function") or tool).get("name") for tool in tools}
            if any(call["function"]["name"] not in known for call in calls):
                return text, []
        return content, calls

    @property
    def generation_prompt(self) -> str:
        """The assistant header that starts a reply (family's own bos/eos text; thinking on)."""
        return self._fill(self.assistant.split(CONTENT)[0])

    def _fill(self, slot: str) -> str:
        return slot.replace("{bos}", self.bos_token).replace("{eos}", self.eos_token)

    def _render(self, messages, add_generation_prompt, tools, enable_thinking, bos_token, eos_token) -> str:
        def raise_exception(message):
            raise TemplateError(f"template {self.name!r}: {message}")

        return self._compiled.render(
            messages=list(messages), tools=tools or None, add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking, raise_exception=raise_exception,
            bos_token=self.bos_token if bos_token is None else bos_token,
            eos_token=self.eos_token if eos_token is None else eos_token,
        )

    @cached_property
    def _compiled(self) -> jinja2.Template:
        return _ENVIRONMENT.from_string(self._jinja("split"))

    # ----- Jinja export ---------------------------------------------------------------------------------

    def to_jinja(self, mark_answers: bool = False) -> str:
        """The chat_template, plain Jinja2; with `mark_answers`, each answer is wrapped in transformers'
        {% generation %} block, which only transformers understands.

        apply_chat_template(messages, tools=..., tokenize=False, add_generation_prompt=..., enable_thinking=...)
        gives exactly render(...) called with the tokenizer's bos_token/eos_token."""
        return self._jinja("generation" if mark_answers else None)

    def _answer(self, expression: str, marks: str | None) -> str:
        if marks == "generation":
            return f"{{%- generation -%}}{{{{- {expression} -}}}}{{%- endgeneration -%}}"
        if marks == "split":
            return f"{{{{- {_literal(_OPEN)} ~ {expression} ~ {_literal(_CLOSE)} -}}}}"
        return f"{{{{- {expression} -}}}}"

    def _header(self, after_results: str) -> str:
        """A Jinja expression for the assistant header; `after_results` tells when tool results precede it."""
        header = _expr(self.assistant.split(CONTENT)[0])
        if self.tools is None or self.tools.header_after_results is None:
            return header
        return f"({_expr(self.tools.header_after_results)} if {after_results} else {header})"

    def _strip(self, role: str, variable: str) -> list[str]:
        return [f"{{%- set {variable} = {variable} | trim -%}}"] if role in self.strip_content else []

    def _jinja(self, marks: str | None) -> str:
        header, end = self.assistant.split(CONTENT)
        system_turn = _turn(self.system, "system")
        tool_format = self.tools
        refuse_tools = (f"{{{{- raise_exception('template {self.name} has no tool-call format: tools and tool calls "
                        "cannot be rendered') -}}")
        out = [f"{{#- chat template {self.name!r}, exported from template.py"
               f"{'; answers are in generation blocks' if marks == 'generation' else ''} -#}}",
               "{%- set bos = bos_token if bos_token is defined and bos_token is not none else '' -%}",
               "{%- set eos = eos_token if eos_token is defined and eos_token is not none else '' -%}",
               "{%- set tools = tools if tools is defined and tools else none -%}",
               "{%- if messages and messages[0]['role'] == 'system' -%}",
               *_content_text("system", "messages[0]['content']"),
               *self._strip("system", "system"),
               "    {%- set has_system = true -%}",
               "    {%- set loop_messages = messages[1:] -%}",
               "{%- else -%}",
               f"    {{%- set system = {_literal(self.default_system.strip() if 'system' in self.strip_content else self.default_system)} -%}}",
               f"    {{%- set has_system = {str(bool(self.default_system) or self.system_always).lower()} -%}}",
               "    {%- set loop_messages = messages -%}",
               "{%- endif -%}"]
        if self.system_preamble:
            out.append(f"{{%- set system = {_literal(self.system_preamble)} ~ system -%}}")
        out.append("{%- if tools -%}")
        out += tool_format.system_jinja() if tool_format else [refuse_tools]
        out.append("{%- endif -%}")
        out.append("{%- set ns = namespace(last_user=-1, system_pending=has_system and "
                   f"{str(self.system_placement != 'turn').lower()}, first_user=true) -%}}")
        out += ["{%- for message in loop_messages -%}",
                "    {%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}",
                "{%- endfor -%}"]
        if self.prefix:
            out.append(f"{{{{- {_expr(self.prefix)} -}}}}")
        if self.system_placement == "turn":
            out.append(f"{{%- if has_system -%}}{{{{- {system_turn} -}}}}{{%- endif -%}}")
        out += ["{%- for message in loop_messages -%}",
                *_content_text("content", "message['content']"),
                "    {%- if message['role'] == 'user' -%}"]
        if self.strip_merged_turn:  # the turn that takes the system prompt is stripped after joining
            out += ["        {%- if not ns.system_pending -%}", *self._strip("user", "content"), "        {%- endif -%}"]
        else:
            out += self._strip("user", "content")
        if tool_format and tool_format.first_user_jinja():
            out += ["        {%- if tools and ns.first_user -%}", *tool_format.first_user_jinja(), "        {%- endif -%}"]
        out.append("        {%- set ns.first_user = false -%}")
        if self.system_placement != "turn":
            where = "true" if self.system_placement == "first_user" else "loop.index0 == ns.last_user"
            out += [f"        {{%- if ns.system_pending and {where} -%}}",
                    f"            {{%- set content = {system_turn} ~ content -%}}",
                    *(["            {%- set content = content | trim -%}"] if self.strip_merged_turn else []),
                    "            {%- set ns.system_pending = false -%}",
                    "        {%- endif -%}"]
        if tool_format and tool_format.before_last_user_jinja():
            out += ["        {%- if tools and loop.index0 == ns.last_user -%}", *tool_format.before_last_user_jinja(),
                    "        {%- endif -%}"]
        out += [f"        {{{{- {_turn(self.user, 'content')} -}}}}",
                "    {%- elif message['role'] == 'tool' -%}"]
        if tool_format:
            after_tool = "(not loop.first and loop_messages[loop.index0 - 1]['role'] == 'tool')"
            before_tool = "(not loop.last and loop_messages[loop.index0 + 1]['role'] == 'tool')"
            out += [f"        {{%- if not {after_tool} -%}}{{{{- {_expr(tool_format.results_open)} -}}}}",
                    f"        {{%- else -%}}{{{{- {_expr(tool_format.results_separator)} -}}}}{{%- endif -%}}",
                    *tool_format.result_jinja(),
                    f"        {{%- if not {before_tool} -%}}{{{{- {_expr(tool_format.results_close)} -}}}}{{%- endif -%}}"]
        else:
            out += [*self._strip("tool", "content"), f"        {{{{- {_turn(self.tool or self.user, 'content')} -}}}}"]
        out += ["    {%- elif message['role'] == 'assistant' -%}",
                *self._strip("assistant", "content"),
                "        {%- set think_prompt = '' -%}",
                "        {%- set think_block = '' -%}"]
        out += self._thought_jinja()
        out += ["        {%- set body = content -%}",
                f"        {{%- set lead = {_expr(self.answer_prefix)} -%}}",
                "        {%- if message.tool_calls -%}",
                *(tool_format.calls_jinja() if tool_format else [refuse_tools]),
                "        {%- endif -%}"]
        header_expr = self._header("not loop.first and loop_messages[loop.index0 - 1]['role'] == 'tool'")
        out += [f"        {{{{- {header_expr} ~ think_prompt -}}}}",
                "        " + self._answer(f"lead ~ think_block ~ body ~ {_expr(end)}"
                                 + (f" ~ ({_expr(self.closing)} if loop.last and not add_generation_prompt else '')"
                                    if self.closing else ""), marks),
                "    {%- else -%}",
                "        {{- raise_exception('unexpected ' ~ message['role'] ~ ' message at position ' ~ loop.index ~ "
                "': roles are user, assistant, tool; a system message may only come first') -}}",
                "    {%- endif -%}",
                "{%- endfor -%}",
                "{%- if ns.system_pending -%}{{- raise_exception('this template puts the system prompt into a user "
                "turn, but there is none') -}}{%- endif -%}",
                "{%- if add_generation_prompt -%}"]
        out.append("    {{- " + self._header("loop_messages and loop_messages[-1]['role'] == 'tool'") + " -}}")
        if self.thought:
            out.append("    {%- if enable_thinking is defined and not enable_thinking -%}"
                       f"{{{{- {_expr(self.thought.replace(CONTENT, ''))} -}}}}{{%- endif -%}}")
        if self.closing_always:  # after a final answer it was written as part of that answer
            out += ["{%- elif not (loop_messages and loop_messages[-1]['role'] == 'assistant') -%}",
                    f"    {{{{- {_expr(self.closing)} -}}}}"]
        out.append("{%- endif -%}")
        return "\n".join(out)

    def _thought_jinja(self) -> list[str]:
        """Jinja lines for the reasoning of a thinking model, following Qwen3's own chat_template: reasoning is
        written in the content as "<think>...</think>answer". Turns before the last user message are rendered
        without their reasoning (history is kept short, as at inference). Turns after it keep their reasoning,
        and the final message always gets a thought block, an empty one when it has no reasoning. Where that
        block sits decides what is trained: with thinking on, it is part of the answer (the model learns to open
        and close its thoughts); with `enable_thinking=False` an empty block is part of the prompt, exactly as in
        the generation prompt for thinking off ("<think>\\n\\n</think>\\n\\n")."""
        if not self.thought:
            return []
        open_tag, close_tag = (_literal(part.strip()) for part in self.thought.split(CONTENT))
        return [
            "        {%- set reasoning = '' -%}",
            f"        {{%- if {close_tag} in content -%}}",
            f"            {{%- set reasoning = content.split({close_tag})[0].rstrip('\\n')"
            f".split({open_tag})[-1].lstrip('\\n') -%}}",
            f"            {{%- set content = content.split({close_tag})[-1].lstrip('\\n') -%}}",
            "        {%- endif -%}",
            "        {%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}",
            "            {%- set content = content.lstrip('\\n') -%}",
            "            {%- if not reasoning and enable_thinking is defined and not enable_thinking -%}",
            f"                {{%- set think_prompt = {_expr(self.thought.replace(CONTENT, ''))} -%}}",
            "            {%- else -%}",
            "                {%- set think_block = " + _turn(self.thought, "reasoning.strip('\\n')") + " -%}",
            "            {%- endif -%}",
            "        {%- endif -%}",
        ]


# ----- the registry -----------------------------------------------------------------------------------------

TEMPLATES: dict[str, Template] = {}


def register_template(name: str, **slots) -> Template:
    """Add a template under `name` (see Template for the slots); the one call needed to add your own."""
    if name in TEMPLATES:
        raise ValueError(f"a template named {name!r} is already registered")
    TEMPLATES[name] = Template(name=name, **slots)
    return TEMPLATES[name]


def get_template(name: str) -> Template:
    if name == "auto":
        raise ValueError("'auto' means the model's own chat_template and is handled by medgpt.chat.ChatFormat, "
                         f"not template.py; registered templates: {', '.join(sorted(TEMPLATES))}")
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; registered templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def _chatml(name: str, **overrides) -> Template:
    slots = dict(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
        tool="<|im_start|>tool\n{content}<|im_end|>\n",
        stop_words=["<|im_end|>"],
        eos_token="<|im_end|>",
    )
    return register_template(name, **{**slots, **overrides})


# Qwen2.5 / Qwen3 tool use: results of one round share a user turn, each in <tool_response> tags.
_QWEN_TOOLS = dict(result="\n<tool_response>\n{content}\n</tool_response>", results_open="<|im_start|>user",
                   results_close="<|im_end|>\n")
# Generic ChatML (SmolLM2, OpenHermes, ...): SmolLM2's own template adds a default system prompt; ours has none.
# ChatML has no tool format of its own: definitions and calls are written as Qwen writes them (Hermes style),
# results as a `tool` turn.
_chatml("chatml", tools=HermesTools("hermes", result="<|im_start|>tool\n{content}<|im_end|>\n"))
# Qwen2/2.5: ChatML with Qwen's default system prompt.
_chatml("qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        tools=HermesTools("qwen", **_QWEN_TOOLS))
# Qwen3: no default system; thinking on/off (see Template._thought_jinja).
_chatml("qwen3", thought="<think>\n{content}\n</think>\n\n", tools=HermesTools("qwen", **_QWEN_TOOLS))
# Yi-1.5 chat models: the system text stands bare before the first turn, and every user turn ends with the
# assistant header (Yi's template writes it whether or not a generation prompt is asked for).
register_template(
    "yi",
    system="{content}",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    stop_words=["<|im_end|>"],
    eos_token="<|endoftext|>",
)

_LLAMA3 = dict(
    prefix="{bos}",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
    strip_content=True,
    bos_token="<|begin_of_text|>",
    eos_token="<|end_of_text|>",
)
# Llama 3 (the corrected template: the assistant header only with add_generation_prompt). It has no tool format.
register_template("llama3", tool="<|start_header_id|>tool<|end_header_id|>\n\n{content}<|eot_id|>",
                  stop_words=["<|eot_id|>"], **_LLAMA3)
# Llama 3.1 / 3.2 / 3.3: a system turn always, with the knowledge-date lines of Meta's template (its fixed date);
# JSON tool calls, results in an `ipython` turn.
register_template(
    "llama3.1",
    system_preamble="Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    system_always=True,
    tools=Llama31Tools("llama3.1", result="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
                       quote_results=True),
    stop_words=["<|eot_id|>", "<|eom_id|>"],
    **_LLAMA3,
)
# Llama 2 chat: bos opens every [INST]; the system prompt sits inside the first one; the answer starts with
# the space after [/INST].
register_template(
    "llama2",
    system="<<SYS>>\n{content}\n<</SYS>>\n\n",
    user="{bos}[INST] {content} [/INST]",
    assistant="{content} {eos}",
    answer_prefix=" ",
    stop_words=["{eos}"],
    system_placement="first_user",
    strip_content=("user", "assistant"),
    strip_merged_turn=True,
    bos_token="<s>",
)
# Mistral Instruct v0.1/v0.2 (their current template): spaces around [INST], the system prompt in front of the
# first user message.
register_template(
    "mistral",
    prefix="{bos}",
    system="{content}\n\n",
    user=" [INST] {content} [/INST]",
    assistant="{content}{eos}",
    answer_prefix=" ",
    stop_words=["{eos}"],
    system_placement="first_user",
    bos_token="<s>",
)
# Mistral Instruct v0.3 (Mistral's "v3" format): the system prompt goes in front of the last user message.
# Mistral's template writes it only when the conversation ends with a user message; for a conversation that
# ends with an answer it goes in front of the user message before that answer, so training sees the prompt
# that serving will build.
register_template(
    "mistral_v3",
    prefix="{bos}",
    system="{content}\n\n",
    user="[INST] {content}[/INST]",
    assistant="{content}{eos}",
    answer_prefix=" ",
    stop_words=["{eos}"],
    system_placement="last_user",
    strip_content=("assistant",),
    tools=MistralTools("mistral_v3", result="{content}"),
    bos_token="<s>",
)
# Mistral Small 3 / 3.1 ("v7"): a [SYSTEM_PROMPT] block.
register_template(
    "mistral_v7",
    prefix="{bos}",
    system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]",
    user="[INST]{content}[/INST]",
    assistant="{content}{eos}",
    stop_words=["{eos}"],
    bos_token="<s>",
)
# Gemma 1-3: the system prompt (as given) opens the first user turn; the assistant role is called "model".
register_template(
    "gemma",
    prefix="{bos}",
    system="{content}\n\n",
    user="<start_of_turn>user\n{content}<end_of_turn>\n",
    assistant="<start_of_turn>model\n{content}<end_of_turn>\n",
    stop_words=["<end_of_turn>"],
    system_placement="first_user",
    strip_content=("user", "assistant"),
    bos_token="<bos>",
    eos_token="<eos>",
)
# Phi-3 / Phi-3.5: eos closes a conversation that is not followed by a generation prompt.
register_template(
    "phi3",
    system="<|system|>\n{content}<|end|>\n",
    user="<|user|>\n{content}<|end|>\n",
    assistant="<|assistant|>\n{content}<|end|>\n",
    closing="{eos}",
    closing_always=True,
    stop_words=["<|end|>"],
    eos_token="<|endoftext|>",
)
# Phi-4 (14B): ChatML with <|im_sep|> and no newlines.
register_template(
    "phi4",
    system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
    user="<|im_start|>user<|im_sep|>{content}<|im_end|>",
    assistant="<|im_start|>assistant<|im_sep|>{content}<|im_end|>",
    tool="<|im_start|>tool<|im_sep|>{content}<|im_end|>",
    stop_words=["<|im_end|>"],
    eos_token="<|im_end|>",
)
# DeepSeek-V3 (and R1's turn format): the system text follows bos bare; a turn ends with eos.
register_template(
    "deepseek",
    prefix="{bos}",
    user="<｜User｜>{content}",
    assistant="<｜Assistant｜>{content}{eos}",
    tools=DeepSeekTools("deepseek", result="<｜tool▁output▁begin｜>{content}<｜tool▁output▁end｜>",
                        results_open="<｜tool▁outputs▁begin｜>", results_separator="\n",
                        results_close="<｜tool▁outputs▁end｜>", header_after_results=""),
    stop_words=["{eos}"],
    bos_token="<｜begin▁of▁sentence｜>",
    eos_token="<｜end▁of▁sentence｜>",
)
# Baichuan2: reserved tokens 106/107 mark user and assistant; its template writes no eos between turns, its
# own fine-tuning code ends the conversation with eos (`closing`).
register_template(
    "baichuan2",
    user="<reserved_106>{content}",
    assistant="<reserved_107>{content}",
    closing="{eos}",
    stop_words=["{eos}", "<reserved_106>"],
)
# ChatGLM3: a turn ends where the next role token starts; the answer begins with the newline and space after
# <|assistant|>; ChatGLM3's fine-tuning code ends the conversation with eos (`closing`).
register_template(
    "chatglm3",
    prefix="[gMASK]sop",
    system="<|system|>\n {content}",
    user="<|user|>\n {content}",
    assistant="<|assistant|>{content}",
    answer_prefix="\n ",
    tool="<|observation|>\n {content}",
    closing="{eos}",
    stop_words=["{eos}", "<|user|>", "<|observation|>"],
)
# Vicuna v1.1 (FastChat): "ASSISTANT:" prompts, the answer starts with a space.
register_template(
    "vicuna",
    default_system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    system="{content} ",
    user="USER: {content} ",
    assistant="ASSISTANT:{content}{eos}",
    answer_prefix=" ",
    stop_words=["{eos}"],
)
# Stanford Alpaca: the output follows "### Response:" directly, then eos. Alpaca has one turn; later turns
# repeat the instruction/response pair.
register_template(
    "alpaca",
    default_system="Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    system="{content}\n\n",
    user="### Instruction:\n{content}\n\n",
    assistant="### Response:{content}{eos}",
    stop_words=["{eos}"],
)

# ----- your own template ------------------------------------------------------------------------------------
# Copy this call to add a template: one register_template(...) with your slots; then --template_name NAME.
# Structured medical consultations: the user turn is the patient's case (information, symptoms, test
# results), the assistant turn the doctor's assessment. "{eos}" becomes the tokenizer's eos text when the
# toolkit tokenizes, so the format works with any model.
register_template(
    "medical_inquiry",
    default_system="你是一名严谨、负责的医疗助手。请根据患者提供的信息（基本情况、症状、检查结果）给出分析、"
    "可能的诊断和建议；信息不足时先询问，病情严重时建议及时就医。\n"
    "You are a careful medical assistant. From the patient's information, symptoms and test results, give "
    "your assessment, the likely diagnosis and advice; ask when information is missing, and advise seeing "
    "a doctor promptly when the condition may be serious.",
    system="{content}\n\n",
    user="### 患者 / Patient:\n{content}\n\n",
    assistant="### 医生 / Doctor:\n{content}{eos}\n\n",
    tool="### 检查结果 / Test results:\n{content}\n\n",
    stop_words=["{eos}"],
)
