"""Conversation templates: the prompt format a model is trained and served with.

A template is data. Each role has a slot, a string in which "{content}" marks where the message goes:

    Template(name="chatml",
             system="<|im_start|>system\\n{content}<|im_end|>\\n",
             user="<|im_start|>user\\n{content}<|im_end|>\\n",
             assistant="<|im_start|>assistant\\n{content}<|im_end|>\\n",
             stop_words=["<|im_end|>"])

The same object does three jobs, so they can never drift apart:
  render(messages)  -> the whole conversation as text (what the model sees);
  split(messages)   -> (prompt, answer) text pairs for loss masking. An answer is the assistant slot from
                       "{content}" to its end, so the end-of-turn marker is inside the answer and is trained;
                       everything before "{content}" (the assistant header) belongs to the prompt;
  to_jinja()        -> an equivalent Jinja chat_template in plain Jinja2. The toolkit writes it into the tokenizer
                       of every saved model, so inference, the API, vLLM, llama.cpp and any other engine render
                       exactly what training saw. to_jinja(mark_answers=True) adds transformers' own
                       {% generation %} blocks around each answer, for `return_assistant_tokens_mask=True`;
                       other engines cannot parse that tag, so it is never saved with a model.

Special tokens. Slots may contain "{bos}" and "{eos}": the tokenizer's bos/eos text. Families whose turn ends
with the tokenizer's eos (llama2, mistral, vicuna, alpaca, baichuan2, ...) write "{eos}", never a literal
"</s>", so they work with any tokenizer. render/split take `bos_token=`/`eos_token=` (the toolkit passes the
tokenizer's, "" when it has none); left out, they default to the family's own text (`Template.bos_token`,
`Template.eos_token`, e.g. "<s>" and "</s>"). The Jinja export reads transformers' `bos_token`/`eos_token`
variables ("" when missing) the same way. stop_words may hold "{eos}" too; resolve it the same way.

Messages are {"role": "system" | "user" | "assistant" | "tool", "content": str}; a system message may only
come first; without one, `default_system` is used when non-empty. "tool" is a tool/function result; the
function call itself is an assistant message whose content is the call text. A template without a tool
slot renders tool results as user turns.

`--template_name auto` (use the model's own chat_template) is not a template: medgpt.chat.ChatFormat
handles it, and get_template("auto") says so.

To add your own template, copy the `medical_inquiry` registration at the bottom of this file.
"""

import json
import re
from dataclasses import dataclass, field

CONTENT = "{content}"
_SPECIAL = re.compile(r"(\{bos\}|\{eos\})")


