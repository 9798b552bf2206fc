"""Command-line and config-file arguments shared by every stage script.

A script declares its dataclasses and calls `parse_args`. The first argument may be a YAML or JSON config
file; flags given after it override the file. Unknown flags and unknown config keys are errors.
"""

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field, fields

import torch
import yaml
from transformers import HfArgumentParser

from medgpt.allocator import describe_allocator
from medgpt.errors import InputError
from medgpt.outputs import (
    check_apart_from_inputs, check_earlier_run, check_inputs_outside_checkpoints, check_not_replacing, check_output_dir,
    resolve_checkpoint,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model: a local folder or a hub id (hub ids need network)."}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to the model's folder."})
    template_name: str = field(
        default="auto",
        metadata={"help": "Conversation template from template.py, or 'auto' for the model's own chat_template."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the model (off by default)."})
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU), float32, bfloat16, float16."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa or flash_attention_2; default: flash_attention_2 where flash-attn "
                                "is installed and a CUDA GPU runs it, else the library's choice (sdpa)."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load base weights in 4 bit (bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load base weights in 8 bit (bitsandbytes)."})
    qlora: bool = field(default=False, metadata={"help": "QLoRA: 4-bit NF4 base with double quantization + LoRA."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached."})

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise InputError("--load_in_4bit and --load_in_8bit exclude each other")
        if self.qlora:
            self.load_in_4bit = True


@dataclass
class LoraArguments:
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    target_modules: str = field(
        default="all", metadata={"help": "'all' for every linear layer, or a comma list such as q_proj,v_proj."}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input (0 is faster on CPU)."})
    modules_to_save: str | None = field(
        default=None, metadata={"help": "Comma list of modules trained in full beside LoRA, e.g. embed_tokens,lm_head."}
    )
    peft_path: str | None = field(
        default=None, metadata={"help": "Continue training this adapter (e.g. the previous stage's output)."}
    )

    def __post_init__(self):
        if self.peft_path:
            from medgpt.modeling import check_adapter_path

            check_adapter_path(self.peft_path, "--peft_path")
        at_least(self, "lora_rank", 1)
        require(self.lora_alpha > 0, "lora_alpha", "must be positive", self.lora_alpha)
        require(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)", self.lora_dropout)


@dataclass
class DataArguments:
    train_file_dir: str | None = field(
        default=None, metadata={"help": "Folder (searched recursively) or file of .jsonl/.json/.txt training data."}
    )
    validation_file_dir: str | None = field(default=None, metadata={"help": "Folder or file of validation data."})
    validation_split_percentage: float = field(
        default=0.0,
        metadata={"help": "Without --validation_file_dir: hold out this percent of the training records."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many validation records."})
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Skip bad records (and report how many and why) instead of stopping."}
    )

    def __post_init__(self):
        require(0 <= self.validation_split_percentage < 100, "validation_split_percentage", "must be in [0, 100)",
                self.validation_split_percentage)


@dataclass
class PreferenceArguments:
    """Lengths for preference pairs (reward modeling, DPO, ORPO)."""

    max_length: int = field(default=1024, metadata={"help": "Longest prompt + response in tokens."})
    max_prompt_length: int = field(
        default=512, metadata={"help": "Over-long pairs keep at most this many prompt tokens (its end), then cut responses."}
    )

    def __post_init__(self):
        at_least(self, "max_length", 2)
        at_least(self, "max_prompt_length", 1)
        require(self.max_prompt_length < self.max_length, "max_prompt_length",
                f"must be smaller than --max_length ({self.max_length}) to leave room for the answers", self.max_prompt_length)


def cuda_bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


BF16_CPU_FLAGS = {"avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX"}


def cpu_bf16_units(cpuinfo: str | None = None) -> list[str]:
    """The CPU's native bf16 units (AVX-512 BF16, AMX) from /proc/cpuinfo's flags; none elsewhere."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                cpuinfo = handle.read()
        except OSError:
            cpuinfo = ""
    flags = set(cpuinfo.split())
    return [name for flag, name in BF16_CPU_FLAGS.items() if flag in flags]


def default_precision(cpuinfo: str | None = None) -> tuple[str, str]:
    """("bf16" | "fp16" | "fp32", why). GPUs: bf16 autocast where they support it, else fp16. CPUs: bf16
    autocast where they have AMX, whose tile units multiply bf16 several times faster than fp32; fp32 on
    the others. AVX-512 BF16 alone does not pay: on a 2-core Xeon with it and without AMX, bf16 matrix
    products ran at 150 against fp32's 215-290 GFLOP/s and SFT trained at 0.6x the fp32 speed."""
    if torch.cuda.is_available():
        return ("bf16", "the GPU supports bf16") if cuda_bf16_available() else ("fp16", "the GPU has no bf16")
    units = cpu_bf16_units(cpuinfo)
    if "AMX" in units:
        return "bf16", "a CPU with AMX"
    if units:
        return "fp32", (f"a CPU with {' and '.join(units)} but without AMX, where bf16 trains more slowly; "
                        "--bf16 True to try it")
    return "fp32", "a CPU without native bf16 (AMX)"


def describe_precision(training_args) -> str:
    """The precision a run trains in, and why, for the log line at its start."""
    default, reason = default_precision()
    chosen = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    shown = chosen + (" autocast" if chosen != "fp32" else "")
    if chosen != default:
        return f"{shown} (asked for; the default here is {default}: {reason})"
    off = {"bf16": "; --bf16 False for fp32", "fp16": "; --fp16 False for fp32"}.get(chosen, "")
    return f"{shown} (default: {reason}{off})"


def flash_attn_usable() -> bool:
    """flash-attn importable in a version transformers can use (not only present on disk)."""
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def liger_usable() -> bool:
    """liger-kernel in a version the Trainer accepts (its own check, which it raises on otherwise)."""
    from transformers.utils import is_liger_kernel_available

    return is_liger_kernel_available()


def default_attention(on_gpu: bool, torch_dtype: str = "auto") -> tuple[str | None, str]:
    """(attn_implementation, why): flash_attention_2 where flash-attn can run (an Ampere or newer GPU,
    half-precision weights), else None, the library's choice (sdpa)."""
    if not on_gpu:
        return None, "no GPU"
    if torch.cuda.get_device_capability()[0] < 8:
        return None, "flash attention needs an Ampere or newer GPU"
    if torch_dtype not in ("auto", "bfloat16", "float16"):
        return None, f"--torch_dtype {torch_dtype}: flash attention needs bf16 or fp16 weights"
    if not flash_attn_usable():
        return None, "flash-attn is not installed"
    return "flash_attention_2", "flash-attn on an Ampere or newer GPU"


def skips_masked_blocks(attn_implementation: str | None) -> bool:
    """Whether the attention kernel works on each packed sample apart (variable-length flash attention),
    so that padding-free packing costs no attention across samples. sdpa and eager build a block-diagonal
    mask over the whole packed row instead: on CPU packed SFT ran no faster than padded length-grouped
    batches and took more memory."""
    name = (attn_implementation or "").lower()
    return name.startswith("flash_attention") or "flash-attn" in name or "flash_attn" in name


def default_liger(on_gpu: bool) -> tuple[bool, str]:
    """(on, why): Liger's Triton layer kernels (RMSNorm, RoPE, SwiGLU) where liger-kernel is installed and a
    CUDA GPU runs them."""
    if not on_gpu:
        return False, "no GPU"
    if not liger_usable():
        return False, "liger-kernel is not installed: bash scripts/setup_env.sh --gpu"
    return True, "liger-kernel on a CUDA GPU"


def trains_on_gpu(parsed) -> bool:
    """A GPU is visible and --use_cpu did not set it aside."""
    return torch.cuda.is_available() and not any(getattr(args, "use_cpu", False) for args in parsed)


def hardware_defaults(parser: HfArgumentParser) -> dict:
    """Defaults that depend on the machine (the precision of default_precision) and the same for every
    stage: TensorBoard logs, token counts, no gradient checkpointing unless asked."""
    known = {action.dest for action in parser._actions}
    precision, _ = default_precision()
    defaults = {
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": not torch.cuda.is_available(),
        # TRL's configs turn gradient checkpointing on by default; left unset it resolves to off, and
        # either --gradient_checkpointing or --activation_checkpointing turns it on.
        "gradient_checkpointing": None,
        "report_to": ["tensorboard"],
        "ddp_find_unused_parameters": False,
        # Resolved after parsing (resolve_kernels), where --use_cpu and --torch_dtype are known.
        "packing": None,
        "use_liger_kernel": None,
    }
    return {key: value for key, value in defaults.items() if key in known}


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise InputError("config file not found", path)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise InputError(f"not UTF-8 text ({error.reason} at byte {error.start})", path) from None
    try:
        config = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise InputError(f"cannot parse config: {error.msg} at column {error.colno}", path, error.lineno) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        line = mark.line + 1 if mark is not None else None
        column = f" at column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"cannot parse config: {problem}{column}", path, line) from None
    if config is None:
        return {}, {}
    if not isinstance(config, dict):
        raise InputError("a config file must hold a mapping of option: value", path)
    return config, config_key_lines(text, path)


def config_key_lines(text: str, path: str) -> dict:
    """The line each top-level key of a config file stands on, for error messages."""
    if path.endswith(".json"):
        lines = {}
        for number, line in enumerate(text.splitlines(), start=1):
            for key in re.findall(r'"([^"]+)"\s*:', line):
                lines.setdefault(key, number)
        return lines
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def typed_config_value(action, value, path: str, line=None):
    """A config file's value checked and converted exactly as the same flag on the command line would be:
    `max_steps: 1.5` is an error here, not a crash after the model has loaded."""
    if value is None or action.type is None:
        return value
    takes_list = action.nargs in ("+", "*")
    kind = getattr(action.type, "__name__", "a valid value").replace("string_to_bool", "a boolean")
    numeric = action.type in (int, float)
    if isinstance(value, (list, tuple)) and takes_list:
        return [typed_config_value(action, item, path, line) for item in value]
    if isinstance(value, (list, tuple, dict)) or (isinstance(value, bool) and numeric):
        if numeric or kind == "a boolean":
            raise InputError(f"{action.dest}: expected {kind}, got {value!r}", path, line)
        return value  # text options such as report_to or lr_scheduler_kwargs also take lists and mappings
    if isinstance(value, bool) and action.type is str:
        return value  # e.g. resume_from_checkpoint: true
    if takes_list:
        return [typed_config_value(action, value, path, line)]  # one value for a list option
    try:
        converted = action.type(value if isinstance(value, bool) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise InputError(f"{action.dest}: expected {kind}, got {value!r}", path, line) from None
    if action.choices is not None and converted not in action.choices:
        # YAML reads an unquoted no/yes/off/on as a boolean, which no choice is.
        hint = " (YAML reads an unquoted no/yes as a boolean: quote it)" if isinstance(value, bool) else ""
        raise InputError(f"{action.dest}: {value!r} is not one of {', '.join(map(str, action.choices))}{hint}", path, line)
    return converted


class SharedFieldParser(HfArgumentParser):
    """An HfArgumentParser where a field declared by two dataclasses (e.g. `trust_remote_code` in ours and
    in TRL's configs) is one flag that sets both, instead of an argparse conflict."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        if any(action.dest == field.name for action in parser._actions):
            return
        HfArgumentParser._parse_dataclass_field(parser, field)

    def error(self, message):
        # One line instead of argparse's page-long usage dump; --help still prints every option.
        self.exit(2, f"error: {message} (see --help)\n")

    def parse_into_dataclasses(self, argv: list[str]):
        namespace = self.parse_args(argv)  # argparse: unknown flags -> usage + exit status 2
        outputs = []
        for dtype in self.dataclass_types:
            names = {f.name for f in fields(dtype) if f.init}
            outputs.append(dtype(**{k: v for k, v in vars(namespace).items() if k in names}))
        return outputs


@dataclass
class StartOverArguments:
    """Added to every training stage's flags (those with --resume_from_checkpoint) by parse_args and set on
    its training arguments: transformers 5 removed TrainingArguments.overwrite_output_dir."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an --output_dir that holds an earlier run's checkpoint-N folders, removing them when "
                "training starts. Without it such a run stops before any work and says how to resume."})


def parse_args(dataclass_types, argv: list[str] | None = None):
    """Parse `[config.yaml|config.json] [--flag value ...]` into the given dataclasses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    trains = any("resume_from_checkpoint" in dataclass_fields(dtype) for dtype in dataclass_types)
    parser = SharedFieldParser(tuple(dataclass_types) + ((StartOverArguments,) if trains else ()), allow_abbrev=False)
    parser.set_defaults(**hardware_defaults(parser))
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        config_path = argv.pop(0)
        config, lines = load_config_file(config_path)
        actions = {action.dest: action for action in parser._actions}
        for key in config:
            if key not in actions:
                raise InputError(f"unknown option '{key}'", config_path, lines.get(key))
        parser.set_defaults(**{
            key: typed_config_value(actions[key], value, config_path, lines.get(key)) for key, value in config.items()
        })
    try:
        parsed = parser.parse_into_dataclasses(argv)
    except InputError:
        raise
    except (ValueError, TypeError) as error:
        # Dataclass validation (e.g. TrainingArguments.__post_init__) rejects a combination of options.
        raise InputError(f"invalid options: {error}".splitlines()[0]) from None
    if trains:
        overwrite = parsed.pop().overwrite_output_dir
        for args in parsed:
            if hasattr(args, "resume_from_checkpoint"):
                args.overwrite_output_dir = overwrite
    check_outputs_apart_from_inputs(parsed)
    resolve_kernels(parsed)
    for args in parsed:
        check_common_ranges(args)
        if isinstance(getattr(args, "output_dir", None), str):
            check_output_dir(args.output_dir)
            if hasattr(args, "resume_from_checkpoint"):
                args.resume_from_checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
                check_earlier_run(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
                if args.overwrite_output_dir:
                    check_inputs_outside_checkpoints(args.output_dir, input_paths(parsed))
        # Count the tokens trained on (logged as num_input_tokens_seen); argparse cannot take this
        # string as a default for the field's bool-or-string type, hence here.
        if getattr(args, "include_num_input_tokens_seen", None) == "no":
            args.include_num_input_tokens_seen = "non_padding"
    return parsed


def resolve_kernels(parsed) -> None:
    """The GPU kernels a run uses unless its flags say otherwise: flash attention where it can run; SFT
    packs rows padding-free where the attention kernel skips the blocks between packed samples, and pads
    length-grouped batches elsewhere; Liger's layer kernels where installed. --use_liger_kernel True where
    Liger cannot run is a one-line error before any model loads."""
    on_gpu = trains_on_gpu(parsed)
    attention = None
    for args in parsed:
        if hasattr(args, "attn_implementation"):
            if args.attn_implementation is None:
                args.attn_implementation = default_attention(on_gpu, getattr(args, "torch_dtype", "auto"))[0]
            attention = args.attn_implementation
    for args in parsed:
        if hasattr(args, "packing"):
            if args.packing is None:
                args.packing = skips_masked_blocks(attention)
            if args.packing and getattr(args, "include_num_input_tokens_seen", None) in ("no", "non_padding"):
                # Padding-free batches have no attention mask and no padding: transformers would count the
                # tokens that equal the pad token (often the end-of-turn token) as padding.
                args.include_num_input_tokens_seen = "all"
        if hasattr(args, "use_liger_kernel"):
            if args.use_liger_kernel is None:
                args.use_liger_kernel = default_liger(on_gpu)[0]
            if args.use_liger_kernel:
                if not on_gpu:
                    raise InputError("--use_liger_kernel True needs a CUDA GPU (Liger's kernels are Triton GPU kernels)")
                if not liger_usable():
                    raise InputError("--use_liger_kernel True needs liger-kernel: bash scripts/setup_env.sh --gpu")
                # Liger's fused linear cross-entropy would replace the forward that carries the toolkit's
                # fused LM head; its layer kernels are what there is to gain.
                args.liger_kernel_config = {**(args.liger_kernel_config or {}), "fused_linear_cross_entropy": False}


def describe_kernels(training_args) -> str:
    """Packing and Liger as a run uses them, for the log line at its start (the attention kernel is
    logged with the model)."""
    parts = []
    if hasattr(training_args, "packing"):
        parts.append("padding-free packing" if training_args.packing else
                     "no packing: length-grouped padded batches (--packing True to pack)")
    liger, why = default_liger(trains_on_gpu([training_args]))
    chosen = bool(getattr(training_args, "use_liger_kernel", False))
    parts.append(f"Liger layer kernels {'on' if chosen else 'off'} "
                 f"({'default: ' + why if chosen == liger else 'asked for; the default here: ' + why})")
    return "; ".join(parts)


# Folders a run reads from that its --output_dir must not be: writing the result there would replace them.
# (merge_peft_adapter.py checks its own inputs: its base model may come from the adapter's config.)
INPUT_FOLDERS = ("model_name_or_path", "tokenizer_name_or_path", "reward_model_path")
# Data folders, read recursively: --output_dir may not be inside them either.
DATA_FOLDERS = ("train_file_dir", "validation_file_dir")


def input_paths(parsed) -> list[tuple[str, str]]:
    """(--flag, path) of everything a run reads."""
    names = INPUT_FOLDERS + DATA_FOLDERS + ("peft_path",)
    return [(f"--{name}", getattr(args, name)) for args in parsed for name in names if getattr(args, name, None)]


def check_outputs_apart_from_inputs(parsed) -> None:
    values = {name: getattr(args, name) for args in parsed for name in INPUT_FOLDERS + DATA_FOLDERS + ("output_dir",) if hasattr(args, name)}
    check_not_replacing(values.get("output_dir"), [(f"--{name}", values.get(name)) for name in INPUT_FOLDERS])
    check_apart_from_inputs(values.get("output_dir"), [(f"--{name}", values.get(name)) for name in DATA_FOLDERS])


def require(condition: bool, flag: str, rule: str, value) -> None:
    """Range check for an option: `--lora_rank must be at least 1, got 0` (exit status 2)."""
    if not condition:
        raise InputError(f"--{flag} {rule}, got {value!r}")


def at_least(args, name: str, minimum) -> None:
    value = getattr(args, name)
    if value is not None:
        require(value >= minimum, name, f"must be at least {minimum}", value)


# Options of TrainingArguments (and the stages' own) whose range transformers checks late or not at all.
COMMON_MINIMUMS = {
    "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1,
    "learning_rate": 0, "logging_steps": 0, "save_steps": 0, "eval_steps": 0, "warmup_steps": 0,
    "max_train_samples": 1, "max_eval_samples": 1, "num_train_epochs": 0, "max_grad_norm": 0,
}


def check_common_ranges(args) -> None:
    for name, minimum in COMMON_MINIMUMS.items():
        if hasattr(args, name):
            at_least(args, name, minimum)
    if hasattr(args, "max_steps") and args.max_steps is not None:
        require(args.max_steps == -1 or args.max_steps > 0, "max_steps", "must be a positive number of steps or -1", args.max_steps)


def comma_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def setup_logging(training_args=None) -> None:
    main_process = training_args is None or training_args.process_index == 0
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if main_process else logging.WARNING,
        force=True,
    )
    # (bitsandbytes' logger is quieted in medgpt/__init__.py: it logs while being imported, before this runs.)
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    if training_args is not None and hasattr(training_args, "bf16"):
        logging.getLogger(__name__).info("precision: %s", describe_precision(training_args))
        logging.getLogger(__name__).info("memory allocator: %s", describe_allocator())
        logging.getLogger(__name__).info("kernels: %s", describe_kernels(training_args))


def dataclass_fields(cls) -> set[str]:
    return {f.name for f in fields(cls)}
