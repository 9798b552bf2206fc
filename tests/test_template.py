"""template.py: exact strings per family, split == render, the Jinja export through transformers (text and
assistant masks), and agreement with the families' own chat templates."""

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from official_templates import official_templates, render_official, smollm2_chat_template  # noqa: F401 (fixtures)
from template import TEMPLATES, Template, get_template, register_template

Q1, A1, Q2, A2, SYS = "I have a headache.", "Since when?", "Two days.", "Rest and drink water.", "You are a doctor."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def tool(text):
    return {"role": "tool", "content": text}


SINGLE = [user(Q1), assistant(A1)]
WITH_SYSTEM = [system(SYS), user(Q1), assistant(A1)]
MULTI = [user(Q1), assistant(A1), user(Q2), assistant(A2)]
TOOL = [system(SYS), user("What is my BMI? 70 kg, 1.75 m."),
        assistant('<tool_call>\n{"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}\n</tool_call>'),
        tool('{"bmi": 22.9}'), assistant("Your BMI is 22.9, in the normal range.")]
REASONING = [user(Q1), assistant("<think>\nAsk about duration first.\n</think>\n\nSince when?"),
             user(Q2), assistant("<think>\nShort, no red flags.\n</think>\n\nRest and drink water.")]
CHINESE = [system("你是一名医生。"), user("我头痛三天了，还发烧。"), assistant("请问体温多少度？")]
PADDED = [system("  You are a doctor.\n"), user("\n I have a headache.  "), assistant(" Since when?\n"), user(Q2)]
CONVERSATIONS = {"single": SINGLE, "system": WITH_SYSTEM, "multi": MULTI, "tool": TOOL, "reasoning": REASONING,
                 "chinese": CHINESE}
# Conversations that end with the user: what a model is prompted with.
PROMPTS = {"user": [user(Q1)], "system_user": [system(SYS), user(Q1)], "multi_user": MULTI + [user("And now?")],
           "after_tool": TOOL[:4], "padded": PADDED, "padded_turns": [system(SYS)] + PADDED[1:]}

MEDICAL_SYSTEM = get_template("medical_inquiry").default_system
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions. ")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")