@dataclass
class Template:
    """A prompt format. Slots are strings with one "{content}"; they may use "{bos}" and "{eos}".

    prefix:         text at the very start of every conversation (e.g. "{bos}").
    merge_system:   the family has no system turn of its own (gemma, llama2, mistral): the system slot is
                    put in front of the first user message's content, inside that user turn.
    strip_content:  strip whitespace around every message, as the family's own template does (llama3, gemma).
    thought:        reasoning block of a thinking model, e.g. "<think>\\n{content}\\n</think>\\n\\n" (qwen3);
                    enables the `enable_thinking` keyword and Qwen3's history rule, see `_assistant_turn`.
    bos_token, eos_token: the family's own text for "{bos}"/"{eos}" when the caller gives none.
    """

    name: str
    user: str
    assistant: str
    system: str = CONTENT
    tool: str = ""  # "" renders tool results with the user slot
    prefix: str = ""
    default_system: str = ""
    stop_words: list[str] = field(default_factory=list)
    merge_system: bool = False
    strip_content: bool = False
    thought: str = ""
    bos_token: str = ""
    eos_token: str = "</s>"

    def __post_init__(self):
        slots = ["user", "assistant", "system"] + ["tool"] * bool(self.tool) + ["thought"] * bool(self.thought)
        for slot in slots:
            if getattr(self, slot).count(CONTENT) != 1:
                raise ValueError(f"template {self.name!r}: the {slot} slot must contain {CONTENT} exactly once")
        if CONTENT in self.prefix:
            raise ValueError(f"template {self.name!r}: the prefix cannot contain {CONTENT}")
        # The end-of-turn marker must be part of the answer, or the model never learns to stop.
        answer_end = self.assistant.split(CONTENT)[1]
        if not any(word and word in answer_end for word in self.stop_words):
            raise ValueError(
                f"template {self.name!r}: no stop word appears after {CONTENT} in the assistant slot "
                f"{self.assistant!r}; list the end-of-turn marker in stop_words"
            )

    # ----- Python rendering -----------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = False, *, enable_thinking: bool = True,
               bos_token: str | None = None, eos_token: str | None = None) -> str:
        """The conversation as text; with add_generation_prompt, followed by the assistant header."""
        pieces = self._pieces(messages, add_generation_prompt, enable_thinking, bos_token, eos_token)
        return "".join(text for text, _ in pieces)

    def split(self, messages: list[dict], *, enable_thinking: bool = True,
              bos_token: str | None = None, eos_token: str | None = None) -> list[tuple[str, str]]:
        """One (prompt, answer) pair per assistant message. A prompt holds everything since the previous
        answer; an answer is the assistant's content through its end-of-turn marker. For a conversation that
        ends with an assistant message, "".join(p + a for p, a in pairs) == render(messages); text after the
        last answer (a trailing user turn) belongs to no pair."""
        pairs, prompt = [], ""
        for text, is_answer in self._pieces(messages, False, enable_thinking, bos_token, eos_token):
            if is_answer:
                pairs.append((prompt, text))
                prompt = ""
            else:
                prompt += text
        return pairs

    @property
    def generation_prompt(self) -> str:
        """The assistant header that starts a reply (family's own bos/eos text; thinking on)."""
        return self._fill(self.assistant, None, None).split(CONTENT)[0]

    def _fill(self, slot: str, bos_token, eos_token) -> str:
        bos = self.bos_token if bos_token is None else bos_token
        eos = self.eos_token if eos_token is None else eos_token
        return slot.replace("{bos}", bos).replace("{eos}", eos)

    def _pieces(self, messages, add_generation_prompt, enable_thinking, bos_token, eos_token):
        """The rendered conversation as (text, is_answer) pieces: render joins them, split groups them."""
        fill = lambda slot: self._fill(slot, bos_token, eos_token)  # noqa: E731
        turn = lambda slot, content: content.join(fill(slot).split(CONTENT))  # noqa: E731
        clean = str.strip if self.strip_content else str

        messages = list(messages)
        if messages and messages[0]["role"] == "system":
            system, has_system = clean(messages.pop(0)["content"]), True
        else:
            system, has_system = clean(self.default_system), bool(self.default_system)
        pieces = [(fill(self.prefix), False)]
        system_pending = has_system and self.merge_system
        if has_system and not self.merge_system:
            pieces.append((turn(self.system, system), False))

        last_query = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        for index, message in enumerate(messages):
            role, content = message["role"], clean(message["content"])
            if role == "user":
                if system_pending:
                    content, system_pending = turn(self.system, system) + content, False
                pieces.append((turn(self.user, content), False))
            elif role == "tool":
                pieces.append((turn(self.tool or self.user, content), False))
            elif role == "assistant":
                header, answer = self._assistant_turn(content, index, len(messages), last_query, enable_thinking, fill)
                pieces += [(header, False), (answer, True)]
            else:
                raise ValueError(f"template {self.name!r}: unexpected {role!r} message at position {index + 1} "
                                 "(roles are user, assistant, tool; a system message may only come first)")
        if system_pending:
            raise ValueError(f"template {self.name!r} puts the system prompt into the first user turn; there is none")
        if add_generation_prompt:
            header = fill(self.assistant).split(CONTENT)[0]
            if self.thought and not enable_thinking:
                header += turn(self.thought, "")
            pieces.append((header, False))
        return pieces

    def _assistant_turn(self, content, index, count, last_query, enable_thinking, fill):
        """(header, answer) of one assistant message.

        Thinking templates follow Qwen3's official chat_template: reasoning is written in the content as
        "<think>...</think>answer". Turns before the last user message are rendered without their reasoning
        (history is kept short, as at inference). Turns after it keep their reasoning, and the final message
        always gets a thought block, an empty one when it has no reasoning. Where that block sits decides what
        is trained: with thinking on, it is part of the answer (the model learns to open and close its
        thoughts); with `enable_thinking=False` an empty block is part of the prompt, exactly as in the
        generation prompt for thinking off ("<think>\\n\\n</think>\\n\\n")."""
        header, end = fill(self.assistant).split(CONTENT)
        if not self.thought:
            return header, content + end
        open_tag, close_tag = (part.strip() for part in self.thought.split(CONTENT))
        reasoning = ""
        if close_tag in content:
            reasoning = content.split(close_tag)[0].rstrip("\n").split(open_tag)[-1].lstrip("\n")
            content = content.split(close_tag)[-1].lstrip("\n")
        if index > last_query and (index == count - 1 or reasoning):
            block = reasoning.strip("\n").join(fill(self.thought).split(CONTENT))
            content = content.lstrip("\n")
            if not reasoning and not enable_thinking:
                header += block
            else:
                content = block + content
        return header, content + end

    # ----- Jinja export ---------------------------------------------------------------------------------

    def to_jinja(self, mark_answers: bool = False) -> str:
        """An equivalent Jinja chat_template (plain Jinja2); with `mark_answers`, each answer is wrapped in
        transformers' {% generation %} block, which only transformers understands.

        apply_chat_template(messages, tokenize=False, add_generation_prompt=..., enable_thinking=...) gives
        exactly render(...) called with the tokenizer's bos_token/eos_token."""
        trim = " | trim" if self.strip_content else ""
        header, end = self.assistant.split(CONTENT)
        system_turn = _turn(self.system, "system")
        out = [
            f"{{#- chat template {self.name!r}, exported from template.py"
            f"{'; answers are in generation blocks' if mark_answers else ''} -#}}",
            "{%- set bos = bos_token if bos_token is defined and bos_token is not none else '' -%}",
            "{%- set eos = eos_token if eos_token is defined and eos_token is not none else '' -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            f"    {{%- set system = messages[0]['content']{trim} -%}}",
            "    {%- set has_system = true -%}",
            "    {%- set loop_messages = messages[1:] -%}",
            "{%- else -%}",
            f"    {{%- set system = {_literal(self.default_system)}{trim} -%}}",
            f"    {{%- set has_system = {str(bool(self.default_system)).lower()} -%}}",
            "    {%- set loop_messages = messages -%}",
            "{%- endif -%}",
            "{%- set ns = namespace(last_query=-1, system_pending=has_system) -%}",
        ]
        if self.thought:  # index of the last user message: Qwen3's history rule needs it
            out += ["{%- for message in loop_messages -%}",
                    "    {%- if message['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}",
                    "{%- endfor -%}"]
        if self.prefix:
            out.append(f"{{{{- {_expr(self.prefix)} -}}}}")
        if not self.merge_system:
            out.append(f"{{%- if has_system -%}}{{{{- {system_turn} -}}}}{{%- endif -%}}")
        out += ["{%- for message in loop_messages -%}",
                f"    {{%- set content = message['content']{trim} -%}}",
                "    {%- if message['role'] == 'user' -%}"]
        if self.merge_system:
            out += ["        {%- if ns.system_pending -%}",
                    f"            {{%- set content = {system_turn} ~ content -%}}",
                    "            {%- set ns.system_pending = false -%}",
                    "        {%- endif -%}"]
        out += [f"        {{{{- {_turn(self.user, 'content')} -}}}}",
                "    {%- elif message['role'] == 'tool' -%}",
                f"        {{{{- {_turn(self.tool or self.user, 'content')} -}}}}",
                "    {%- elif message['role'] == 'assistant' -%}"]
        if self.thought:  # the same steps as _assistant_turn
            open_tag, close_tag = (_literal(part.strip()) for part in self.thought.split(CONTENT))
            empty_block = _expr(self.thought.replace(CONTENT, ""))
            reasoning_block = _turn(self.thought, "reasoning.strip('\\n')")
            out += [
                "        {%- set think_prompt = '' -%}",
                "        {%- set reasoning = '' -%}",
                f"        {{%- if {close_tag} in content -%}}",
                f"            {{%- set reasoning = content.split({close_tag})[0].rstrip('\\n')"
                f".split({open_tag})[-1].lstrip('\\n') -%}}",
                f"            {{%- set content = content.split({close_tag})[-1].lstrip('\\n') -%}}",
                "        {%- endif -%}",
                "        {%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}",
                "            {%- set content = content.lstrip('\\n') -%}",
                "            {%- if not reasoning and enable_thinking is defined and not enable_thinking -%}",
                f"                {{%- set think_prompt = {empty_block} -%}}",
                "            {%- else -%}",
                f"                {{%- set content = {reasoning_block} ~ content -%}}",
                "            {%- endif -%}",
                "        {%- endif -%}",
            ]
        out += [
            f"        {{{{- {_expr(header)}{' ~ think_prompt' if self.thought else ''} -}}}}",
            (f"        {{%- generation -%}}{{{{- content ~ {_expr(end)} -}}}}{{%- endgeneration -%}}" if mark_answers
             else f"        {{{{- content ~ {_expr(end)} -}}}}"),
            "    {%- else -%}",
            "        {{- raise_exception('unexpected ' ~ message['role'] ~ ' message: roles are user, assistant, tool; "
            "a system message may only come first') -}}",
            "    {%- endif -%}",
            "{%- endfor -%}",
        ]
        if self.merge_system:
            out.append("{%- if ns.system_pending -%}{{- raise_exception('this template puts the system prompt into "
                       "the first user turn, but there is none') -}}{%- endif -%}")
        out += ["{%- if add_generation_prompt -%}", f"    {{{{- {_expr(header)} -}}}}"]
        if self.thought:
            out.append("    {%- if enable_thinking is defined and not enable_thinking -%}"
                       f"{{{{- {empty_block} -}}}}{{%- endif -%}}")
        out.append("{%- endif -%}")
        return "\n".join(out)


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
    return " ~ ".join([_expr(before)] * bool(before) + [variable] + [_expr(after)] * bool(after))


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


