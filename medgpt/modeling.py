"""Loading tokenizers and models (dtype, device, quantization, LoRA) and saving them with their template."""

import json
import logging
import os
import shutil

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from medgpt.arguments import comma_list, cuda_bf16_available
from medgpt.errors import InputError
from medgpt.outputs import MODEL_WEIGHT_PATTERNS, has_weights, publish_model_folder, staging_path

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


def hub_downloads_allowed() -> bool:
    """The toolkit reads models from disk (or the local hub cache) unless downloads are asked for with
    HF_HUB_OFFLINE=0: a mistyped folder then fails at once instead of after half a minute of retries."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no", "off")


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _in_hub_cache(name: str, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache_dir), str)


def check_model_path(path: str | None, flag: str = "--model_name_or_path", needs_weights: bool = True,
                     cache_dir: str | None = None) -> str:
    """A folder holding a model (config and weights), or a hub id that is in the local hub cache or may be
    downloaded (HF_HUB_OFFLINE=0). Anything else is an error naming the path, before any work starts."""
    if not path:
        raise InputError(f"{flag} is required")
    if os.path.isdir(path):
        names = os.listdir(path)
        if "config.json" not in names:
            if "adapter_config.json" in names:
                raise InputError(f"this is a LoRA adapter folder, not a model: give its base model as {flag} "
                                 "and the adapter as --peft_path (training) or --lora_model (inference, merge)", path)
            if not needs_weights and ("tokenizer_config.json" in names or "tokenizer.json" in names):
                return path
            raise InputError(f"no config.json here: not a model folder ({flag})", path)
        if needs_weights and not has_weights(path, MODEL_WEIGHT_PATTERNS):
            raise InputError(f"no model weights (.safetensors or .bin files) in this folder ({flag})", path)
        return path
    if os.path.exists(path):
        raise InputError(f"{flag} must be a model folder, not a file", path)
    if _is_hub_id(path) and (_in_hub_cache(path, cache_dir) or hub_downloads_allowed()):
        return path
    hint = " (hub ids are downloaded only with HF_HUB_OFFLINE=0)" if _is_hub_id(path) else ""
    raise InputError(f"model folder not found{hint}", path)


def hub_kwargs(path: str, model_args=None, trust_remote_code: bool | None = None, cache_dir: str | None = None) -> dict:
    """from_pretrained arguments: a local folder or cached hub model is read from disk only, with no hub
    request, even to check for updates."""
    if model_args is not None:
        trust_remote_code, cache_dir = model_args.trust_remote_code, model_args.cache_dir
    kwargs = {"trust_remote_code": bool(trust_remote_code), "cache_dir": cache_dir}
    if os.path.isdir(path) or not hub_downloads_allowed():
        kwargs["local_files_only"] = True
    return kwargs


def open_tokenizer(path: str, padding_side: str = "right", **load):
    """The tokenizer at `path`, with a pad token (every stage, inference and the reward scorer set it alike)."""
    tokenizer = AutoTokenizer.from_pretrained(path, **load)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing token serves.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(model_args, padding_side: str = "right"):
    if model_args.tokenizer_name_or_path:
        path = check_model_path(model_args.tokenizer_name_or_path, "--tokenizer_name_or_path", needs_weights=False,
                                cache_dir=model_args.cache_dir)
    else:
        path = check_model_path(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    return open_tokenizer(path, padding_side, **hub_kwargs(path, model_args))


def bitsandbytes_config(load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype, double_quant: bool = False):
    """4-bit NF4 (compute in `dtype`) or 8-bit weights, or None."""
    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def quantization_config(model_args, dtype: torch.dtype):
    return bitsandbytes_config(model_args.load_in_4bit, model_args.load_in_8bit, dtype, double_quant=model_args.qlora)


def device_map():
    """Each torchrun process puts its copy of the model on its own GPU; CPU runs keep the default."""
    if not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def load_causal_lm(model_args, model_class=AutoModelForCausalLM, **extra):
    path = check_model_path(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
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
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    logger.info("loaded %s (%s, %.1fM parameters, attention: %s)", path, dtype, model.num_parameters() / 1e6, attention)
    return model


def attach_lora(model, lora_args, model_args, task_type: str = "CAUSAL_LM", gradient_checkpointing: bool = False):
    """Wrap the model in a trainable LoRA adapter: a new one, or `--peft_path` to continue an earlier stage."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if model_args.load_in_4bit or model_args.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    continue_adapter = False
    if lora_args.peft_path:  # an adapter folder: LoraArguments checked it when the options were parsed
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
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if lora_args.use_peft:
            model.enable_input_require_grads()
    if lora_args.use_peft:
        model = attach_lora(model, lora_args, model_args, task_type, training_args.gradient_checkpointing)
    return model


def save_model_and_tokenizer(trainer, tokenizer, output_dir: str) -> None:
    """Save weights (safetensors; the adapter alone for LoRA) and the tokenizer with its chat template.

    Everything is written into a staging folder first and then moved into `output_dir`, replacing the
    model or adapter files of an earlier run there (a stale adapter would otherwise shadow new full
    weights), so an interrupted save never leaves a mix of old and new files."""
    staging = staging_path(output_dir)
    main_process = trainer.args.process_index == 0
    if main_process:
        shutil.rmtree(staging, ignore_errors=True)  # what an interrupted save left
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)  # every process: sharded (DeepSpeed/FSDP) weights are gathered here
    trainer.accelerator.wait_for_everyone()  # every process has written before anything is moved
    if main_process:
        tokenizer.save_pretrained(staging)
        earlier = publish_model_folder(staging, output_dir)
        shutil.rmtree(staging, ignore_errors=True)
        if earlier:
            logger.info("replaced the earlier model files %s in %s", ", ".join(earlier), output_dir)
        logger.info("model and tokenizer saved to %s", os.path.abspath(output_dir))
    trainer.accelerator.wait_for_everyone()


def check_adapter_path(path: str, flag: str) -> str:
    if not os.path.isdir(path):
        raise InputError(f"adapter folder not found ({flag})", path)
    if not is_adapter_folder(path):
        hint = " (it holds a full model: pass it as the model instead)" if os.path.isfile(os.path.join(path, "config.json")) else ""
        raise InputError(f"no adapter_config.json here: not a LoRA adapter folder ({flag}){hint}", path)
    return path


def tokenizer_folder(base_model: str, lora_model: str | None) -> str:
    """Where the tokenizer comes from: a stage's output folder holds the tokenizer with the template it
    trained with, so an adapter's own tokenizer wins over its base model's."""
    if lora_model and os.path.isfile(os.path.join(lora_model, "tokenizer_config.json")):
        return lora_model
    return base_model


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def adapter_base_model(path: str) -> str | None:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as handle:
        return json.load(handle).get("base_model_name_or_path")


def load_adapter(model, path: str, flag: str, name: str = "default"):
    """`model` with the LoRA adapter at `path` (a PeftModel; a further adapter is added under `name`). An
    adapter trained on another base model is a one-line InputError, not a shape-mismatch traceback."""
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, path, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as error:
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise InputError(f"the adapter ({flag}) does not fit the base model: {detail}", path) from None
