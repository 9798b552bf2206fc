"""Training without waste: the fused (chunked) loss equals the plain one, micro-batches equal the whole
batch, preference pairs are grouped by length, and the training scripts run under tcmalloc."""

import json
import os
import subprocess

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head

from conftest import REPO, run_script, tiny_training_flags
from medgpt import allocator, cpu_logprobs
from medgpt.training import FusedLossTrainer, GroupPairsByLength, forward_pair_sides_apart, pair_lengths


@pytest.fixture(params=["TRL's tiles", "frozen-head log-probabilities"])
def small_tiles(request, monkeypatch):
    """Both CPU paths through the fused LM head, with tiles and chunks far smaller than the batch (and a
    vocabulary tile that does not divide the vocabulary), so that every edge of the tiling is crossed."""
    import trl.kernels.chunked_logprob as chunked_logprob
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(chunked_logprob, "TOKEN_CHUNK_SIZE", 16)
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 5000)
    monkeypatch.setattr(cpu_logprobs, "TOKEN_CHUNK", 16)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", trl_utils._ChunkedLogProbFunction)  # restored after
    if request.param == "frozen-head log-probabilities":
        cpu_logprobs.use_frozen_head_logprobs()
    return request.param


def lora_model(model_dir: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter's B is zero, which would leave A's gradients zero
            torch.nn.init.normal_(parameter, std=0.05)
    return model


def batch_with_masked_prompts_and_padding(vocab_size: int) -> dict:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, vocab_size, (3, 41), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0
    attention_mask[2, 12:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :9] = -100  # the prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_gradients(model, batch: dict, **extra) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_the_fused_loss_equals_the_plain_loss_and_its_gradients(tiny_model_dir, small_tiles):
    model = lora_model(tiny_model_dir)
    batch = batch_with_masked_prompts_and_padding(model.config.vocab_size)
    plain_loss, plain_grads = loss_and_gradients(model, batch)
    add_fused_lm_head(model.get_base_model())
    fused_loss, fused_grads = loss_and_gradients(model, batch, fused_lm_head=True)

    assert plain_loss.item() > 1.0
    assert fused_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) == 2 * 7 * 2
    for name, gradient in plain_grads.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(fused_grads[name], gradient, rtol=1e-5, atol=1e-5 * gradient.abs().max().item())


@pytest.mark.parametrize("autocast", [False, True])
def test_frozen_head_log_probabilities_match_trl_for_any_upstream_gradient(autocast):
    """DPO and GRPO weight each token's log-probability differently and may use the entropy: the values
    and the hidden states' gradient must match TRL's function for any such weighting."""
    from trl.kernels import ChunkedLogProbFunction

    torch.manual_seed(0)
    hidden = torch.randn(300, 48, requires_grad=True)
    weight, targets = torch.randn(1003, 48) * 0.3, torch.randint(0, 1003, (300,))
    logprob_weights, entropy_weights = torch.randn(300), torch.randn(300)
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    results = []
    for function in (ChunkedLogProbFunction, cpu_logprobs.FrozenHeadLogProbs):
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs = function.apply(hidden, weight, None, targets, 1.0, 256, None, 1.0, fields)
        ((outputs[0] * logprob_weights).sum() + (outputs[1] * entropy_weights).sum()).backward()
        results.append([value.detach() for value in outputs] + [hidden.grad.clone()])
    for name, theirs, ours in zip(fields + ("gradient",), *results):
        if theirs.dtype == torch.bool:
            assert torch.equal(theirs, ours), name
        elif name != "gradient" or not autocast:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item(), msg=name)
        else:  # bf16 products, as the plain loss under autocast; TRL accumulates this one in fp32
            torch.testing.assert_close(ours, theirs, rtol=0.02, atol=0.02 * theirs.abs().max().item(), msg=name)


def preference_batch(vocab_size: int, left_padded: bool = False) -> dict:
    """Two pairs as DPO batches them, [chosen; rejected]: long chosen answers, short rejected ones, all
    padded to the longest row, prompts masked out of the labels."""
    generator = torch.Generator().manual_seed(4)
    lengths = [37, 29, 14, 11]
    input_ids = torch.randint(1, vocab_size, (4, 37), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        if left_padded:
            attention_mask[row, 37 - length:] = 1
        else:
            attention_mask[row, :length] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    prompt_ends = attention_mask.argmax(dim=1) + 6
    for row, end in enumerate(prompt_ends):
        labels[row, :end] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "use_cache": False}