# Generic ChatML (SmolLM2, OpenHermes, ...). SmolLM2's own template adds a default system prompt; ours has none.
_chatml("chatml")
# Qwen2/2.5: ChatML with Qwen's default system prompt; tool results go in a user turn, as Qwen's template does
# (Qwen merges consecutive tool results into one user turn; here each result is its own turn).
_QWEN_TOOL = "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
_chatml("qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", tool=_QWEN_TOOL)
# Qwen3: no default system; thinking on/off (see Template._assistant_turn).
_chatml("qwen3", tool=_QWEN_TOOL, thought="<think>\n{content}\n</think>\n\n")
# Yi chat models use plain ChatML.
_chatml("yi", eos_token="<|endoftext|>")

register_template(
    "llama3",
    prefix="{bos}",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
    tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",  # Llama 3.1's tool role
    stop_words=["<|eot_id|>"],
    strip_content=True,
    bos_token="<|begin_of_text|>",
    eos_token="<|end_of_text|>",
)
# Llama 2 chat: bos opens every [INST]; the system prompt sits inside the first one.
register_template(
    "llama2",
    system="<<SYS>>\n{content}\n<</SYS>>\n\n",
    user="{bos}[INST] {content} [/INST]",
    assistant=" {content} {eos}",
    stop_words=["{eos}"],
    merge_system=True,
    strip_content=True,
    bos_token="<s>",
)
# Mistral Instruct v0.1/v0.2; its template has no system prompt, so ours puts it before the first user message.
register_template(
    "mistral",
    prefix="{bos}",
    system="{content}\n\n",
    user="[INST] {content} [/INST]",
    assistant="{content}{eos}",
    stop_words=["{eos}"],
    merge_system=True,
    bos_token="<s>",
)
# Gemma 1-3: the system prompt opens the first user turn; the assistant role is called "model".
register_template(
    "gemma",
    prefix="{bos}",
    system="{content}\n\n",
    user="<start_of_turn>user\n{content}<end_of_turn>\n",
    assistant="<start_of_turn>model\n{content}<end_of_turn>\n",
    stop_words=["<end_of_turn>"],
    merge_system=True,
    strip_content=True,
    bos_token="<bos>",
    eos_token="<eos>",
)
register_template(
    "phi3",
    system="<|system|>\n{content}<|end|>\n",
    user="<|user|>\n{content}<|end|>\n",
    assistant="<|assistant|>\n{content}<|end|>\n",
    stop_words=["<|end|>"],
    eos_token="<|endoftext|>",
)
# DeepSeek-V3 (and R1's turn format): the system text follows bos bare; a turn ends with eos.
register_template(
    "deepseek",
    prefix="{bos}",
    user="<｜User｜>{content}",
    assistant="<｜Assistant｜>{content}{eos}",
    tool="<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{content}"
    "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>",
    stop_words=["{eos}"],
    bos_token="<｜begin▁of▁sentence｜>",
    eos_token="<｜end▁of▁sentence｜>",
)
# Baichuan2: reserved tokens 106/107 mark user and assistant.
register_template(
    "baichuan2",
    user="<reserved_106>{content}",
    assistant="<reserved_107>{content}{eos}",
    stop_words=["{eos}"],
)
# ChatGLM3 marks turns only by the next role token; eos ends each answer so that it can be learned.
register_template(
    "chatglm3",
    prefix="[gMASK]sop",
    system="<|system|>\n {content}",
    user="<|user|>\n {content}",
    assistant="<|assistant|>\n {content}{eos}",
    tool="<|observation|>\n {content}",
    stop_words=["{eos}", "<|user|>", "<|observation|>"],
)
# Vicuna v1.1 (FastChat).
register_template(
    "vicuna",
    default_system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    system="{content} ",
    user="USER: {content} ",
    assistant="ASSISTANT: {content}{eos}",
    stop_words=["{eos}"],
)
register_template(
    "alpaca",
    default_system="Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    system="{content}\n\n",
    user="### Instruction:\n{content}\n\n",
    assistant="### Response:\n{content}{eos}\n\n",
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
