"""PPO for language models (clipped policy and value losses, GAE, per-token KL penalty to a reference).

TRL removed its PPOTrainer, so it lives here, kept to what PPO needs. One iteration (one "step"):
  1. rollout: each process samples answers to its share of a batch of prompts (left-padded);
  2. score them with the reward functions; per-token reward = -kl_coef * (log p_policy - log p_ref),
     plus the score on each answer's last token;
  3. GAE advantages (whitened over all processes' answers) and returns from the value head's estimates;
  4. `ppo_epochs` passes of micro-batch updates of the clipped policy loss + vf_coef * clipped value loss,
     `gradient_accumulation_steps` micro-batches per optimizer step, gradients averaged across processes.
The value head is a linear layer on the policy's last hidden state. With LoRA the reference is the same
weights with the trained adapter switched off (no second model in memory).

The options are `transformers.TrainingArguments` (learning rate, schedule, warmup, checkpoints, resume,
logging, seed, bf16) plus PPO's own. Runs are repeatable by construction, so a resumed run ends where an
uninterrupted one does: the prompt order of epoch e comes from a generator seeded with (seed, e), the
prompts of iteration k are computed from k, sampling is seeded with (seed, k, process), the micro-batch
shuffles with (seed, k); a checkpoint holds the weights, value head, optimizer, scheduler and step.
"""

import contextlib
import copy
import glob
import hashlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import TrainingArguments

from medgpt.arguments import at_least, require
from medgpt.errors import InputError
from medgpt.outputs import atomic_write_text, list_checkpoints, publish_model_folder, resolve_checkpoint, staging_folder
from medgpt.rewards import RewardArguments

logger = logging.getLogger(__name__)

# What a PPO checkpoint holds besides the trainer state, weights and optimizer, for a resumed run to restore.
CHECKPOINT_FILES = ("value_head.safetensors", "optimizer.pt", "scheduler.pt")


@dataclass
class PPOArguments(TrainingArguments):
    """TrainingArguments, with PPO's defaults and knobs. A step is one PPO iteration (rollout + updates)."""

    output_dir: str | None = field(default="outputs/ppo", metadata={"help": "Where the policy, value head, logs and checkpoints go."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate for the policy and value head."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the prompts when --max_steps is -1."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N iterations (statistics averaged over them)."})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Answers per forward/backward micro-batch (of each process's rollout)."}
    )
    rollout_batch_size: int = field(default=8, metadata={"help": "Prompts each process answers per iteration."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest sampled answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probabilities use the same)."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty to the reference."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value prediction clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtract this from the score of answers cut off before their end-of-turn."}
    )

    def __post_init__(self):
        for name in ("rollout_batch_size", "ppo_epochs", "max_new_tokens"):
            at_least(self, name, 1)
        require(self.temperature > 0, "temperature", "must be positive", self.temperature)
        require(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]", self.gamma)
        require(0 <= self.lam <= 1, "lam", "must be in [0, 1]", self.lam)
        require(self.cliprange > 0, "cliprange", "must be positive", self.cliprange)
        require(self.cliprange_value > 0, "cliprange_value", "must be positive", self.cliprange_value)
        at_least(self, "kl_coef", 0)
        at_least(self, "vf_coef", 0)
        super().__post_init__()
        # Options of TrainingArguments this loop does not implement: refused, not silently ignored.
        unsupported = {
            "eval_strategy": self.eval_strategy != "no",
            "load_best_model_at_end": self.load_best_model_at_end,
            "deepspeed": bool(self.deepspeed),
            "fsdp": bool(self.fsdp),
            "torch_compile": self.torch_compile,
            "push_to_hub": self.push_to_hub,
        }
        for name, used in unsupported.items():
            if used:
                raise InputError(f"--{name} is not supported by ppo_training.py")
        if self.save_strategy == "best":
            raise InputError("--save_strategy best is not supported by ppo_training.py (no evaluation): use steps, epoch or no")
        if self.resume_from_checkpoint is not None:
            self.resume_from_checkpoint = resolve_checkpoint(self.resume_from_checkpoint, self.output_dir, CHECKPOINT_FILES)