@pytest.mark.parametrize("left_padded", [False, True])
def test_pair_sides_apart_give_the_joint_forwards_outputs_and_gradients(tiny_model_dir, small_tiles, left_padded):
    model = lora_model(tiny_model_dir)
    fields = ("log_probs", "entropy", "mean_logits", "is_top1")
    add_fused_lm_head(model.get_base_model(), outputs=fields)
    batch = preference_batch(model.config.vocab_size, left_padded)
    weights = torch.tensor([1.0, 0.5, -1.0, -0.5]).unsqueeze(1)  # DPO's sign per side, any scale per pair

    results, calls = [], []
    for apart in (False, True):
        if apart:
            joint = model.get_base_model().forward
            model.get_base_model().forward = lambda **kwargs: calls.append(kwargs["input_ids"].shape) or joint(**kwargs)
            forward_pair_sides_apart(model.get_base_model())
        model.zero_grad()
        outputs = model(**batch, fused_lm_head=True)
        ((outputs.log_probs * weights).sum() + outputs.entropy.sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append(([getattr(outputs, field).detach() for field in fields + ("label_mask", "loss")], grads))

    # Cut to each side's longest row when right-padded; left padding keeps the joint forward.
    assert calls == ([torch.Size([4, 37])] if left_padded else [torch.Size([2, 37]), torch.Size([2, 14])])
    (joint_values, joint_grads), (apart_values, apart_grads) = results
    for name, theirs, ours in zip(fields + ("label_mask", "loss"), joint_values, apart_values):
        assert ours.shape == theirs.shape, name
        if theirs.dtype == torch.bool:
            assert torch.equal(ours, theirs), name
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item(), msg=name)
    for name, gradient in joint_grads.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(apart_grads[name], gradient, rtol=1e-5, atol=1e-5 * gradient.abs().max().item())


def train_three_steps(trainer_class, model_dir: str, blocks: list[dict], output_dir) -> list[float]:
    model = lora_model(model_dir)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(blocks),
                            data_collator=DataCollatorForLanguageModeling(pad_token_id=0))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_the_pretraining_trainer_with_the_fused_loss_follows_the_plain_one(tiny_model_dir, small_tiles, tmp_path):
    generator = torch.Generator().manual_seed(5)
    blocks = [{"input_ids": torch.randint(1, 1000, (int(length),), generator=generator).tolist()}
              for length in torch.randint(12, 48, (12,), generator=generator)]
    plain = train_three_steps(Trainer, tiny_model_dir, blocks, tmp_path / "plain")
    fused = train_three_steps(FusedLossTrainer, tiny_model_dir, blocks, tmp_path / "fused")
    assert len(plain) == len(fused) == 3
    assert plain[0] != plain[2]  # it trained
    assert fused == pytest.approx(plain, rel=1e-5)