# Written by hand from each family's published format: (single turn, with system, two exchanges).
EXPECTED = {
    "chatml": (
        "<|im_start|>user\nI have a headache.<|im_end|>\n<|im_start|>assistant\nSince when?<|im_end|>\n",
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n"
        "<|im_start|>user\nI have a headache.<|im_end|>\n<|im_start|>assistant\nSince when?<|im_end|>\n",
        "<|im_start|>user\nI have a headache.<|im_end|>\n<|im_start|>assistant\nSince when?<|im_end|>\n"
        "<|im_start|>user\nTwo days.<|im_end|>\n<|im_start|>assistant\nRest and drink water.<|im_end|>\n",
    ),
    "qwen": (
        QWEN_SYSTEM + "<|im_start|>user\nI have a headache.<|im_end|>\n<|im_start|>assistant\nSince when?<|im_end|>\n",
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n"
        "<|im_start|>user\nI have a headache.<|im_end|>\n<|im_start|>assistant\nSince when?<|im_end|>\n",
        QWEN_SYSTEM + "<|im_start|>user\nI have a headache.<|im_end|>\n<|im_start|>assistant\nSince when?<|im_end|>\n"
        "<|im_start|>user\nTwo days.<|im_end|>\n<|im_start|>assistant\nRest and drink water.<|im_end|>\n",
    ),
    "qwen3": (  # the last answer carries a (here empty) thought block; earlier answers do not
        "<|im_start|>user\nI have a headache.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nSince when?<|im_end|>\n",
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a headache.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nSince when?<|im_end|>\n",
        "<|im_start|>user\nI have a headache.<|im_end|>\n<|im_start|>assistant\nSince when?<|im_end|>\n"
        "<|im_start|>user\nTwo days.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nRest and drink water.<|im_end|>\n",
    ),
    "yi": (
        "<|im_start|>user\nI have a headache.<|im_end|>\n<|im_start|>assistant\nSince when?<|im_end|>\n",
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n"
        "<|im_start|>user\nI have a headache.<|im_end|>\n<|im_start|>assistant\nSince when?<|im_end|>\n",
        "<|im_start|>user\nI have a headache.<|im_end|>\n<|im_start|>assistant\nSince when?<|im_end|>\n"
        "<|im_start|>user\nTwo days.<|im_end|>\n<|im_start|>assistant\nRest and drink water.<|im_end|>\n",
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nI have a headache.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nSince when?<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a doctor.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nI have a headache.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nSince when?<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nI have a headache.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nSince when?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTwo days.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRest and drink water.<|eot_id|>",
    ),
    "llama2": (
        "<s>[INST] I have a headache. [/INST] Since when? </s>",
        "<s>[INST] <<SYS>>\nYou are a doctor.\n<</SYS>>\n\nI have a headache. [/INST] Since when? </s>",
        "<s>[INST] I have a headache. [/INST] Since when? </s><s>[INST] Two days. [/INST] Rest and drink water. </s>",
    ),
    "mistral": (
        "<s>[INST] I have a headache. [/INST]Since when?</s>",
        "<s>[INST] You are a doctor.\n\nI have a headache. [/INST]Since when?</s>",
        "<s>[INST] I have a headache. [/INST]Since when?</s>[INST] Two days. [/INST]Rest and drink water.</s>",
    ),
    "gemma": (
        "<bos><start_of_turn>user\nI have a headache.<end_of_turn>\n<start_of_turn>model\nSince when?<end_of_turn>\n",
        "<bos><start_of_turn>user\nYou are a doctor.\n\nI have a headache.<end_of_turn>\n"
        "<start_of_turn>model\nSince when?<end_of_turn>\n",
        "<bos><start_of_turn>user\nI have a headache.<end_of_turn>\n<start_of_turn>model\nSince when?<end_of_turn>\n"
        "<start_of_turn>user\nTwo days.<end_of_turn>\n<start_of_turn>model\nRest and drink water.<end_of_turn>\n",
    ),
    "phi3": (
        "<|user|>\nI have a headache.<|end|>\n<|assistant|>\nSince when?<|end|>\n",
        "<|system|>\nYou are a doctor.<|end|>\n"
        "<|user|>\nI have a headache.<|end|>\n<|assistant|>\nSince when?<|end|>\n",
        "<|user|>\nI have a headache.<|end|>\n<|assistant|>\nSince when?<|end|>\n"
        "<|user|>\nTwo days.<|end|>\n<|assistant|>\nRest and drink water.<|end|>\n",
    ),
    "deepseek": (
        "<｜begin▁of▁sentence｜><｜User｜>I have a headache.<｜Assistant｜>Since when?<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>You are a doctor.<｜User｜>I have a headache.<｜Assistant｜>Since when?<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜><｜User｜>I have a headache.<｜Assistant｜>Since when?<｜end▁of▁sentence｜>"
        "<｜User｜>Two days.<｜Assistant｜>Rest and drink water.<｜end▁of▁sentence｜>",
    ),
    "baichuan2": (
        "<reserved_106>I have a headache.<reserved_107>Since when?</s>",
        "You are a doctor.<reserved_106>I have a headache.<reserved_107>Since when?</s>",
        "<reserved_106>I have a headache.<reserved_107>Since when?</s>"
        "<reserved_106>Two days.<reserved_107>Rest and drink water.</s>",
    ),
    "chatglm3": (
        "[gMASK]sop<|user|>\n I have a headache.<|assistant|>\n Since when?</s>",
        "[gMASK]sop<|system|>\n You are a doctor.<|user|>\n I have a headache.<|assistant|>\n Since when?</s>",
        "[gMASK]sop<|user|>\n I have a headache.<|assistant|>\n Since when?</s>"
        "<|user|>\n Two days.<|assistant|>\n Rest and drink water.</s>",
    ),
    "vicuna": (
        VICUNA_SYSTEM + "USER: I have a headache. ASSISTANT: Since when?</s>",
        "You are a doctor. USER: I have a headache. ASSISTANT: Since when?</s>",
        VICUNA_SYSTEM + "USER: I have a headache. ASSISTANT: Since when?</s>"
        "USER: Two days. ASSISTANT: Rest and drink water.</s>",
    ),
    "alpaca": (
        ALPACA_SYSTEM + "### Instruction:\nI have a headache.\n\n### Response:\nSince when?</s>\n\n",
        "You are a doctor.\n\n### Instruction:\nI have a headache.\n\n### Response:\nSince when?</s>\n\n",
        ALPACA_SYSTEM + "### Instruction:\nI have a headache.\n\n### Response:\nSince when?</s>\n\n"
        "### Instruction:\nTwo days.\n\n### Response:\nRest and drink water.</s>\n\n",
    ),
    "medical_inquiry": (
        MEDICAL_SYSTEM + "\n\n### 患者 / Patient:\nI have a headache.\n\n### 医生 / Doctor:\nSince when?</s>\n\n",
        "You are a doctor.\n\n### 患者 / Patient:\nI have a headache.\n\n### 医生 / Doctor:\nSince when?</s>\n\n",
        MEDICAL_SYSTEM + "\n\n### 患者 / Patient:\nI have a headache.\n\n### 医生 / Doctor:\nSince when?</s>\n\n"
        "### 患者 / Patient:\nTwo days.\n\n### 医生 / Doctor:\nRest and drink water.</s>\n\n",
    ),
}