@dataclass
class PPORewardArguments(RewardArguments):
    """PPO scores answers with the reward model unless told otherwise."""

    reward_funcs: str = field(
        default="model",
        metadata={
            "help": "Comma list of rewards: model (default: the --reward_model_path model), accuracy, format, "
            "length, or module:function / file.py:function for your own."
        },
    )

    def __post_init__(self):
        names = [name.strip() for name in self.reward_funcs.split(",")]
        if "model" in names and not self.reward_model_path:
            raise InputError("--reward_funcs model needs --reward_model_path")


def derived_seed(*parts) -> int:
    """A 63-bit seed that depends on every part (seed, purpose, step, process), the same in every run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def rollout_prompt_indices(num_prompts: int, step: int, seed: int, per_process: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The prompts process `rank` answers at iteration `step` (1-based), a function of the step alone.
    Epoch e visits the prompts in an order drawn from (seed, e); each iteration takes the next global batch
    (per_process x world_size prompts) of it, each process its own share. An epoch is the whole global
    batches that fit; with fewer prompts than one global batch, the order is repeated to fill it."""
    global_batch = per_process * world_size
    iterations_per_epoch = max(1, num_prompts // global_batch)
    epoch, position = divmod(step - 1, iterations_per_epoch)
    generator = torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))
    order = torch.randperm(num_prompts, generator=generator).tolist()
    start = position * global_batch + rank * per_process
    return [order[(start + i) % num_prompts] for i in range(per_process)]


# ---- the maths, kept free of models so it can be checked by hand ----


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards: -kl_coef * (log p - log p_ref) on every answer token, the score added on the last."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(dim=1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae_advantages(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation over answer tokens; positions past an answer's end count as
    terminal (value 0). Returns (advantages, returns)."""
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[1]
    advantage = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * advantage
        reversed_advantages.append(advantage)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, cliprange, cliprange_value):
    """Clipped policy loss, clipped value loss and their diagnostics (clip fraction, approximate KL)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(torch.max(unclipped, clipped), mask)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
        "approx_kl": (0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)).item(),
        "value_clipfrac": masked_mean(((values - returns) ** 2 < (values_clipped - returns) ** 2).float(), mask).item(),
    }
    return policy_loss, value_loss, stats


def answer_mask(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 for answer tokens up to and including the first stop token, 0 after it."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return (stops_before == 0).float()


# ---- the model side ----


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


def reference_context(policy, frozen_reference):
    """Run the reference: a frozen copy (full fine-tuning), a frozen copy of a continued adapter named
    "ref", or the policy with its adapter switched off."""
    if frozen_reference is not None:
        return contextlib.nullcontext(frozen_reference)
    if "ref" in getattr(policy, "peft_config", {}):
        from trl.trainer.utils import use_adapter

        return _yielding(use_adapter(policy, "ref"), policy)
    return _yielding(policy.disable_adapter(), policy)


@contextlib.contextmanager
def _yielding(context, model):
    with context:
        yield model


def takes_logits_to_keep(model) -> bool:
    """Whether the (LoRA-wrapped) model's forward names logits_to_keep: every causal LM of transformers
    does; older remote-code models may not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def forward_answers(model, sequences, attention_mask, prompt_length, temperature, value_head=None):
    """Log-probabilities of the answer tokens (and values of the states before them, and the logits)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    # Only the positions that predict an answer token need the LM head: the prompts' logits (batch x prompt
    # length x vocabulary) would be computed and held for nothing. (A model that cannot skip them still
    # gets the same slice.)
    kept = sequences.shape[1] - prompt_length + 1
    output = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
        output_hidden_states=value_head is not None, use_cache=False,
        **({"logits_to_keep": kept} if takes_logits_to_keep(model) else {}),
    )
    logits = output.logits[:, -kept:-1].float() / temperature
    answers = sequences[:, prompt_length:]
    logprobs = torch.gather(F.log_softmax(logits, dim=-1), 2, answers.unsqueeze(-1)).squeeze(-1)
    values = None
    if value_head is not None:
        values = value_head(output.hidden_states[-1][:, prompt_length - 1 : -1])
    return logprobs, values, logits


