"""PPO for language models (clipped policy and value losses, GAE, per-token KL penalty to a reference).

TRL removed its PPOTrainer, so it lives here, kept to what PPO needs. One iteration:
  1. rollout: sample answers to a batch of prompts (left-padded) from the policy;
  2. score them with the reward functions; per-token reward = -kl_coef * (log p_policy - log p_ref),
     plus the score on each answer's last token;
  3. GAE advantages (whitened) and returns from the value head's estimates;
  4. several epochs of minibatch updates of the clipped policy loss + vf_coef * clipped value loss.
The value head is a linear layer on the policy's last hidden state. With LoRA the reference is the same
weights with the trained adapter switched off (no second model in memory).
"""

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class PPOArguments:
    output_dir: str = field(default="outputs/ppo", metadata={"help": "Where the policy (and value head) are saved."})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate for the policy and value head."})
    max_steps: int = field(default=-1, metadata={"help": "PPO iterations (rollout + updates); -1: one pass over the prompts per epoch."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the prompts when --max_steps is -1."})
    rollout_batch_size: int = field(default=8, metadata={"help": "Prompts answered per iteration."})
    mini_batch_size: int = field(default=4, metadata={"help": "Answers per gradient step within an iteration."})
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
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=42, metadata={"help": "Random seed (prompt order and sampling)."})
    logging_steps: int = field(default=1, metadata={"help": "Log every N iterations."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard or none."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for forward passes (GPU, or CPUs with bf16)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations to save memory."})


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


def forward_answers(model, sequences, attention_mask, prompt_length, temperature, value_head=None):
    """Log-probabilities of the answer tokens (and values of the states before them, and the logits)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    output = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
        output_hidden_states=value_head is not None, use_cache=False,
    )
    logits = output.logits[:, prompt_length - 1 : -1].float() / temperature
    answers = sequences[:, prompt_length:]
    logprobs = torch.gather(F.log_softmax(logits, dim=-1), 2, answers.unsqueeze(-1)).squeeze(-1)
    values = None
    if value_head is not None:
        values = value_head(output.hidden_states[-1][:, prompt_length - 1 : -1])
    return logprobs, values, logits


class PPOTrainerLite:
    """A PPO loop over a policy (causal LM, LoRA-wrapped or full) and a list of reward functions."""

    def __init__(self, args: PPOArguments, policy, tokenizer, chat_format, prompts: list[dict], reward_functions, reward_weights):
        self.args = args
        self.policy = policy
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.prompts = prompts
        self.reward_functions, self.reward_weights = reward_functions, reward_weights
        self.device = next(policy.parameters()).device
        self.stop_ids = chat_format.stop_token_ids()
        if not self.stop_ids:
            raise ValueError("the tokenizer has no end-of-turn token to stop answers at")
        config = policy.config if hasattr(policy, "config") else policy.base_model.config
        self.value_head = ValueHead(config.hidden_size).to(self.device)
        is_peft = hasattr(policy, "peft_config")
        self.frozen_reference = None
        if not is_peft:
            self.frozen_reference = copy.deepcopy(policy).eval().requires_grad_(False)
        elif self._continued_adapter():
            self._add_reference_adapter()
        params = [p for p in policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.writer = None
        if "tensorboard" in args.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(args.output_dir, "runs"))
        self.history: list[dict] = []

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

    def total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(len(self.prompts) * self.args.num_train_epochs / self.args.rollout_batch_size))

    def prompt_batches(self):
        while True:
            order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            for start in range(0, len(order) - self.args.rollout_batch_size + 1, self.args.rollout_batch_size):
                yield [self.prompts[i] for i in order[start : start + self.args.rollout_batch_size]]
            if len(order) < self.args.rollout_batch_size:
                yield [self.prompts[i] for i in order]

    @torch.no_grad()
    def rollout(self, batch: list[dict]) -> dict:
        texts = [self.chat_format.render(record["prompt"], add_generation_prompt=True) for record in batch]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(self.device)
        prompt_length = encoded["input_ids"].shape[1]
        self.policy.eval()
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
        advantages = masked_whiten(advantages, mask)
        return {
            "sequences": sequences, "attention_mask": attention_mask, "prompt_length": prompt_length, "mask": mask,
            "logprobs": logprobs, "values": values * mask, "advantages": advantages, "returns": returns,
            "scores": scores, "kl": kl, "answers": answers, "reward_means": reward_means, "ended": ended,
        }

    def _score(self, prompts, answers, columns):
        from medgpt.rewards import combined_rewards

        return combined_rewards(self.reward_functions, self.reward_weights, prompts, answers, columns)

    def update(self, rollout: dict) -> dict:
        self.policy.train()
        for module in self.policy.modules():  # dropout would make the old and new log-probabilities disagree
            if isinstance(module, nn.Dropout):
                module.eval()
        size = rollout["sequences"].shape[0]
        totals: dict[str, list[float]] = {}
        for _ in range(self.args.ppo_epochs):
            order = torch.randperm(size, generator=self.generator)
            for start in range(0, size, self.args.mini_batch_size):
                index = order[start : start + self.args.mini_batch_size].to(self.device)
                with self.autocast():
                    logprobs, values, logits = forward_answers(
                        self.policy, rollout["sequences"][index], rollout["attention_mask"][index],
                        rollout["prompt_length"], self.args.temperature, self.value_head,
                    )
                mask = rollout["mask"][index]
                policy_loss, value_loss, stats = ppo_losses(
                    logprobs, rollout["logprobs"][index], rollout["advantages"][index], values,
                    rollout["values"][index], rollout["returns"][index], mask,
                    self.args.cliprange, self.args.cliprange_value,
                )
                loss = policy_loss + self.args.vf_coef * value_loss
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for group in self.optimizer.param_groups for p in group["params"]], self.args.max_grad_norm
                )
                self.optimizer.step()
                with torch.no_grad():
                    entropy = masked_mean(-(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1), mask).item()
                for key, value in dict(stats, policy_loss=policy_loss.item(), value_loss=value_loss.item(), entropy=entropy).items():
                    totals.setdefault(key, []).append(value)
        return {key: sum(values) / len(values) for key, values in totals.items()}

    def train(self) -> list[dict]:
        steps = self.total_steps()
        batches = self.prompt_batches()
        logger.info("PPO: %d iterations of %d prompts, %d epochs each", steps, self.args.rollout_batch_size, self.args.ppo_epochs)
        started = time.time()
        answer_tokens = 0
        for step in range(1, steps + 1):
            rollout = self.rollout(next(batches))
            stats = self.update(rollout)
            answer_tokens += int(rollout["mask"].sum().item())
            record = {
                "step": step,
                "reward": rollout["scores"].mean().item(),
                "kl": rollout["kl"].sum(dim=1).mean().item(),
                "answer_length": rollout["mask"].sum(dim=1).mean().item(),
                "ended_fraction": rollout["ended"].float().mean().item(),
                **{f"reward/{name}": value for name, value in rollout["reward_means"].items()},
                **stats,
                "seconds": round(time.time() - started, 1),
            }
            self.history.append(record)
            if step % self.args.logging_steps == 0 or step == steps:
                logger.info("step %d/%d " + " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"), step, steps)
                if self.writer is not None:
                    for key, value in record.items():
                        if key != "step":
                            self.writer.add_scalar(f"ppo/{key}", value, step)
        elapsed = time.time() - started
        logger.info("PPO done: %d iterations in %.0f s, %.1f answer tokens/s", steps, elapsed, answer_tokens / max(elapsed, 1e-9))
        if self.writer is not None:
            self.writer.close()
        return self.history

    def save(self, output_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)
        if "ref" in getattr(self.policy, "peft_config", {}):
            self.policy.delete_adapter("ref")
        self.policy.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)
        save_file(self.value_head.state_dict(), os.path.join(output_dir, "value_head.safetensors"))
        logger.info("policy, value head and tokenizer saved to %s", os.path.abspath(output_dir))
