"""template.py: every template against its family's official chat template (a table of conversations), split
== render, the saved Jinja through plain Jinja2 and transformers (text and assistant masks), tool calls parsed
back out of the answers."""

import functools
import json
from types import SimpleNamespace

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from official_templates import official_renderers  # noqa: F401 (fixture)
from template import TEMPLATES, Template, get_template, register_template

Q1, A1, Q2, A2, SYS = "I have a headache.", "Since when?", "Two days.", "Rest and drink water.", "You are a doctor."


def user(text):
    return {"role": "user", "content": text}


def assistant(text, calls=None):
    message = {"role": "assistant", "content": text}
    if calls:  # (name, arguments, id); Mistral's format needs 9-character ids, the others ignore them
        message["tool_calls"] = [{"type": "function", "function": {"name": name, "arguments": arguments}, "id": id}
                                 for name, arguments, id in calls]
    return message


def system(text):
    return {"role": "system", "content": text}


def tool(text, call_id=None):
    return {"role": "tool", "content": text, **({"tool_call_id": call_id} if call_id else {})}


TOOLS = [
    {"type": "function", "function": {
        "name": "bmi", "description": "Body-mass index from weight and height.",
        "parameters": {"type": "object", "properties": {"kg": {"type": "number"}, "m": {"type": "number"}},
                       "required": ["kg", "m"]}}},
    {"type": "function", "function": {
        "name": "drug_lookup", "description": "药品说明书查询",
        "parameters": {"type": "object", "properties": {"name": {"type": "string", "description": "药品名"}},
                       "required": ["name"]}}},
]
BMI_CALL = ("bmi", {"kg": 70, "m": 1.75}, "call00001")
DRUG_CALL = ("drug_lookup", {"name": "布洛芬"}, "call00002")
BMI_QUESTION = "What is my BMI? 70 kg, 1.75 m."

# name -> (messages, tools). Rows ending with an answer are what training renders; rows ending with a user or
# tool turn are what a model is prompted with. Each row is rendered with and without the generation prompt.
ROWS = {
    "single": ([user(Q1), assistant(A1)], None),
    "system": ([system(SYS), user(Q1), assistant(A1)], None),
    "multi": ([user(Q1), assistant(A1), user(Q2), assistant(A2)], None),
    "multi_system": ([system(SYS), user(Q1), assistant(A1), user(Q2), assistant(A2)], None),
    "padded": ([system("  You are a doctor.\n"), user("\n I have a headache.  "), assistant(" Since when?\n"),
                user(" Two days. ")], None),
    "chinese": ([system("你是一名医生。"), user("我头痛三天了，还发烧。"), assistant("请问体温多少度？")], None),
    "prompt": ([user(Q1)], None),
    "prompt_system": ([system(SYS), user(Q1)], None),
    "prompt_multi": ([user(Q1), assistant(A1), user(Q2)], None),
    "tools_prompt": ([system(SYS), user(BMI_QUESTION)], TOOLS),
    "tool_call": ([user(BMI_QUESTION), assistant("", [BMI_CALL]), tool('{"bmi": 22.9}', "call00001"),
                   assistant("Your BMI is 22.9, in the normal range.")], TOOLS),
    "tool_results": ([system(SYS), user("BMI 70 kg 1.75 m, and is ibuprofen safe?"),
                      assistant("", [BMI_CALL, DRUG_CALL]), tool('{"bmi": 22.9}', "call00001"),
                      tool('{"布洛芬": "餐后服用"}', "call00002"),
                      assistant("BMI 22.9; take ibuprofen after meals.")], TOOLS),
    "after_results": ([user(BMI_QUESTION), assistant("", [BMI_CALL]), tool('{"bmi": 22.9}', "call00001")], TOOLS),
    "call_with_text": ([user(BMI_QUESTION), assistant("Let me compute that.", [BMI_CALL])], TOOLS),
    "reasoning": ([user(Q1), assistant("<think>\nAsk about duration first.\n</think>\n\nSince when?"), user(Q2),
                   assistant("<think>\nShort, no red flags.\n</think>\n\nRest and drink water.")], None),
}
TOOL_ROWS = {"tools_prompt", "tool_call", "tool_results", "after_results", "call_with_text"}
# Our name -> the official renderer it is compared with (tests/official_templates.py).
OFFICIAL = {
    "chatml": "smollm2", "qwen": "qwen2_5", "qwen3": "qwen3", "yi": "yi", "llama3": "llama3", "llama3.1": "llama3_1_tools",
    "llama2": "llama2", "mistral": "mistral_v1", "mistral_v3": "mistral_v3", "mistral_v7": "mistral_v7",
    "gemma": "gemma3", "phi3": "phi3", "phi4": "phi4", "deepseek": "deepseek_v3", "baichuan2": "baichuan2",
    "chatglm3": "chatglm3", "vicuna": "vicuna", "alpaca": "alpaca",
}
# (template, row) -> why ours renders differently from the official template there; README lists them.
# A row listed here must really differ (or the official template must refuse it), so the list stays true.
_ALPACA = ("Stanford Alpaca's prompt has one instruction and no system message; ours writes a system message in "
           "place of the default instruction line and repeats the instruction/response pair for later turns")
