"""GPU kernels by default: flash attention with padding-free SFT packing where flash-attn runs on a CUDA GPU,
Liger's layer kernels where liger-kernel is installed there; padded length-grouped batches elsewhere."""

import pytest
import torch
from trl import SFTConfig

from medgpt import arguments
from medgpt.arguments import ModelArguments
from medgpt.errors import InputError


def parsed_sft(*flags):
    model_args, config = arguments.parse_args((ModelArguments, SFTConfig),
                                              ["--output_dir", "unused", "--report_to", "none", *flags])
    return model_args, config


@pytest.fixture
def gpu_with_kernels(monkeypatch):
    """A CUDA machine (as the argument defaults see it) with flash-attn and liger-kernel installed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(arguments, "cuda_bf16_available", lambda: True)
    monkeypatch.setattr(arguments, "installed", lambda module: module in ("flash_attn", "liger_kernel"))


def test_without_a_gpu_sft_pads_length_grouped_batches_with_the_library_attention(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert arguments.default_attention() == (None, "no GPU")
    model_args, config = parsed_sft()
    assert model_args.attn_implementation is None
    assert config.packing is False and config.use_liger_kernel is False
    assert arguments.describe_kernels(config) == (
        "no packing: length-grouped padded batches (--packing True to pack); Liger layer kernels off (default: no GPU)")
    with pytest.raises(InputError, match="--use_liger_kernel True needs a CUDA GPU"):
        parsed_sft("--use_liger_kernel", "True")
    # Asked for, packing still happens on CPU; so does a flash kernel named by the user.
    assert parsed_sft("--packing", "True")[1].packing is True
    assert parsed_sft("--attn_implementation", "flash_attention_2")[1].packing is True


def test_a_gpu_with_flash_attn_and_liger_gets_them_by_default(gpu_with_kernels):
    assert arguments.default_attention() == ("flash_attention_2", "flash-attn on a CUDA GPU")
    model_args, config = parsed_sft("--use_cpu", "True", "--bf16", "False")  # the test itself runs on CPU
    assert model_args.attn_implementation == "flash_attention_2"
    assert config.packing is True
    assert config.use_liger_kernel is True
    # Liger's fused cross-entropy would replace the forward that holds the fused LM head.
    assert config.liger_kernel_config == {"fused_linear_cross_entropy": False}
    assert arguments.describe_kernels(config) == (
        "padding-free packing; Liger layer kernels on (default: liger-kernel on a CUDA GPU)")


def test_the_user_overrides_every_kernel_default(gpu_with_kernels):
    flags = ("--use_cpu", "True", "--bf16", "False")
    assert parsed_sft(*flags, "--packing", "False")[1].packing is False
    model_args, config = parsed_sft(*flags, "--attn_implementation", "sdpa")
    assert model_args.attn_implementation == "sdpa" and config.packing is False  # sdpa: packing costs more
    config = parsed_sft(*flags, "--use_liger_kernel", "False")[1]
    assert config.use_liger_kernel is False
    assert arguments.describe_kernels(config).endswith(
        "Liger layer kernels off (asked for; the default here: liger-kernel on a CUDA GPU)")


def test_without_flash_attn_a_gpu_keeps_padded_batches(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(arguments, "cuda_bf16_available", lambda: True)
    monkeypatch.setattr(arguments, "installed", lambda module: False)
    assert arguments.default_attention() == (None, "flash-attn is not installed")
    assert arguments.default_liger() == (False, "liger-kernel is not installed: bash scripts/setup_env.sh --gpu")
    with pytest.raises(InputError, match="needs liger-kernel: bash scripts/setup_env.sh --gpu"):
        parsed_sft("--use_cpu", "True", "--bf16", "False", "--use_liger_kernel", "True")
    model_args, config = parsed_sft("--use_cpu", "True", "--bf16", "False")
    assert model_args.attn_implementation is None and config.packing is False and config.use_liger_kernel is False


@pytest.mark.parametrize("name, skips", [
    ("flash_attention_2", True), ("flash_attention_3", True), ("kernels-community/flash-attn2", True),
    ("sdpa", False), ("eager", False), (None, False),
])
def test_which_attention_kernels_skip_the_blocks_between_packed_samples(name, skips):
    assert arguments.skips_masked_blocks(name) is skips