def test_every_template_has_hand_written_expectations():
    assert set(EXPECTED) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_matches_the_family_format(name):
    template = get_template(name)
    single, with_system, multi = EXPECTED[name]
    assert template.render(SINGLE) == single
    assert template.render(WITH_SYSTEM) == with_system
    assert template.render(MULTI) == multi


def resolved_stop_words(template, eos_token=None):
    eos = template.eos_token if eos_token is None else eos_token
    return [word.replace("{eos}", eos) for word in template.stop_words]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [True, False])
def test_split_joins_back_to_render_and_every_answer_ends_its_turn(name, conversation, thinking):
    template, messages = get_template(name), CONVERSATIONS[conversation]
    pairs = template.split(messages, enable_thinking=thinking)
    assert "".join(p + a for p, a in pairs) == template.render(messages, enable_thinking=thinking)
    assert len(pairs) == sum(m["role"] == "assistant" for m in messages)
    for (prompt, answer), message in zip(pairs, [m for m in messages if m["role"] == "assistant"]):
        assert any(word in answer for word in resolved_stop_words(template))
        final_text = message["content"].split("</think>")[-1].strip()
        assert final_text in answer and final_text not in prompt
    # Each prompt ends with an assistant header the model is prompted with (qwen3: with thinking on or off).
    headers = {template.render([], True, enable_thinking=on)[len(template.render([])):] for on in (True, False)}
    assert all(any(prompt.endswith(header) for header in headers) for prompt, _ in pairs)


def test_split_and_render_use_the_tokenizers_special_tokens():
    medical = get_template("medical_inquiry")
    pairs = medical.split(SINGLE, eos_token="<|endoftext|>")
    assert pairs[-1][1] == "Since when?<|endoftext|>\n\n"
    assert "</s>" not in medical.render(SINGLE, eos_token="<|endoftext|>")
    llama3 = get_template("llama3")
    assert llama3.render(SINGLE, bos_token="").startswith("<|start_header_id|>user")
    assert get_template("llama2").render(MULTI, bos_token="<B>", eos_token="<E>").count("<B>[INST]") == 2