_CHATGLM3 = ("ChatGLM3's template writes no eos; ChatGLM3's own fine-tuning ends a conversation with eos, so ours does "
             "after the final answer (the model learns to stop)")
_SMOLLM2_SYSTEM = "SmolLM2's template adds its own default system prompt; generic ChatML adds none"
_SMOLLM2_TOOLS = "SmolLM2's template ignores tool definitions and calls; ours writes them as Qwen does (Hermes style)"
_DEEPSEEK_CLOSE = ("DeepSeek-V3's template never closes a single call (the block end and eos follow only a second "
                   "call); ours closes every call block, so the model learns to stop after calling")
_DEEPSEEK_TEXT = "DeepSeek-V3's template drops the calls of a message that also has text; ours writes the text, then the calls"
_MISTRAL_V3 = ("Mistral v3's template drops the system prompt unless the conversation ends with a user message; ours "
               "puts it in front of the last user message, before the final answer too, as serving will")
_MISTRAL_V7 = ("Mistral Small's template adds a default system prompt holding today's date; ours adds none, so the "
               "rendering does not change from day to day")
DEVIATIONS = {
    **{("alpaca", row): _ALPACA for row in ("chinese", "multi", "multi_system", "padded", "prompt_multi",
                                            "prompt_system", "system")},
    **{("chatglm3", row): _CHATGLM3 for row in ("chinese", "multi", "multi_system", "single", "system")},
    **{("chatml", row): _SMOLLM2_SYSTEM for row in ("multi", "prompt", "prompt_multi", "single")},
    **{("chatml", row): _SMOLLM2_TOOLS for row in TOOL_ROWS},
    ("deepseek", "tool_call"): _DEEPSEEK_CLOSE, ("deepseek", "after_results"): _DEEPSEEK_CLOSE,
    ("deepseek", "call_with_text"): _DEEPSEEK_TEXT,
    **{("mistral_v3", row): _MISTRAL_V3 for row in ("chinese", "multi_system", "system", "tool_results")},
    **{("mistral_v7", row): _MISTRAL_V7 for row in ("multi", "prompt", "prompt_multi", "single")},
}
# Templates whose official template writes no tool calls: ours refuse tools and calls with a clear error.
NO_TOOLS = {name for name, template in TEMPLATES.items() if template.tools is None}


