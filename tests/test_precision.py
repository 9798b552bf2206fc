"""Training precision by default: bf16 autocast on GPUs that have it and on CPUs with AMX, fp32 on other
CPUs (bf16 on request), the reason logged, and a bf16 loss curve that stays with fp32's."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, run_script, tiny_training_flags
from medgpt import arguments

WITH_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n"
WITH_AMX = "flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile amx_int8\n"
WITHOUT = "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


SLOWER = " but without AMX, where bf16 trains more slowly; --bf16 True to try it"


def test_cpus_train_in_bf16_with_amx_and_in_fp32_without(no_gpu):
    assert arguments.cpu_bf16_units(WITH_BF16) == ["AVX-512 BF16"]
    assert arguments.cpu_bf16_units(WITH_AMX) == ["AMX"]
    assert arguments.default_precision(WITH_AMX) == ("bf16", "a CPU with AMX")
    assert arguments.default_precision(WITH_BF16 + "amx_bf16\n") == ("bf16", "a CPU with AMX")
    assert arguments.default_precision(WITH_BF16) == ("fp32", "a CPU with AVX-512 BF16" + SLOWER)
    assert arguments.default_precision(WITHOUT) == ("fp32", "a CPU without native bf16 (AMX)")
    assert arguments.default_precision("") == ("fp32", "a CPU without native bf16 (AMX)")


def test_gpus_get_bf16_where_they_have_it_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert arguments.default_precision(WITHOUT) == ("bf16", "the GPU supports bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert arguments.default_precision(WITH_BF16) == ("fp16", "the GPU has no bf16")


def test_the_log_line_says_what_was_chosen_and_why(no_gpu, monkeypatch):
    monkeypatch.setattr(arguments, "cpu_bf16_units", lambda cpuinfo=None: ["AVX-512 BF16"])
    assert arguments.describe_precision(SimpleNamespace(bf16=False, fp16=False)) == (
        "fp32 (default: a CPU with AVX-512 BF16" + SLOWER + ")")
    assert arguments.describe_precision(SimpleNamespace(bf16=True, fp16=False)) == (
        "bf16 autocast (asked for; the default here is fp32: a CPU with AVX-512 BF16" + SLOWER + ")")
    monkeypatch.setattr(arguments, "cpu_bf16_units", lambda cpuinfo=None: ["AVX-512 BF16", "AMX"])
    assert arguments.describe_precision(SimpleNamespace(bf16=True, fp16=False)) == (
        "bf16 autocast (default: a CPU with AMX; --bf16 False for fp32)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert arguments.describe_precision(SimpleNamespace(bf16=True, fp16=False)) == (
        "bf16 autocast (default: the GPU supports bf16; --bf16 False for fp32)")


def test_the_scripts_default_follows_the_machine(monkeypatch):
    from trl import SFTConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(arguments, "cpu_bf16_units", lambda cpuinfo=None: ["AVX-512 BF16"])
    (config,) = arguments.parse_args((SFTConfig,), ["--output_dir", "unused", "--report_to", "none"])
    assert config.bf16 is False and config.fp16 is False
    monkeypatch.setattr(arguments, "cpu_bf16_units", lambda cpuinfo=None: ["AVX-512 BF16", "AMX"])
    (config,) = arguments.parse_args((SFTConfig,), ["--output_dir", "unused", "--report_to", "none"])
    assert config.bf16 is True and config.fp16 is False
    monkeypatch.setattr(arguments, "cpu_bf16_units", lambda cpuinfo=None: [])
    (config,) = arguments.parse_args((SFTConfig,), ["--output_dir", "unused", "--report_to", "none", "--bf16", "True"])
    assert config.bf16 is True


def losses(output_dir) -> list[float]:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        return [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]


def test_the_bf16_loss_curve_stays_within_two_percent_of_fp32(small_vocab_model_dir, tmp_path):
    curves = {}
    for precision in ("True", "False"):
        out = tmp_path / f"bf16-{precision}"
        result = run_script(
            "supervised_finetuning.py", "--model_name_or_path", small_vocab_model_dir, "--train_file_dir",
            os.path.join(REPO, "data", "finetune"), "--template_name", "chatml", "--use_peft", "True",
            "--model_max_length", "256", "--bf16", precision, "--seed", "7", *tiny_training_flags(out, steps=6),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        curves[precision] = losses(out)
    assert len(curves["True"]) == len(curves["False"]) == 6
    for bf16_loss, fp32_loss in zip(curves["True"], curves["False"]):
        assert bf16_loss == pytest.approx(fp32_loss, rel=0.02)
    assert curves["True"] != curves["False"]  # the flag really changed the arithmetic