def test_qwen3_thinking_switch_moves_the_empty_thought_into_the_prompt():
    qwen3 = get_template("qwen3")
    assert qwen3.render([user(Q1)], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    off = qwen3.render([user(Q1)], add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    (prompt_on, answer_on), = qwen3.split(SINGLE)
    (prompt_off, answer_off), = qwen3.split(SINGLE, enable_thinking=False)
    assert answer_on == "<think>\n\n</think>\n\nSince when?<|im_end|>\n"  # the model learns to think (briefly)
    assert prompt_on == qwen3.render([user(Q1)], add_generation_prompt=True)
    assert answer_off == "Since when?<|im_end|>\n" and prompt_off == off  # training matches inference
    # Real reasoning is always learned; history before the last user turn loses its reasoning.
    pairs = qwen3.split(REASONING, enable_thinking=False)
    assert pairs[0][1] == "Since when?<|im_end|>\n"
    assert pairs[1][1] == "<think>\nShort, no red flags.\n</think>\n\nRest and drink water.<|im_end|>\n"


def test_generation_prompt_is_the_assistant_header():
    assert get_template("chatml").generation_prompt == "<|im_start|>assistant\n"
    assert get_template("llama3").generation_prompt == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert get_template("gemma").generation_prompt == "<start_of_turn>model\n"
    assert get_template("qwen").generation_prompt == "<|im_start|>assistant\n"


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
    with pytest.raises(ValueError, match="unexpected 'system' message"):
        get_template("chatml").render([user(Q1), system(SYS)])
    with pytest.raises(ValueError, match="first user turn"):
        get_template("gemma").render([system(SYS), assistant(A1)])
    try:
        mine = register_template("test_mine", user="Q: {content}\n", assistant="A: {content}{eos}\n",
                                 stop_words=["{eos}"])
        assert get_template("test_mine") is mine
        assert mine.render(SINGLE, eos_token="<end>") == "Q: I have a headache.\nA: Since when?<end>\n"
    finally:
        TEMPLATES.pop("test_mine", None)


# ----- the Jinja export, rendered by transformers -------------------------------------------------------------

SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "<bos>", "<eos>", "<start_of_turn>",
    "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|observation|>", "[gMASK]",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<reserved_106>", "<reserved_107>",
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


JINJA_CASES = [(name, conversation, thinking) for name in sorted(TEMPLATES)
               for conversation in sorted(CONVERSATIONS) + sorted(PROMPTS)
               for thinking in ([True, False, None] if TEMPLATES[name].thought else [None])]


@pytest.mark.parametrize("name,conversation,thinking", JINJA_CASES)
def test_jinja_export_renders_like_python_and_masks_exactly_the_answers(name, conversation, thinking):
    template = get_template(name)
    tokenizer = tiny_tokenizer(template.bos_token, template.eos_token)
    messages = CONVERSATIONS.get(conversation) or PROMPTS[conversation]
    extra = {} if thinking is None else {"enable_thinking": thinking}
    python_extra = {"enable_thinking": thinking is not False}
    special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    # The template saved with models is plain Jinja2: any engine reads it, and it renders what training saw.
    plain = jinja2.Environment().from_string(template.to_jinja())
    assert "generation" not in template.to_jinja().replace("add_generation_prompt", "")
    for add_generation_prompt in (False, True):
        expected = template.render(messages, add_generation_prompt, **python_extra, **special)
        assert plain.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra, **special) == expected
        for marked in (False, True):
            tokenizer.chat_template = template.to_jinja(mark_answers=marked)
            assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 **extra) == expected
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        **extra)  # with the marked template set last above
    assert tokenizer.decode(out["input_ids"], clean_up_tokenization_spaces=False) == template.render(
        messages, **python_extra, **special)
    answers = [answer for _, answer in template.split(messages, **python_extra, **special)]
    assert masked_runs(out["input_ids"], out["assistant_masks"], tokenizer) == answers
    # The end-of-turn token itself is learned, once per answer.
    stop_ids = {tokenizer.convert_tokens_to_ids(w) for w in resolved_stop_words(template, tokenizer.eos_token)}
    trained_stops = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m and t in stop_ids]
    assert len(trained_stops) == len(answers)


@pytest.mark.parametrize("bos_token,eos_token", [(None, "<|im_end|>"), ("<s>", "<|endoftext|>")])
def test_jinja_export_takes_bos_and_eos_from_any_tokenizer(bos_token, eos_token):
    for name in ("medical_inquiry", "llama2", "deepseek"):
        template = get_template(name)
        tokenizer = tiny_tokenizer(bos_token, eos_token)
        tokenizer.chat_template = template.to_jinja()
        rendered = tokenizer.apply_chat_template(MULTI, tokenize=False)
        assert rendered == template.render(MULTI, bos_token=bos_token or "", eos_token=eos_token)
        assert rendered.count(eos_token) == 2