def official_messages(name, messages):
    """The same conversation in the shape the official template expects: DeepSeek-V3's needs content None
    and JSON-text arguments on a call, Mistral's 9-character call ids."""
    if name != "deepseek":
        return messages
    adapted = []
    for message in messages:
        if message.get("tool_calls"):
            message = dict(message, content=message["content"] or None, tool_calls=[
                {"type": "function", "function": {"name": call["function"]["name"],
                                                  "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
                for call in message["tool_calls"]])
        adapted.append(message)
    return adapted


def table():
    for name in sorted(OFFICIAL):
        for row in sorted(ROWS):
            if row == "reasoning" and not TEMPLATES[name].thought:
                continue
            # A conversation that ends with an answer is what training renders: no generation prompt follows.
            ends_with_answer = ROWS[row][0][-1]["role"] == "assistant"
            for add_generation_prompt in (False,) if ends_with_answer else (False, True):
                # Thinking models: the default (thinking on), and enable_thinking=False.
                for thinking in (None, False) if TEMPLATES[name].thought else (None,):
                    yield name, row, add_generation_prompt, thinking


def test_every_template_is_compared_with_its_official_template_on_at_least_12_conversations():
    assert set(OFFICIAL) == set(TEMPLATES) - {"medical_inquiry"}  # medical_inquiry is ours alone
    per_family = {}
    for name, row, _, _ in table():
        per_family.setdefault(name, set()).add(row)
    assert min(len(rows) for rows in per_family.values()) >= 12


@pytest.mark.parametrize("name,row,add_generation_prompt,thinking", list(table()))
def test_renders_what_the_official_template_renders(official_renderers, name, row, add_generation_prompt, thinking):
    template, (messages, tools) = get_template(name), ROWS[row]
    official = official_renderers[OFFICIAL[name]]
    if thinking is not None:  # the same switch for both
        official = functools.partial(official, enable_thinking=thinking)
        template = SimpleNamespace(render=functools.partial(template.render, enable_thinking=thinking))
    if tools or any(m.get("tool_calls") for m in messages):
        if name in NO_TOOLS:
            with pytest.raises(ValueError, match="has no tool-call format"):
                template.render(messages, add_generation_prompt, tools=tools)
            return
    try:
        theirs = official(official_messages(name, messages), add_generation_prompt=add_generation_prompt, tools=tools)
    except Exception:  # the official template refuses the conversation
        if (name, row) in DEVIATIONS:  # ours renders it, as documented
            template.render(messages, add_generation_prompt, tools=tools)
        else:  # ours refuses it too
            with pytest.raises(ValueError):
                template.render(messages, add_generation_prompt, tools=tools)
        return
    ours = template.render(messages, add_generation_prompt, tools=tools)
    if (name, row) in DEVIATIONS and ours != theirs:
        return
    assert ours == theirs


# ----- split, the end of every answer ---------------------------------------------------------------------------

def resolved_stop_words(template, eos_token=None):
    eos = template.eos_token if eos_token is None else eos_token
    return [word.replace("{eos}", eos) for word in template.stop_words]


def renderable_rows(name):
    refused = TOOL_ROWS if name in NO_TOOLS else {"tool_results"} if name == "llama3.1" else set()  # one call at a time
    return [row for row in sorted(ROWS) if row not in refused]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("thinking", [True, False])
def test_split_joins_back_to_render_and_every_answer_ends_its_turn(name, thinking):
    template = get_template(name)
    for row in renderable_rows(name):
        messages, tools = ROWS[row]
        pairs = template.split(messages, tools=tools, enable_thinking=thinking)
        answers = [m for m in messages if m["role"] == "assistant"]
        assert len(pairs) == len(answers), row
        if messages[-1]["role"] == "assistant":
            assert "".join(p + a for p, a in pairs) == template.render(messages, tools=tools, enable_thinking=thinking)
        for index, ((prompt, answer), message) in enumerate(zip(pairs, answers)):
            # ChatGLM3 and Baichuan2 end a turn only by the next role marker; their conversations end with eos.
            if template.assistant.endswith("{content}") and index < len(pairs) - 1:
                assert any(word in pairs[index + 1][0] for word in resolved_stop_words(template)), (row, answer)
            elif messages[-1]["role"] == "assistant" or index < len(pairs) - 1:
                assert any(word in answer for word in resolved_stop_words(template)), (row, answer)
            final_text = message["content"].split("</think>")[-1].strip()
            if not (name in ("llama3.1", "mistral_v3") and message.get("tool_calls")):  # they write only the calls
                assert final_text in answer and (not final_text or final_text not in prompt)
            for call in message.get("tool_calls", []):
                assert call["function"]["name"] in answer  # the call is trained on


def test_split_and_render_use_the_tokenizers_special_tokens():
    single = ROWS["single"][0]
    medical = get_template("medical_inquiry")
    assert medical.split(single, eos_token="<|endoftext|>")[-1][1] == "Since when?<|endoftext|>\n\n"
    assert "</s>" not in medical.render(single, eos_token="<|endoftext|>")
    assert get_template("llama3").render(single, bos_token="").startswith("<|start_header_id|>user")
    multi = ROWS["multi"][0]
    assert get_template("llama2").render(multi, bos_token="<B>", eos_token="<E>").count("<B>[INST]") == 2


def test_answers_that_start_before_the_generation_prompt_ends_and_closing_text():
    # Llama 2 and Vicuna prompt without the space that starts the answer: the model writes it.
    (prompt, answer), = get_template("llama2").split(ROWS["single"][0])
    assert prompt.endswith("[/INST]") and answer == " Since when? </s>"
    (prompt, answer), = get_template("vicuna").split(ROWS["single"][0])
    assert prompt.endswith("ASSISTANT:") and answer == " Since when?</s>"
    # Phi-3 closes the conversation with eos: after the last answer it is trained, not before.
    pairs = get_template("phi3").split(ROWS["multi"][0])
    assert pairs[0][1] == "Since when?<|end|>\n" and pairs[1][1] == "Rest and drink water.<|end|>\n<|endoftext|>"


def test_qwen3_thinking_switch_moves_the_empty_thought_into_the_prompt():
    qwen3, single = get_template("qwen3"), ROWS["single"][0]
    assert qwen3.render([user(Q1)], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    off = qwen3.render([user(Q1)], add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    (prompt_on, answer_on), = qwen3.split(single)
    (prompt_off, answer_off), = qwen3.split(single, enable_thinking=False)
    assert answer_on == "<think>\n\n</think>\n\nSince when?<|im_end|>\n"  # the model learns to think (briefly)
    assert prompt_on == qwen3.render([user(Q1)], add_generation_prompt=True)
    assert answer_off == "Since when?<|im_end|>\n" and prompt_off == off  # training matches inference
    # Real reasoning is always learned; history before the last user turn loses its reasoning.
    pairs = qwen3.split(ROWS["reasoning"][0], enable_thinking=False)
    assert pairs[0][1] == "Since when?<|im_end|>\n"
    assert pairs[1][1] == "<think>\nShort, no red flags.\n</think>\n\nRest and drink water.<|im_end|>\n"


def test_generation_prompt_is_the_assistant_header():
    assert get_template("chatml").generation_prompt == "<|im_start|>assistant\n"
    assert get_template("llama3").generation_prompt == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert get_template("gemma").generation_prompt == "<start_of_turn>model\n"
    assert get_template("llama2").generation_prompt == ""


def test_content_as_text_parts_and_none():
    chatml = get_template("chatml")
    parts = [user([{"type": "text", "text": "I have "}, {"type": "text", "text": "a headache."}]), assistant(A1)]
    assert chatml.render(parts) == chatml.render(ROWS["single"][0])
    call = assistant(None, [BMI_CALL])
    assert chatml.render([user(Q1), call]) == chatml.render([user(Q1), assistant("", [BMI_CALL])])


def test_registry_errors_and_a_users_own_template():
    with pytest.raises(ValueError, match="unknown template 'nope'.*chatml"):
        get_template("nope")
    with pytest.raises(ValueError, match="model's own chat_template"):
        get_template("auto")
    with pytest.raises(ValueError, match="already registered"):
        register_template("chatml", user="{content}", assistant="{content}</s>", stop_words=["</s>"])
    with pytest.raises(ValueError, match="exactly once"):
        Template("bad", user="no placeholder", assistant="{content}</s>", stop_words=["</s>"])
    with pytest.raises(ValueError, match="no stop word"):
        Template("bad", user="{content}", assistant="{content}\n", stop_words=["</s>"])
    with pytest.raises(ValueError, match="system_placement"):
        Template("bad", user="{content}", assistant="{content}</s>", stop_words=["</s>"], system_placement="middle")
    with pytest.raises(ValueError, match="template 'chatml': unexpected system message at position 2"):
        get_template("chatml").render([user(Q1), system(SYS)])
    with pytest.raises(ValueError, match="system prompt into a user turn, but there is none"):
        get_template("gemma").render([system(SYS), assistant(A1)])
    with pytest.raises(ValueError, match="one tool call at a time, got 2"):
        get_template("llama3.1").render(ROWS["tool_results"][0], tools=TOOLS)
    try:
        mine = register_template("test_mine", user="Q: {content}\n", assistant="A: {content}{eos}\n",
                                 stop_words=["{eos}"])
        assert get_template("test_mine") is mine
        assert mine.render(ROWS["single"][0], eos_token="<end>") == "Q: I have a headache.\nA: Since when?<end>\n"
    finally:
        TEMPLATES.pop("test_mine", None)


# ----- tool calls read back out of generated answers ------------------------------------------------------------

TOOL_TEMPLATES = sorted(name for name, template in TEMPLATES.items() if template.tools is not None)


def without_end(template, answer, eos_token=None):
    """An answer as the model generates it: generation stops at (and drops) the end-of-turn marker."""
    cut = min((answer.find(w) for w in resolved_stop_words(template, eos_token) if w and w in answer), default=len(answer))
    return answer[:cut]


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_the_parser_recovers_every_call_from_the_rendered_answers(name):
    template = get_template(name)
    checked = 0
    for row in ("tool_call", "tool_results", "call_with_text"):
        messages, tools = ROWS[row]
        if name == "llama3.1" and row == "tool_results":
            continue  # one call per answer in Llama 3.1
        pairs = template.split(messages, tools=tools)
        for (_, answer), message in zip(pairs, [m for m in messages if m["role"] == "assistant"]):
            content, calls = template.parse_tool_calls(without_end(template, answer))
            expected = message.get("tool_calls", [])
            if name != "mistral_v3":  # only Mistral's format carries the calls' ids
                expected = [{key: value for key, value in call.items() if key != "id"} for call in expected]
            assert calls == expected, (row, answer)
            if calls and name not in ("llama3.1", "mistral_v3"):  # their formats write no text beside a call
                assert content.split("</think>")[-1].lstrip("\n") == message["content"]
            checked += len(calls)
    assert checked >= (2 if name == "llama3.1" else 4)
    if name == "mistral_v3":
        with pytest.raises(ValueError, match="9-character id on every tool call"):
            template.render([user(BMI_QUESTION), assistant("", [("bmi", {"kg": 70}, None)])], tools=TOOLS)
    # Text that only looks like a call stays text.
    assert template.parse_tool_calls("The tags <tool_call> and </tool_call> mark calls.")[1] == []
    assert template.parse_tool_calls("Your BMI is 22.9.") == ("Your BMI is 22.9.", [])


# ----- the Jinja export, rendered by plain Jinja2 and by transformers -------------------------------------------

SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|endoftext|>", "<think>", "</think>", "<|begin_of_text|>",
    "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<s>", "</s>",
    "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|observation|>", "[gMASK]", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<reserved_106>", "<reserved_107>", "<｜tool▁calls▁end｜>",
]


def tiny_tokenizer(bos_token, eos_token) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built here: one token per byte plus the templates' markers as special tokens.
    Without merges every character boundary is a token boundary, so the assistant mask can be compared
    with the answers' text exactly."""
    byte_vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos_token or None, eos_token=eos_token or None)


def masked_runs(input_ids, mask, tokenizer) -> list[str]:
    """The text of each stretch of tokens whose assistant mask is 1."""
    runs, current = [], []
    for token, flag in zip(input_ids + [None], mask + [0]):
        if flag:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current, clean_up_tokenization_spaces=False))
            current = []
    return runs


