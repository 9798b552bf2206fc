"""Per-token log-probabilities through the LM head on CPU, without the full logits and without
computing the head twice.

TRL's fused LM head (SFT, DPO, GRPO; PT through medgpt.training.FusedLossTrainer) never holds the
(tokens x vocabulary) logits: it folds them tile by tile in the forward pass and recomputes every tile in
the backward pass. On GPUs that runs as Triton kernels. On CPU it runs as some twenty eager tensor
passes per tile plus a third product with the head's weight, which cost the default model's SFT about a
fifth of its step.

When the head's weight is frozen (LoRA, the usual case), the gradient of a token's log-probability with
respect to its hidden state is a vector of the hidden size, W^T (onehot - softmax), whatever the loss
does with the log-probabilities afterwards. So the forward pass computes it chunk by chunk and keeps
only it (tokens x hidden, a few MB); the backward pass scales it by the incoming gradient. Two products
with the head in all, like the plain cross-entropy, and fused softmax kernels instead of eager passes.
The rare cases it does not cover (a trainable head or bias, temperature, soft-capping, scaled logits, a
GPU) go to TRL's own function.
"""

import torch

# Tokens per chunk: 256 x 49,152 fp32 logits are 50 MB, so the chunk's temporaries stay small.
TOKEN_CHUNK = 256


def _softmax_stats(logits: torch.Tensor, targets: torch.Tensor, outputs: tuple[str, ...]):
    """log-probabilities of the targets and the optional per-token fields, from fp32 logits."""
    log_z = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    fields = {
        "entropy": (lambda: log_z - torch.linalg.vecdot(probs, logits)),
        "log_sum_sq_probs": (lambda: torch.log(torch.linalg.vecdot(probs, probs))),
        "mean_logits": (lambda: logits.mean(dim=-1)),
        # the first maximum, as TRL counts it: a tie with an earlier token is not a top-1 prediction
        "is_top1": (lambda: logits.argmax(dim=-1) == targets),
    }
    extra = {name: compute() for name, compute in fields.items() if name in outputs}
    return target_logit - log_z, extra, probs


class FrozenHeadLogProbs(torch.autograd.Function):
    """The same signature and outputs as TRL's _ChunkedLogProbFunction, for a frozen head without bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=("log_probs",)):
        ctx.set_materialize_grads(False)
        compute_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        head = weight.to(compute_dtype)
        count = hidden.shape[0]
        logprobs = torch.empty(count, dtype=torch.float32)
        extra = {name: [] for name in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1") if name in outputs}
        jacobian = torch.empty(hidden.shape, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        with torch.autocast("cpu", enabled=False):
            for start in range(0, count, TOKEN_CHUNK):
                end = min(start + TOKEN_CHUNK, count)
                chunk = hidden[start:end].to(compute_dtype)
                logits = (chunk @ head.t()).float()
                chunk_logprobs, chunk_extra, probs = _softmax_stats(logits, targets[start:end], outputs)
                logprobs[start:end] = chunk_logprobs
                for name, values in chunk_extra.items():
                    extra[name].append(values)
                if jacobian is not None:
                    # d log p(target) / d hidden = W^T (onehot - p), kept per token
                    probs[torch.arange(end - start), targets[start:end]] -= 1
                    jacobian[start:end] = -(probs.to(compute_dtype) @ head).float()
                del logits, probs
        ctx.save_for_backward(hidden, weight, jacobian)  # hidden and weight: for an entropy gradient only
        ctx.compute_dtype = compute_dtype
        results = {name: torch.cat(values) for name, values in extra.items()}
        for name in ("log_sum_sq_probs", "mean_logits", "is_top1"):
            if name in results:
                ctx.mark_non_differentiable(results[name])
        return (logprobs, results.get("entropy"), results.get("log_sum_sq_probs"), results.get("mean_logits"),
                results.get("is_top1"))

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, jacobian = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32)
        if grad_logprobs is not None:
            grad_hidden += grad_logprobs.float().unsqueeze(-1) * jacobian
        if grad_entropy is not None:
            # d entropy / d logits_j = -p_j (log p_j + entropy): not kept, so computed again here
            head = weight.to(ctx.compute_dtype)
            with torch.autocast("cpu", enabled=False):
                for start in range(0, hidden.shape[0], TOKEN_CHUNK):
                    end = min(start + TOKEN_CHUNK, hidden.shape[0])
                    logits = (hidden[start:end].to(ctx.compute_dtype) @ head.t()).float()
                    log_probs = torch.log_softmax(logits, dim=-1)
                    probs = log_probs.exp()
                    entropy = -torch.linalg.vecdot(probs, log_probs)
                    grad_logits = -grad_entropy[start:end].float().unsqueeze(-1) * probs * (log_probs + entropy.unsqueeze(-1))
                    grad_hidden[start:end] += (grad_logits.to(ctx.compute_dtype) @ head).float()
        return (grad_hidden.to(hidden.dtype),) + (None,) * 8


class ChunkedLogProbs:
    """What TRL's fused LM head calls in place of its _ChunkedLogProbFunction: FrozenHeadLogProbs where it
    applies (CPU, frozen head, no bias, plain logits), TRL's own function elsewhere."""

    trl_function = None  # set by use_frozen_head_logprobs

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        applies = (hidden.device.type == "cpu" and not weight.requires_grad and bias is None
                   and temperature == 1.0 and final_logit_softcapping is None and logit_scale == 1.0)
        function = FrozenHeadLogProbs if applies else ChunkedLogProbs.trl_function
        return function.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                              logit_scale, outputs)


def use_frozen_head_logprobs() -> None:
    """Route TRL's fused LM head through ChunkedLogProbs (once; TRL's function is kept for the rest)."""
    import trl.trainer.utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is not ChunkedLogProbs:
        ChunkedLogProbs.trl_function = trl_utils._ChunkedLogProbFunction
        trl_utils._ChunkedLogProbFunction = ChunkedLogProbs