# ----- the families' own templates ----------------------------------------------------------------------------

def official_cases(conversations, prompts):
    return [(c, False) for c in conversations] + [(p, g) for p in prompts for g in (False, True)]


def check_against_official(template, official, cases, **variables):
    special = {"bos_token": official["bos_token"] or "", "eos_token": official["eos_token"] or ""}
    python_variables = {"enable_thinking": variables["enable_thinking"]} if "enable_thinking" in variables else {}
    for conversation, add_generation_prompt in cases:
        messages = CONVERSATIONS.get(conversation) or PROMPTS[conversation]
        ours = template.render(messages, add_generation_prompt, **python_variables, **special)
        theirs = render_official(official["chat_template"], messages, add_generation_prompt, **special, **variables)
        assert ours == theirs, f"{template.name} differs from the official template on {conversation!r}"


def test_llama3_matches_metas_templates(official_templates):
    llama3 = get_template("llama3")
    # Llama 3.0's original template always ends with the assistant header, even without add_generation_prompt,
    # so it is compared only where we add the header too. The 3.1 package carries the corrected template (no
    # "Cutting Knowledge Date" system text in this version), compared in both modes. Tool turns are left out:
    # these templates print the role name "tool", ours uses Llama 3.1's "ipython" role.
    no_tools = ["single", "system", "multi", "chinese"]
    prompts = ["user", "system_user", "multi_user", "padded"]  # "padded": both strip whitespace around messages
    cases = [(c, True) for c in no_tools + prompts]
    check_against_official(llama3, official_templates["llama3"], cases)
    check_against_official(llama3, official_templates["llama3_1"], official_cases(no_tools, prompts))


@pytest.mark.parametrize("thinking", [True, False, None])
def test_qwen3_matches_qwens_template_with_thinking_on_and_off(official_templates, thinking):
    # Everything, including reasoning in history and a tool call and result (one result per turn: Qwen merges
    # consecutive results into one user turn, ours renders each as its own).
    cases = official_cases(["single", "system", "multi", "tool", "reasoning", "chinese"],
                           ["user", "system_user", "multi_user", "after_tool", "padded"])
    variables = {} if thinking is None else {"enable_thinking": thinking}
    check_against_official(get_template("qwen3"), official_templates["qwen3"], cases, **variables)


def test_gemma_matches_gemma3s_template(official_templates):
    # Gemma 3's template rejects anything but alternating user/model turns, so no tool turns. Both strip the
    # whitespace around messages ("padded_turns"), except that Gemma leaves the system text as it is and ours
    # strips it too: a padded system message ("padded") is the one case where they differ, left out.
    cases = official_cases(["single", "system", "multi", "chinese"],
                           ["user", "system_user", "multi_user", "padded_turns"])
    check_against_official(get_template("gemma"), official_templates["gemma3"], cases)


def test_deepseek_matches_deepseek_v3s_template(official_templates):
    # DeepSeek-V3 writes tool calls from structured `tool_calls`, which our text-only messages do not have;
    # tool turns are left out.
    cases = official_cases(["single", "system", "multi", "chinese"], ["user", "system_user", "multi_user", "padded"])
    check_against_official(get_template("deepseek"), official_templates["deepseek_v3"], cases)


def test_chatml_matches_smollm2s_template(smollm2_chat_template):
    official = {"chat_template": smollm2_chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    chatml = get_template("chatml")
    # With a system message the two are identical, tool turns included ("<|im_start|>tool").
    cases = official_cases(["system", "tool", "chinese"], ["system_user", "after_tool", "padded"])
    check_against_official(chatml, official, cases)
    # Without one, SmolLM2 adds its own default system prompt and generic ChatML adds none: the only difference.
    smol_system = system("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    for messages in (SINGLE, MULTI, [user(Q1)]):
        theirs = render_official(smollm2_chat_template, messages, add_generation_prompt=True)
        assert theirs == chatml.render([smol_system] + messages, add_generation_prompt=True)
        assert theirs != chatml.render(messages, add_generation_prompt=True)