class PolicyAndValue(nn.Module):
    """The policy and its value head as one module, so one DistributedDataParallel wrapper averages the
    gradients of both."""

    def __init__(self, policy, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, sequences, attention_mask, prompt_length: int, temperature: float):
        return forward_answers(self.policy, sequences, attention_mask, prompt_length, temperature, self.value_head)


class PPOTrainerLite:
    """A PPO loop over a policy (causal LM, LoRA-wrapped or full) and a list of reward functions, on one
    process or several (torchrun: each process answers its own prompts, gradients are averaged)."""

    def __init__(self, args: PPOArguments, policy, tokenizer, chat_format, prompts: list[dict], reward_functions, reward_weights):
        from transformers import Trainer, get_scheduler

        self.args = args
        self.policy = policy
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.prompts = prompts
        self.reward_functions, self.reward_weights = reward_functions, reward_weights
        self.rank, self.world_size = args.process_index, args.world_size
        self.is_main = self.rank == 0
        self.device = next(policy.parameters()).device
        self.stop_ids = chat_format.stop_token_ids()
        if not self.stop_ids:
            raise ValueError("the tokenizer has no end-of-turn token to stop answers at")
        if not prompts:
            raise InputError("no prompts to train on")
        if args.use_liger_kernel:  # the layer kernels, as the Trainer applies them for the other stages
            from transformers.integrations.liger import apply_liger_kernel

            apply_liger_kernel(policy, args.liger_kernel_config)
        config = policy.config if hasattr(policy, "config") else policy.base_model.config
        self.value_head = ValueHead(config.hidden_size).to(self.device)
        self.is_peft = hasattr(policy, "peft_config")
        self.frozen_reference = None
        if not self.is_peft:
            self.frozen_reference = copy.deepcopy(policy).eval().requires_grad_(False)
        elif self._continued_adapter():
            self._add_reference_adapter()

        self.model = PolicyAndValue(policy, self.value_head)
        self.training_model = self.model
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.training_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=device_ids, forward_sync_buffers=False,  # buffers (rotary tables) never change
                find_unused_parameters=bool(args.ddp_find_unused_parameters),
            )

        self.iterations_per_epoch = max(1, len(prompts) // self.global_batch_size)
        self.total_steps = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_train_epochs * self.iterations_per_epoch))
        micro_batches = math.ceil(args.rollout_batch_size / args.per_device_train_batch_size)
        self.optimizer_steps_per_iteration = args.ppo_epochs * math.ceil(micro_batches / args.gradient_accumulation_steps)
        # --optim and its settings as the Trainer reads them; no weight decay on biases and norms, as there
        trainable = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        no_decay = lambda name: "bias" in name or "norm" in name.lower()  # noqa: E731
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        self.optimizer = optimizer_class([
            {"params": [p for name, p in trainable if not no_decay(name)], "weight_decay": args.weight_decay},
            {"params": [p for name, p in trainable if no_decay(name)], "weight_decay": 0.0},
        ], **optimizer_kwargs)
        # The schedule advances every optimizer step; --warmup_steps counts iterations, like every step option here.
        schedule_length = self.total_steps * self.optimizer_steps_per_iteration
        warmup = args.get_warmup_steps(self.total_steps) * self.optimizer_steps_per_iteration
        self.scheduler = get_scheduler(
            args.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
            num_training_steps=schedule_length, scheduler_specific_kwargs=args.lr_scheduler_kwargs or None,
        )
        self.global_step = 0
        self.history: list[dict] = []  # the logged records: ppo_log.jsonl and trainer_state.json's log_history
        self.unlogged: list[dict] = []  # statistics of the iterations since the last log
        self.seconds_before = 0.0  # training time of the run this one resumes
        self.writer = None
        ignored = [name for name in args.report_to if name not in ("tensorboard", "none")]
        if ignored:
            logger.warning("--report_to %s: PPO logs to TensorBoard and ppo_log.jsonl only", ",".join(ignored))
        if args.fp16:
            logger.warning("--fp16: PPO has no fp16 autocast (it would need loss scaling); training in the weights' dtype")
        if self.is_main and "tensorboard" in args.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(args.output_dir, "runs"))

    @property
    def global_batch_size(self) -> int:
        return self.args.rollout_batch_size * self.world_size

    def _continued_adapter(self) -> bool:
        # A fresh LoRA adapter starts at zero, so "adapter off" is the starting policy; a continued one
        # (--peft_path) is not, and its starting weights are copied as the reference.
        return any(p.abs().sum() > 0 for n, p in self.policy.named_parameters() if "lora_B" in n)

    def _add_reference_adapter(self):
        self.policy.add_adapter("ref", self.policy.peft_config["default"])
        for name, param in self.policy.named_parameters():
            if ".default." in name:
                self.policy.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
        self.policy.set_adapter("default")
        for name, param in self.policy.named_parameters():
            if ".ref." in name:
                param.requires_grad_(False)

    def autocast(self):
        if not self.args.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ---- what each iteration works on: a function of the step alone ----

    def prompt_batch(self, step: int) -> list[dict]:
        indices = rollout_prompt_indices(
            len(self.prompts), step, self.args.seed, self.args.rollout_batch_size, self.rank, self.world_size
        )
        return [self.prompts[i] for i in indices]

    @torch.no_grad()
    def rollout(self, batch: list[dict], step: int) -> dict:
        texts = [self.chat_format.render(record["prompt"], add_generation_prompt=True) for record in batch]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(self.device)
        prompt_length = encoded["input_ids"].shape[1]
        self.policy.eval()
        torch.manual_seed(derived_seed(self.args.seed, "sample", step, self.rank))
        with self.autocast():
            sequences = self.policy.generate(
                # Plain sampling at the temperature the log-probabilities use: a model's own generation
                # config (top-k, top-p, repetition penalty) would sample from a different distribution.
                **encoded, do_sample=True, temperature=self.args.temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
                max_new_tokens=self.args.max_new_tokens, eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
            )
        responses = sequences[:, prompt_length:]
        mask = answer_mask(responses, self.stop_ids)
        attention_mask = torch.cat([encoded["attention_mask"], mask.long()], dim=1)
        with self.autocast():
            logprobs, values, _ = forward_answers(self.policy, sequences, attention_mask, prompt_length, self.args.temperature, self.value_head)
            with reference_context(self.policy, self.frozen_reference) as reference:
                ref_logprobs, _, _ = forward_answers(reference, sequences, attention_mask, prompt_length, self.args.temperature)

        answers = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
        columns = {key: [record.get(key) for record in batch] for key in batch[0] if key not in ("prompt", "source")}
        scores, reward_means = self._score([record["prompt"] for record in batch], answers, columns)
        ended = torch.isin(responses, torch.tensor(self.stop_ids, device=self.device)).any(dim=1).cpu()
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * (~ended).float()
        scores = scores.to(self.device)
        rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, self.args.kl_coef)
        advantages, returns = gae_advantages(rewards, values, mask, self.args.gamma, self.args.lam)
        advantages = self.whiten(advantages, mask)
        return {
            "sequences": sequences, "attention_mask": attention_mask, "prompt_length": prompt_length, "mask": mask,
            "logprobs": logprobs, "values": values * mask, "advantages": advantages, "returns": returns,
            "scores": scores, "kl": kl, "answers": answers, "reward_means": reward_means, "ended": ended,
        }

    def whiten(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """masked_whiten over the answers of every process: the global batch is one batch."""
        if self.world_size == 1:
            return masked_whiten(values, mask)
        sums = torch.stack([(values * mask).sum(), mask.sum()]).double()
        dist.all_reduce(sums)
        mean = (sums[0] / sums[1].clamp(min=1)).to(values.dtype)
        squares = torch.stack([((values - mean) ** 2 * mask).sum(), mask.sum()]).double()
        dist.all_reduce(squares)
        variance = (squares[0] / squares[1].clamp(min=1)).to(values.dtype)
        return (values - mean) * torch.rsqrt(variance + 1e-8) * mask

    def _score(self, prompts, answers, columns):
        from medgpt.rewards import combined_rewards

        return combined_rewards(self.reward_functions, self.reward_weights, prompts, answers, columns)

    def update(self, rollout: dict, step: int) -> dict:
        args = self.args
        self.model.train()
        for module in self.model.modules():  # dropout would make the old and new log-probabilities disagree
            if isinstance(module, nn.Dropout):
                module.eval()
        size = rollout["sequences"].shape[0]
        generator = torch.Generator().manual_seed(derived_seed(args.seed, "shuffle", step))
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        totals: dict[str, list[float]] = {}
        for _ in range(args.ppo_epochs):
            order = torch.randperm(size, generator=generator)
            micro_batches = list(torch.split(order, args.per_device_train_batch_size))
            for first in range(0, len(micro_batches), args.gradient_accumulation_steps):
                group = micro_batches[first : first + args.gradient_accumulation_steps]
                for position, index in enumerate(group):
                    index = index.to(self.device)
                    last = position == len(group) - 1
                    # Gradients are averaged across processes once per optimizer step, on its last micro-batch.
                    no_sync = self.training_model.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()
                    with no_sync:
                        with self.autocast():
                            logprobs, values, logits = self.training_model(
                                rollout["sequences"][index], rollout["attention_mask"][index],
                                rollout["prompt_length"], args.temperature,
                            )
                        mask = rollout["mask"][index]
                        policy_loss, value_loss, stats = ppo_losses(
                            logprobs, rollout["logprobs"][index], rollout["advantages"][index], values,
                            rollout["values"][index], rollout["returns"][index], mask, args.cliprange, args.cliprange_value,
                        )
                        ((policy_loss + args.vf_coef * value_loss) / len(group)).backward()
                    with torch.no_grad():
                        entropy = masked_mean(-(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1), mask).item()
                    for key, value in dict(stats, policy_loss=policy_loss.item(), value_loss=value_loss.item(), entropy=entropy).items():
                        totals.setdefault(key, []).append(value)
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {key: sum(values) / len(values) for key, values in totals.items()}

    # ---- the loop ----

    def train(self, resume_from_checkpoint: str | None = None) -> list[dict]:
        args = self.args
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
        logger.info("training on %d process(es), %s", self.world_size, self.device)
        logger.info(
            "PPO: iterations %d-%d of %d prompts (%d per process x %d process(es)), %d epochs of micro-batches of %d, "
            "%d optimizer step(s) per iteration", self.global_step + 1, self.total_steps, self.global_batch_size,
            args.rollout_batch_size, self.world_size, args.ppo_epochs, args.per_device_train_batch_size,
            self.optimizer_steps_per_iteration,
        )
        log_every = self._interval(args.logging_strategy, args.logging_steps)
        save_every = self._interval(args.save_strategy, args.save_steps)
        started = time.time()
        answer_tokens = 0
        for step in range(self.global_step + 1, self.total_steps + 1):
            rollout = self.rollout(self.prompt_batch(step), step)
            stats = self.update(rollout, step)
            answer_tokens += int(rollout["mask"].sum().item()) * self.world_size
            self.unlogged.append(self.average_across_processes({
                "reward": rollout["scores"].mean().item(),
                "kl": rollout["kl"].sum(dim=1).mean().item(),
                "answer_length": rollout["mask"].sum(dim=1).mean().item(),
                "ended_fraction": rollout["ended"].float().mean().item(),
                **{f"reward/{name}": value for name, value in rollout["reward_means"].items()},
                **stats,
            }))
            self.global_step = step
            if log_every and (step % log_every == 0 or step == self.total_steps):
                self.log(self.unlogged, seconds=self.seconds_before + time.time() - started)
                self.unlogged = []
            if save_every and step % save_every == 0:
                self.save_checkpoint(seconds=self.seconds_before + time.time() - started)
        elapsed = time.time() - started
        self.seconds_before += elapsed
        logger.info("PPO done: %d iterations in %.0f s, %.1f answer tokens/s", self.total_steps, elapsed,
                    answer_tokens / max(elapsed, 1e-9))
        if self.writer is not None:
            self.writer.close()
        return self.history

    def _interval(self, strategy, steps: float) -> int | None:
        """Iterations between logs or checkpoints: --*_steps (a fraction of the run if below 1), or an epoch."""
        if strategy == "no":
            return None
        if strategy == "epoch":
            return self.iterations_per_epoch
        return max(1, math.ceil(steps * self.total_steps) if steps < 1 else int(steps))

    def average_across_processes(self, record: dict) -> dict:
        if self.world_size == 1:
            return record
        keys = list(record)  # the same order in every process
        values = torch.tensor([record[key] for key in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(keys, (values / self.world_size).tolist()))

    def log(self, records: list[dict], seconds: float) -> None:
        """One record: the mean of each statistic over the iterations since the last log."""
        record = {"step": self.global_step}
        for key in records[0]:
            record[key] = sum(r[key] for r in records) / len(records)
        record["learning_rate"] = self.scheduler.get_last_lr()[0]
        record["seconds"] = round(seconds, 1)
        self.history.append(record)
        if not self.is_main:
            return
        logger.info("step %d/%d " + " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"), self.global_step, self.total_steps)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"ppo/{key}", value, self.global_step)

    # ---- saving and resuming ----

    def trainer_state(self) -> dict:
        args = self.args
        return {
            "global_step": self.global_step, "max_steps": self.total_steps,
            "epoch": self.global_step / self.iterations_per_epoch, "num_train_epochs": args.num_train_epochs,
            "logging_steps": args.logging_steps, "save_steps": args.save_steps,
            "train_batch_size": args.per_device_train_batch_size, "rollout_batch_size": args.rollout_batch_size,
            "world_size": self.world_size, "total_seconds": round(self.seconds_before, 1), "log_history": self.history,
        }

    def _save_weights(self, folder: str) -> None:
        from safetensors.torch import save_file

        if self.is_peft:  # the trained adapter only, never the frozen "ref" copy
            self.policy.save_pretrained(folder, selected_adapters=["default"])
        else:
            self.policy.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        save_file(self.value_head.state_dict(), os.path.join(folder, "value_head.safetensors"))

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def save_checkpoint(self, seconds: float) -> None:
        """OUTPUT_DIR/checkpoint-N: weights, value head, optimizer, scheduler, RNG states and trainer_state.json,
        written into a temporary folder and renamed into place. Process 0 writes; the others wait."""
        rng = {
            "python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        states = [rng]
        if self.world_size > 1:
            states = [None] * self.world_size
            dist.all_gather_object(states, rng)
        if self.is_main:
            target = os.path.join(self.args.output_dir, f"checkpoint-{self.global_step}")
            staging = os.path.join(self.args.output_dir, f".checkpoint-{self.global_step}.partial")
            shutil.rmtree(staging, ignore_errors=True)  # what an interrupted save left
            os.makedirs(staging)
            self._save_weights(staging)
            if not self.args.save_only_model:  # --save_only_model: smaller, but cannot be resumed
                torch.save(self.optimizer.state_dict(), os.path.join(staging, "optimizer.pt"))
                torch.save(self.scheduler.state_dict(), os.path.join(staging, "scheduler.pt"))
                for rank, state in enumerate(states):
                    torch.save(state, os.path.join(staging, "rng_state.pth" if self.world_size == 1 else f"rng_state_{rank}.pth"))
            state = dict(self.trainer_state(), total_seconds=round(seconds, 1), unlogged_iterations=self.unlogged)
            atomic_write_text(os.path.join(staging, "trainer_state.json"), json.dumps(state, indent=2) + "\n")
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(staging, target)
            logger.info("checkpoint saved to %s", target)
            self._rotate_checkpoints()
        self._barrier()

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit or limit < 1:
            return
        for old in list_checkpoints(self.args.output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("deleted the older checkpoint %s (--save_total_limit %d)", old, limit)

    def load_checkpoint(self, folder: str) -> None:
        """Restore the state written by save_checkpoint. The reference was rebuilt from the starting model
        (the same flags as the first run); the checkpoint's trained weights go into the policy."""
        from safetensors.torch import load_file

        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        adapter = os.path.join(folder, "adapter_model.safetensors")
        if self.is_peft != os.path.isfile(adapter):
            held = "a LoRA adapter" if os.path.isfile(adapter) else "full weights"
            trained = "a LoRA adapter" if self.is_peft else "full weights"
            raise InputError(f"the checkpoint holds {held}, this run trains {trained}: resume with the first run's flags", folder)
        if self.is_peft:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.policy, load_file(adapter, device=str(self.device)), adapter_name="default")
            unexpected = list(result.unexpected_keys)
        else:
            weights = {}
            for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
                if os.path.basename(path) != "value_head.safetensors":
                    weights.update(load_file(path, device=str(self.device)))
            result = self.policy.load_state_dict(weights, strict=False)
            unexpected = list(result.unexpected_keys)
            missing = sorted(name for name in result.missing_keys if "lm_head" not in name and "embed" not in name)  # tied
            if missing:
                raise InputError(f"the checkpoint lacks weights of this model (e.g. {missing[0]})", folder)
        if unexpected:
            raise InputError(f"the checkpoint's weights do not fit this model (e.g. {unexpected[0]})", folder)
        self.value_head.load_state_dict(load_file(os.path.join(folder, "value_head.safetensors"), device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))
        rng_file = os.path.join(folder, "rng_state.pth" if self.world_size == 1 else f"rng_state_{self.rank}.pth")
        if state.get("world_size", 1) != self.world_size:
            logger.warning("the checkpoint was written by %s process(es), this run has %d: the prompts of the "
                           "remaining iterations differ from the first run's", state.get("world_size"), self.world_size)
        elif os.path.isfile(rng_file):
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.global_step = int(state["global_step"])
        self.history = list(state.get("log_history", []))
        self.unlogged = list(state.get("unlogged_iterations", []))
        self.seconds_before = float(state.get("total_seconds", 0.0))
        if self.global_step >= self.total_steps:
            logger.warning("the checkpoint is at iteration %d, --max_steps asks for %d: nothing left to train",
                           self.global_step, self.total_steps)
        logger.info("resumed from %s at iteration %d", folder, self.global_step)

    def save_model(self, output_dir: str | None = None) -> None:
        """The final policy, value head and tokenizer (written beside OUTPUT_DIR, then moved into it),
        ppo_log.jsonl and trainer_state.json. Process 0 writes; the others wait."""
        output_dir = output_dir or self.args.output_dir
        if self.is_main:
            with staging_folder(output_dir) as staging:
                self._save_weights(staging)
                publish_model_folder(staging, output_dir)
            atomic_write_text(os.path.join(output_dir, "ppo_log.jsonl"), "".join(json.dumps(r) + "\n" for r in self.history))
            atomic_write_text(os.path.join(output_dir, "trainer_state.json"), json.dumps(self.trainer_state(), indent=2) + "\n")
            logger.info("policy, value head and tokenizer saved to %s (log: ppo_log.jsonl, trainer_state.json)",
                        os.path.abspath(output_dir))
        self._barrier()
