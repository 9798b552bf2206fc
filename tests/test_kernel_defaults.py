"""GPU kernels by default: flash attention with padding-free SFT packing where flash-attn can run on the GPU,
Liger's layer kernels where liger-kernel is installed there; padded length-grouped batches elsewhere."""

from types import SimpleNamespace

import pytest
import torch
from trl import SFTConfig

from medgpt import arguments
from medgpt.arguments import ModelArguments
from medgpt.errors import InputError


def parsed_sft(*flags):
    return arguments.parse_args((ModelArguments, SFTConfig), ["--output_dir", "unused", "--report_to", "none", *flags])


def resolved(use_cpu=False, torch_dtype="auto", **given):
    """What parse_args makes of a run's kernel options on this (pretended) machine: the model's and the
    trainer's arguments, as the parser leaves them when a flag is not given (None)."""
    model = SimpleNamespace(attn_implementation=given.get("attn_implementation"), torch_dtype=torch_dtype)
    training = SimpleNamespace(use_cpu=use_cpu, packing=given.get("packing"), include_num_input_tokens_seen="no",
                               use_liger_kernel=given.get("use_liger_kernel"), liger_kernel_config=given.get("liger_config"))
    arguments.resolve_kernels([model, training])
    return model, training


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine with an Ampere-or-newer GPU, as the argument defaults see it; flash-attn and
    liger-kernel installed unless a test says otherwise."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(arguments, "flash_attn_usable", lambda: True)
    monkeypatch.setattr(arguments, "liger_usable", lambda: True)
    return monkeypatch


def test_without_a_gpu_sft_pads_length_grouped_batches_with_the_library_attention(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model_args, config = parsed_sft()
    assert model_args.attn_implementation is None
    assert config.packing is False and config.use_liger_kernel is False
    assert config.include_num_input_tokens_seen == "non_padding"
    assert arguments.describe_kernels(config) == (
        "no packing: length-grouped padded batches (--packing True to pack); Liger layer kernels off (default: no GPU)")
    with pytest.raises(InputError, match="--use_liger_kernel True needs a CUDA GPU"):
        parsed_sft("--use_liger_kernel", "True")
    # Asked for, packing happens on CPU too, and then every token counts (no padding, no attention mask).
    config = parsed_sft("--packing", "True")[1]
    assert config.packing is True and config.include_num_input_tokens_seen == "all"
    assert parsed_sft("--attn_implementation", "flash_attention_2")[1].packing is True


def test_a_gpu_with_flash_attn_and_liger_gets_them_by_default(gpu):
    model, training = resolved()
    assert model.attn_implementation == "flash_attention_2"
    assert training.packing is True and training.include_num_input_tokens_seen == "all"
    assert training.use_liger_kernel is True
    # Liger's fused cross-entropy would replace the forward that holds the fused LM head: always off.
    assert training.liger_kernel_config == {"fused_linear_cross_entropy": False}
    assert resolved(use_liger_kernel=True, liger_config={"fused_linear_cross_entropy": True, "rope": False})[1] \
        .liger_kernel_config == {"fused_linear_cross_entropy": False, "rope": False}
    assert arguments.describe_kernels(training) == (
        "padding-free packing; Liger layer kernels on (default: liger-kernel on a CUDA GPU)")


def test_the_user_overrides_every_kernel_default(gpu):
    assert resolved(packing=False)[1].packing is False
    model, training = resolved(attn_implementation="sdpa")
    assert model.attn_implementation == "sdpa" and training.packing is False  # sdpa: packing costs more
    training = resolved(use_liger_kernel=False)[1]
    assert training.use_liger_kernel is False
    assert arguments.describe_kernels(training).endswith(
        "Liger layer kernels off (asked for; the default here: liger-kernel on a CUDA GPU)")


def test_where_flash_attention_cannot_run_a_gpu_keeps_padded_batches(gpu):
    # --use_cpu sets the GPU aside: nothing GPU-only, and Liger asked for is an error
    model, training = resolved(use_cpu=True)
    assert model.attn_implementation is None and training.packing is False and training.use_liger_kernel is False
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        resolved(use_cpu=True, use_liger_kernel=True)
    # fp32 weights: flash attention takes bf16 or fp16 only
    assert arguments.default_attention(True, "float32") == (
        None, "--torch_dtype float32: flash attention needs bf16 or fp16 weights")
    assert resolved(torch_dtype="float32")[0].attn_implementation is None
    # a GPU older than Ampere (a T4, a V100)
    gpu.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert arguments.default_attention(True) == (None, "flash attention needs an Ampere or newer GPU")
    assert resolved()[1].packing is False
    # neither package installed
    gpu.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    gpu.setattr(arguments, "flash_attn_usable", lambda: False)
    gpu.setattr(arguments, "liger_usable", lambda: False)
    assert arguments.default_attention(True) == (None, "flash-attn is not installed")
    assert arguments.default_liger(True) == (False, "liger-kernel is not installed: bash scripts/setup_env.sh --gpu")
    with pytest.raises(InputError, match="needs liger-kernel: bash scripts/setup_env.sh --gpu"):
        resolved(use_liger_kernel=True)


@pytest.mark.parametrize("name, skips", [
    ("flash_attention_2", True), ("flash_attention_3", True), ("kernels-community/flash-attn2", True),
    ("sdpa", False), ("eager", False), (None, False),
])
def test_which_attention_kernels_skip_the_blocks_between_packed_samples(name, skips):
    assert arguments.skips_masked_blocks(name) is skips
