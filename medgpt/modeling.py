"""Loading tokenizers and models (dtype, device, quantization, LoRA) and saving them with their template."""

import json
import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from medgpt.arguments import comma_list, cuda_bf16_available
from medgpt.errors import InputError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if cuda_bf16_available() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise InputError(f"--torch_dtype must be auto or one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]


def hub_kwargs(path: str, model_args) -> dict:
    """A local folder is read from disk only: no hub request, even to check for updates."""
    kwargs = {"trust_remote_code": model_args.trust_remote_code, "cache_dir": model_args.cache_dir}
    if os.path.isdir(path):
        kwargs["local_files_only"] = True
    return kwargs


def check_model_path(path: str | None) -> str:
    """A local folder, or something shaped like a hub id (`org/name`); anything else is a typo'd folder."""
    if not path:
        raise InputError("--model_name_or_path is required")
    if os.path.isdir(path):
        return path
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise InputError("model folder not found", path)
    return path


def load_tokenizer(model_args, padding_side: str = "right"):
    path = check_model_path(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs(path, model_args))
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing token serves.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def quantization_config(model_args, dtype: torch.dtype):
    if model_args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=model_args.qlora,
            bnb_4bit_compute_dtype=dtype,
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def device_map():
    """Each torchrun process puts its copy of the model on its own GPU; CPU runs keep the default."""
    if not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def load_causal_lm(model_args, model_class=AutoModelForCausalLM, **extra):
    path = check_model_path(model_args.model_name_or_path)
    dtype = resolve_dtype(model_args.torch_dtype)
    kwargs = dict(hub_kwargs(path, model_args), dtype=dtype, **extra)
    quant = quantization_config(model_args, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device_map() or {"": "cpu"}
    elif torch.cuda.is_available():
        kwargs["device_map"] = device_map()
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    model = model_class.from_pretrained(path, **kwargs)
    logger.info("loaded %s (%s, %.1fM parameters)", path, dtype, model.num_parameters() / 1e6)
    return model


def attach_lora(model, lora_args, model_args, task_type: str = "CAUSAL_LM", gradient_checkpointing: bool = False):
    """Wrap the model in a trainable LoRA adapter: a new one, or `--peft_path` to continue an earlier stage."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if model_args.load_in_4bit or model_args.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    continue_adapter = False
    if lora_args.peft_path:
        if not is_adapter_folder(lora_args.peft_path):
            raise InputError("no adapter_config.json here: not a LoRA adapter folder", lora_args.peft_path)
        with open(os.path.join(lora_args.peft_path, "adapter_config.json"), encoding="utf-8") as handle:
            continue_adapter = json.load(handle).get("task_type") == task_type
        if not continue_adapter:
            # e.g. a reward model (sequence classification) built on an SFT adapter (causal LM): the SFT
            # adapter becomes part of the base weights and a new adapter of the right kind is trained.
            model = PeftModel.from_pretrained(model, lora_args.peft_path).merge_and_unload()
            logger.info("merged the adapter from %s into the base weights", lora_args.peft_path)
    if continue_adapter:
        model = PeftModel.from_pretrained(model, lora_args.peft_path, is_trainable=True)
        logger.info("continuing LoRA adapter from %s", lora_args.peft_path)
    else:
        targets = lora_args.target_modules.strip()
        config = LoraConfig(
            task_type=task_type,
            r=lora_args.lora_rank,
            lora_alpha=lora_args.lora_alpha,
            lora_dropout=lora_args.lora_dropout,
            target_modules="all-linear" if targets == "all" else comma_list(targets),
            modules_to_save=comma_list(lora_args.modules_to_save),
        )
        model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %.2fM trainable of %.1fM parameters (%.2f%%)", trainable / 1e6, total / 1e6, 100 * trainable / total)
    return model


def prepare_model(model_args, lora_args, training_args, model_class=AutoModelForCausalLM, task_type="CAUSAL_LM", **extra):
    """Load the base model and, with --use_peft, wrap it in LoRA. Full fine-tuning of a quantized model is refused."""
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not lora_args.use_peft:
        raise InputError("quantized weights cannot be trained in full: add --use_peft True (QLoRA)")
    if lora_args.peft_path and not lora_args.use_peft:
        raise InputError("--peft_path continues a LoRA adapter: add --use_peft True")
    model = load_causal_lm(model_args, model_class, **extra)
    model.config.use_cache = False  # training: and packed rows need it off to stay isolated
    if training_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_args.use_peft:
            model.enable_input_require_grads()
    if lora_args.use_peft:
        model = attach_lora(model, lora_args, model_args, task_type, training_args.gradient_checkpointing)
    return model


def save_model_and_tokenizer(trainer, tokenizer, output_dir: str) -> None:
    """Save weights (safetensors; the adapter alone for LoRA) and the tokenizer with its chat template."""
    trainer.save_model(output_dir)
    if trainer.args.process_index == 0:
        tokenizer.save_pretrained(output_dir)
        logger.info("model and tokenizer saved to %s", os.path.abspath(output_dir))


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def adapter_base_model(path: str) -> str | None:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as handle:
        return json.load(handle).get("base_model_name_or_path")