def test_micro_batches_train_like_the_whole_batch(tiny_model_dir, tmp_path):
    curves = []
    for micro_batch, accumulation in ((4, 1), (2, 2)):
        out = tmp_path / f"micro{micro_batch}"
        flags = tiny_training_flags(out, steps=3)
        flags[flags.index("--per_device_train_batch_size") + 1] = str(micro_batch)
        result = run_script(
            "supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir",
            os.path.join(REPO, "data", "finetune"), "--template_name", "chatml", "--use_peft", "True",
            "--model_max_length", "128", "--train_sampling_strategy", "group_by_length",
            "--gradient_accumulation_steps", str(accumulation), *flags,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        with open(out / "trainer_state.json", encoding="utf-8") as handle:
            curves.append([entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry])
    assert len(curves[0]) == 3
    assert curves[1][0] == pytest.approx(curves[0][0], rel=1e-6)  # the same loss before any update
    # After updates to 1e-3 only: the micro-batches sum their gradients in another order, and Adam's first steps
    # (about lr x sign) turn float noise in near-zero gradients into whole steps.
    assert curves[1] == pytest.approx(curves[0], rel=1e-3)


def test_pair_lengths_read_each_preference_layout():
    dpo = Dataset.from_list([{"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5, 6]}])
    reward = Dataset.from_list([{"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2]}])
    orpo = Dataset.from_list([{"chosen_input_ids": [1], "rejected_input_ids": [1, 2, 3]}])
    assert pair_lengths(dpo) == [5]
    assert pair_lengths(reward) == [4]
    assert pair_lengths(orpo) == [3]
    assert pair_lengths(Dataset.from_list([{"input_ids": [1, 2]}])) is None


class PlainSampling:
    def _get_train_sampler(self, train_dataset=None):
        return "the trainer's own sampler"

    def _get_eval_sampler(self, eval_dataset):
        return "the trainer's own evaluation sampler"


class Args:
    train_sampling_strategy = "group_by_length"
    train_batch_size = 2
    gradient_accumulation_steps = 2


def test_grouped_pairs_pad_less_than_random_order():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (64,), generator=generator).tolist()
    rows = [{"prompt_ids": [0] * 4, "chosen_ids": [1] * n, "rejected_ids": [2] * (n // 2)} for n in lengths]
    trainer = type("Trainer", (GroupPairsByLength, PlainSampling), {})()
    trainer.args, trainer.train_dataset = Args(), Dataset.from_list(rows)
    torch.manual_seed(0)
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(64))

    def padding(indices):
        batches = [indices[start:start + 4] for start in range(0, 64, 4)]
        return sum(max(lengths[i] for i in batch) * 4 - sum(lengths[i] for i in batch) for batch in batches)

    random_order = torch.randperm(64, generator=generator).tolist()
    assert padding(order) < padding(random_order) / 3
    trainer.args.eval_batch_size, trainer.args.seed = 4, 0
    evaluation_order = list(trainer._get_eval_sampler(trainer.train_dataset))
    assert sorted(evaluation_order) == list(range(64))
    assert padding(evaluation_order) < padding(random_order) / 3

    trainer.args.train_sampling_strategy = "random"
    assert trainer._get_train_sampler() == "the trainer's own sampler"
    assert trainer._get_eval_sampler(trainer.train_dataset) == "the trainer's own evaluation sampler"


def test_the_batch_settings_of_the_run_scripts():
    def flags(batch: int, micro: int | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, BATCH_SIZE=str(batch))
        if micro is not None:
            env["MICRO_BATCH_SIZE"] = str(micro)
        return subprocess.run(["bash", "-c", "source scripts/common.sh && batch_flags"], cwd=REPO, env=env,
                              capture_output=True, text=True)

    assert flags(4).stdout.split() == ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                       "--per_device_eval_batch_size", "4"]
    assert flags(1).stdout.split()[:4] == ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"]
    assert flags(8, micro=8).stdout.split()[:4] == ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"]
    odd = flags(3)
    assert odd.returncode == 2 and odd.stderr.strip() == "error: BATCH_SIZE=3 is not a multiple of MICRO_BATCH_SIZE=2"


@pytest.fixture
def no_exec(monkeypatch):
    """os.execv recorded instead of run; the environment restored afterwards."""
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, argv, dict(os.environ))))
    for name in ("MEDGPT_ALLOCATOR", allocator.RELAUNCHED, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    return calls


def test_relaunch_preloads_tcmalloc_once(no_exec, monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    allocator.relaunch_with_tcmalloc("__main__", ["/usr/bin/python3", "script.py", "--flag"])
    ((path, argv, env),) = no_exec
    assert (path, argv) == ("/usr/bin/python3", ["/usr/bin/python3", "script.py", "--flag"])
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:libother.so"
    assert env[allocator.RELAUNCHED] == "1"
    allocator.relaunch_with_tcmalloc("__main__", ["/usr/bin/python3", "script.py"])  # the relaunched process: no loop
    assert len(no_exec) == 1


@pytest.mark.parametrize("situation", ["asked for system", "not installed", "already running on it"])
def test_relaunch_does_nothing_when_it_does_not_apply(no_exec, monkeypatch, situation):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    if situation == "asked for system":
        monkeypatch.setenv("MEDGPT_ALLOCATOR", "system")
    elif situation == "not installed":
        monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    else:
        monkeypatch.setattr(allocator, "active_allocator", lambda: "tcmalloc")
    allocator.relaunch_with_tcmalloc("__main__", ["/usr/bin/python3", "script.py"])
    assert no_exec == []


@pytest.mark.parametrize("script", ["pretraining.py", "supervised_finetuning.py", "dpo_training.py"])
def test_a_training_script_imported_in_process_does_not_relaunch(no_exec, monkeypatch, script):
    import runpy

    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    namespace = runpy.run_path(os.path.join(REPO, script), run_name="imported")
    assert callable(namespace["main"])
    assert no_exec == []


def test_a_training_script_runs_under_tcmalloc_where_it_is_installed(tiny_model_dir, tmp_path):
    common = ["--model_name_or_path", tiny_model_dir, "--train_file_dir", os.path.join(REPO, "data", "pretrain"),
              "--block_size", "64", "--use_peft", "True"]
    result = run_script("pretraining.py", *common, *tiny_training_flags(tmp_path / "default", steps=1))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "memory allocator: tcmalloc" if allocator.find_tcmalloc() else "memory allocator: system malloc; installing"
    assert expected in result.stderr
    result = run_script("pretraining.py", *common, *tiny_training_flags(tmp_path / "system", steps=1),
                        env={"MEDGPT_ALLOCATOR": "system"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory allocator: system malloc (MEDGPT_ALLOCATOR=system)" in result.stderr


def test_orpo_through_the_fused_head_gives_trls_values_and_gradients(tiny_model_dir, small_tiles, tmp_path):
    """ORPO's two terms from per-token log-probabilities, each side cut to its own length, against TRL's
    ORPOTrainer computing them from the full logits: the same log-probabilities, NLL and gradients."""
    from transformers import AutoTokenizer

    from orpo_training import PretokenizedORPOTrainer  # first: it silences TRL's experimental warning
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    generator = torch.Generator().manual_seed(5)
    ids = lambda n: torch.randint(1, 200, (n,), generator=generator).tolist()  # noqa: E731
    rows = [{"prompt_ids": ids(prompt), "chosen_ids": ids(chosen), "rejected_ids": ids(rejected)}
            for prompt, chosen, rejected in [(9, 30, 4), (6, 21, 7), (11, 12, 3), (5, 25, 9)]]
    model = lora_model(tiny_model_dir)
    config = ORPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=64, use_cpu=True,
                        report_to="none", remove_unused_columns=False)
    trainer = PretokenizedORPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                      processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    batch = next(iter(trainer.get_train_dataloader()))
    backbone_inputs = []
    model.get_base_model().model.register_forward_pre_hook(
        lambda module, args, kwargs: backbone_inputs.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)

    results = []
    for forward in (ORPOTrainer.concatenated_forward, PretokenizedORPOTrainer.concatenated_forward):
        model.zero_grad()
        chosen, rejected, chosen_logits, rejected_logits, nll = forward(trainer, model, batch)
        (nll + chosen.sum() - 0.5 * rejected.sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append(([chosen.detach(), rejected.detach(), nll.detach()], grads,
                        (chosen_logits.detach().mean(), rejected_logits.detach().mean())))
    # TRL: one forward over all 8 rows padded to the longest (9 + 30 tokens); here each side cut to its own.
    assert backbone_inputs == [(8, 39), (4, 39), (4, 14)]
    (theirs, their_grads, their_logits), (ours, our_grads, our_logits) = results
    for name, their_value, our_value in zip(("chosen log-probs", "rejected log-probs", "NLL"), theirs, ours):
        torch.testing.assert_close(our_value, their_value, rtol=1e-5, atol=1e-5 * their_value.abs().max().item(), msg=name)
    for name, gradient in their_grads.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(our_grads[name], gradient, rtol=1e-5, atol=1e-5 * gradient.abs().max().item())
    assert all(torch.isfinite(value) for value in our_logits + their_logits)