JINJA_CASES = [(name, row, thinking) for name in sorted(TEMPLATES) for row in renderable_rows(name)
               for thinking in ([True, False, None] if TEMPLATES[name].thought else [None])]


@pytest.mark.parametrize("name,row,thinking", JINJA_CASES)
def test_jinja_export_renders_like_training_and_masks_exactly_the_answers(name, row, thinking):
    template, (messages, tools) = get_template(name), ROWS[row]
    tokenizer = tiny_tokenizer(template.bos_token, template.eos_token)
    extra = {} if thinking is None else {"enable_thinking": thinking}
    python_extra = {"enable_thinking": thinking is not False, "tools": tools}
    special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    # The template saved with models is plain Jinja2: any engine reads it, and it renders what training saw.
    # (Plain Jinja2's own tojson sorts keys and escapes HTML characters, so tool definitions are compared
    # through transformers only.)
    saved = template.to_jinja()
    assert "generation" not in saved.replace("add_generation_prompt", "")
    plain = jinja2.Environment().from_string(saved)
    for add_generation_prompt in (False, True):
        expected = template.render(messages, add_generation_prompt, **python_extra, **special)
        if not tools:
            assert plain.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra,
                                **special) == expected
        for marked in (False, True):
            tokenizer.chat_template = template.to_jinja(mark_answers=marked)
            assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, **extra) == expected
    if messages[-1]["role"] != "assistant":
        return
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, **extra)  # the marked template
    assert tokenizer.decode(out["input_ids"], clean_up_tokenization_spaces=False) == template.render(
        messages, **python_extra, **special)
    answers = [answer for _, answer in template.split(messages, **python_extra, **special)]
    assert "".join(masked_runs(out["input_ids"], out["assistant_masks"], tokenizer)) == "".join(answers)
    # The end-of-turn token itself is learned: in every answer, or (ChatGLM3, Baichuan2) as the final eos.
    stop_ids = {tokenizer.convert_tokens_to_ids(w) for w in resolved_stop_words(template, tokenizer.eos_token)}
    trained_stops = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m and t in stop_ids]
    assert len(trained_stops) >= (1 if template.assistant.endswith("{content}") else len(answers))


@pytest.mark.parametrize("bos_token,eos_token", [(None, "<|im_end|>"), ("<s>", "<|endoftext|>")])
def test_jinja_export_takes_bos_and_eos_from_any_tokenizer(bos_token, eos_token):
    multi = ROWS["multi"][0]
    for name in ("medical_inquiry", "llama2", "deepseek"):
        template = get_template(name)
        tokenizer = tiny_tokenizer(bos_token, eos_token)
        tokenizer.chat_template = template.to_jinja()
        rendered = tokenizer.apply_chat_template(multi, tokenize=False)
        assert rendered == template.render(multi, bos_token=bos_token or "", eos_token=eos_token)
        assert rendered.count(eos_token) == 2
