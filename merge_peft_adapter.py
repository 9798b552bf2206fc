"""Merge a LoRA adapter into its base model and save an ordinary model folder (safetensors + tokenizer
with the chat template the adapter was trained with).

    python merge_peft_adapter.py --base_model MODEL --lora_model outputs/sft --output_dir outputs/merged
"""

import logging
import os
from dataclasses import dataclass, field

import torch

from medgpt.arguments import parse_args, setup_logging
from medgpt.errors import InputError, exit_on_input_error
from medgpt.modeling import (adapter_base_model, check_adapter_path, check_model_path, hub_kwargs, load_adapter,
                             resolve_dtype, tokenizer_folder)
from medgpt.outputs import check_not_replacing, publish_model_folder, staging_folder

logger = logging.getLogger(__name__)


@dataclass
class MergeArguments:
    lora_model: str = field(default=None, metadata={"help": "Folder of the LoRA adapter (a stage's output_dir)."})
    output_dir: str = field(default=None, metadata={"help": "Where the merged model is written."})
    base_model: str | None = field(default=None, metadata={"help": "Defaults to the base named in adapter_config.json."})
    torch_dtype: str = field(default="auto", metadata={"help": "auto keeps the base model's stored dtype."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Write into a non-empty output_dir: its earlier model or adapter files are replaced, other files kept."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the model."})


def check_paths(args: MergeArguments) -> None:
    """Every input and the output location checked before minutes of loading and merging."""
    if not args.lora_model or not args.output_dir:
        raise InputError("--lora_model and --output_dir are required")
    check_adapter_path(args.lora_model, "--lora_model")
    args.base_model = args.base_model or adapter_base_model(args.lora_model)
    if not args.base_model:
        raise InputError("the adapter does not name its base model: pass --base_model", args.lora_model)
    check_model_path(args.base_model, "--base_model")
    # The base named by the adapter is known only here, so this check is not left to parse_args.
    check_not_replacing(args.output_dir, [("--lora_model", args.lora_model), ("--base_model", args.base_model)])
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        raise InputError("output folder is not empty: pass --overwrite True to replace its model files", args.output_dir)


@exit_on_input_error
def main(argv=None):
    (args,) = parse_args((MergeArguments,), argv)
    setup_logging()
    check_paths(args)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    load = hub_kwargs(args.base_model, trust_remote_code=args.trust_remote_code)
    config = AutoConfig.from_pretrained(args.base_model, **load)
    if args.torch_dtype == "auto":
        stored = getattr(config, "dtype", None)
        save_dtype = resolve_dtype(str(stored).removeprefix("torch.")) if stored else torch.float32
    else:
        save_dtype = resolve_dtype(args.torch_dtype)
    # Merge in fp32 so the low-rank update is added without rounding, then store in the chosen dtype.
    base = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32, **load)
    model = load_adapter(base, args.lora_model, "--lora_model").merge_and_unload()
    model = model.to(save_dtype)

    tokenizer_source = tokenizer_folder(args.base_model, args.lora_model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **hub_kwargs(tokenizer_source, trust_remote_code=args.trust_remote_code))
    # Written whole into a staging folder, then moved into place: an interrupted merge never mixes models.
    with staging_folder(args.output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        earlier = publish_model_folder(staging, args.output_dir)
    if earlier:
        logger.info("removed the earlier model files %s from %s", ", ".join(earlier), args.output_dir)
    logger.info("merged %s + %s (%s) into %s", args.base_model, args.lora_model, save_dtype, os.path.abspath(args.output_dir))


if __name__ == "__main__":
    main()
