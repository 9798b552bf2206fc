"""Measure the toolkit on this machine and write the figures to docs/benchmarks.md.

    python scripts/benchmark.py [--steps 12] [--repeats 2] [--stage_steps 10] [--device cpu|cuda]
                                [--model DIR --template NAME] [--skip_sft] [--skip_plain_trl]
                                [--skip_stages] [--skip_pipeline]

For a model (by default the embedded SmolLM2-135M-Instruct; LoRA r=8 on all linear layers) it runs SFT
and DPO through their run scripts at the scripts' defaults and "naive" (the way reference scripts train),
interleaved, plus a bare PyTorch loop over the default SFT run's batches as the ceiling and TRL's
SFTTrainer at its own defaults as the reference; it records non-padding tokens per second and the peak
resident memory of each run (and on a GPU its peak GPU memory). Then a few steps of the other alignment
stages (RM, ORPO, GRPO, PPO), then the whole demo pipeline. Not a test: figures depend on the machine, so
they are written down with the date, the machine and the command.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from medgpt.default_model import DEFAULT_MODEL_DIR, prepare_default_model  # noqa: E402


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak resident memory of it and its children in GiB)."""
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, **(env or {})))
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss + sum(c.memory_info().rss for c in watched.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    if process.returncode != 0:
        raise SystemExit(f"benchmark command failed ({process.returncode}): {' '.join(command)}")
    return time.time() - started, peak / 2**30


# The way reference scripts train: random order, each batch of 4 padded to its longest row, fp32, LoRA
# dropout 0.05, glibc's malloc, the library's attention (on a GPU: no packing, no Liger). Given after the
# run script's own flags, they override them.
NAIVE_FLAGS = ["--train_sampling_strategy", "random", "--lora_dropout", "0.05", "--bf16", "False", "--fp16", "False",
               "--attn_implementation", "sdpa", "--use_liger_kernel", "False"]
NAIVE_ENV = {"MEDGPT_ALLOCATOR": "system", "MICRO_BATCH_SIZE": "4"}


@dataclass
class Model:
    """The model measured and its chat template."""
    path: str = DEFAULT_MODEL_DIR
    template: str = "chatml"

    def flags(self) -> list[str]:
        return ["--model", self.path, "--template", self.template]


def stage_script_run(name: str, script: str, model: Model, steps: int, naive: bool) -> dict:
    """One run of scripts/run_sft.sh or run_dpo.sh, at its defaults or naive."""
    output_dir = os.path.join(REPO, "outputs", "benchmark", name.split(",")[0].replace(" ", "_"))
    env = {"MODEL": model.path, "TEMPLATE": model.template, "OUTPUT_DIR": output_dir, "MAX_STEPS": str(steps),
           "PYTHON": sys.executable, "BATCH_SIZE": "4", **(NAIVE_ENV if naive else {})}
    wall, peak = run_measured(["bash", script, "--report_to", "none",
                               *(NAIVE_FLAGS if naive else [])], env)
    results = read_json(os.path.join(output_dir, "all_results.json"))
    return {"run": name, "tokens_per_s": results["train_tokens_per_second"], "tokens": results["train_tokens"],
            "peak_rss_gib": round(peak, 2), "peak_gpu_gib": results.get("train_peak_gpu_memory_gib"),
            "wall_s": round(wall, 1)}


def bare_loop(model: Model, steps: int, result_path: str) -> None:
    """The ceiling for SFT: forward, backward and AdamW over the default run's batches (the same rows,
    grouped by length, 2 rows x 2 accumulated, the machine's default precision) and nothing else."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from medgpt.arguments import default_precision
    from medgpt.chat import ChatFormat
    from medgpt.data import DataReport, load_records
    from medgpt.encoding import IGNORE_INDEX, encode_conversations
    from medgpt.evaluation import right_padded
    from medgpt.modeling import open_tokenizer

    tokenizer = open_tokenizer(model.path)
    report = DataReport("train")
    records = load_records(os.path.join(REPO, "data", "finetune"), "conversation", report, False)
    rows = encode_conversations(records, ChatFormat.for_model(model.template, tokenizer), tokenizer, 512, False, report, False)
    torch.manual_seed(42)
    order = list(LengthGroupedSampler(4, lengths=[len(row["input_ids"]) for row in rows]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    network = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).to(device)
    network.config.use_cache = False
    network = get_peft_model(network, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
    network.train()
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=2e-4)
    bf16 = default_precision()[0] == "bf16"

    def padded(indices: list[int]) -> dict:
        input_ids, attention_mask = right_padded([rows[i]["input_ids"] for i in indices], tokenizer.pad_token_id, device)
        labels, _ = right_padded([rows[i]["labels"] for i in indices], IGNORE_INDEX, device)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    tokens, started = 0, time.perf_counter()
    for step in range(steps):
        for micro in range(2):
            first = (step * 4 + micro * 2) % len(order)
            batch = padded(order[first:first + 2])
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = network(**batch).loss / 2
            loss.backward()
            tokens += int(batch["attention_mask"].sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    write_result(result_path, {"tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1)})


def plain_trl(model: Model, steps: int, result_path: str) -> None:
    """The reference a user would otherwise run: TRL's SFTTrainer at its own defaults (its precision,
    gradient checkpointing, padding, loss on every token, its model loading) on the same model and
    conversations, with only what the comparison fixes set: LoRA r=8 on all linear layers, 4 rows per
    step, max length 512, the number of steps (and, on a CPU, the flag TRL needs to run there)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from medgpt.data import DataReport, load_records

    records = load_records(os.path.join(REPO, "data", "finetune"), "conversation", DataReport("train"), False)
    dataset = Dataset.from_list([{"messages": record["messages"]} for record in records])
    config = SFTConfig(output_dir=os.path.join(REPO, "outputs", "benchmark", "plain_trl"), max_steps=steps,
                       per_device_train_batch_size=4, max_length=512, report_to="none", save_strategy="no",
                       include_num_input_tokens_seen="non_padding",
                       use_cpu=not torch.cuda.is_available())  # without it TRL refuses to start on a CPU
    trainer = SFTTrainer(model=model.path, args=config, train_dataset=dataset, peft_config=LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    metrics = trainer.train().metrics
    tokens = trainer.state.num_input_tokens_seen
    write_result(result_path, {"tokens": tokens, "tokens_per_s": round(tokens / metrics["train_runtime"], 1)})


def write_result(path: str, result: dict) -> None:
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def own_process_run(mode: str, name: str, model: Model, steps: int) -> dict:
    """bare_loop or plain_trl in a process of its own (which moves to tcmalloc, as the training scripts do)."""
    result_path = os.path.join(REPO, "outputs", "benchmark", f"{mode}.json")
    os.makedirs(os.path.dirname(result_path), exist_ok=True)
    wall, peak = run_measured([sys.executable, os.path.abspath(__file__), f"--{mode}", result_path,
                               "--steps", str(steps), *model.flags()])
    return {"run": name, **read_json(result_path), "peak_rss_gib": round(peak, 2), "wall_s": round(wall, 1)}


def interleaved(runs: dict, repeats: int) -> dict:
    """Each run `repeats` times, alternating A B A B, so that the machine slowing down or speeding up
    during the benchmark weighs on every run alike."""
    results = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return results


def summary_row(name: str, results: list[dict]) -> dict:
    """Mean tokens/s over the repeats (each one listed), the highest peak memory."""
    rates = [r["tokens_per_s"] for r in results]
    gpu = [r["peak_gpu_gib"] for r in results if r.get("peak_gpu_gib") is not None]
    return {"run": name, "tokens_per_s": round(sum(rates) / len(rates), 1), "each": " / ".join(map(str, rates)),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in results), "peak_gpu_gib": max(gpu) if gpu else None,
            "tokens": results[0]["tokens"], "wall_s": round(sum(r["wall_s"] for r in results) / len(results), 1)}


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


LORA = ["--use_peft", "True", "--target_modules", "all", "--lora_rank", "8", "--lora_dropout", "0"]


def stage_runs(model: Model, steps: int) -> list[dict]:
    """A few steps of each alignment stage; throughput as each stage counts it."""
    out = os.path.join(REPO, "outputs", "benchmark", "stages")
    common = ["--model_name_or_path", model.path, "--template_name", model.template, *LORA]
    trainer_flags = ["--max_steps", str(steps), "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none"]
    pairs = ["--train_file_dir", "data/reward", "--max_length", "384", "--max_prompt_length", "192",
             "--per_device_train_batch_size", "4", *trainer_flags]
    rows = []
    for name, script, extra, unit in [
        ("reward modeling", "reward_modeling.py", pairs, "pairs"),
        ("ORPO", "orpo_training.py", pairs, "pairs"),
        ("GRPO (4 answers x 2 questions per step, 64 new tokens)", "grpo_training.py",
         ["--train_file_dir", "data/grpo", "--num_generations", "4", "--max_completion_length", "64",
          "--per_device_train_batch_size", "8", *trainer_flags], "answers"),
    ]:
        output_dir = os.path.join(out, script.split("_")[0])
        wall, peak = run_measured([sys.executable, script, *common, *extra, "--output_dir", output_dir])
        results = read_json(os.path.join(output_dir, "all_results.json"))
        rows.append({
            "run": name, "rate": f"{results['train_samples_per_second']:.2f} {unit}/s",
            "tokens_per_s": results.get("train_tokens_per_second", "-"), "peak_rss_gib": round(peak, 2), "wall_s": round(wall, 1),
        })
    output_dir = os.path.join(out, "ppo")
    wall, peak = run_measured([
        sys.executable, "ppo_training.py", *common, "--train_file_dir", "data/grpo", "--reward_funcs", "model",
        "--reward_model_path", os.path.join(out, "reward"), "--rollout_batch_size", "8", "--per_device_train_batch_size", "4",
        "--ppo_epochs", "2", "--max_new_tokens", "64", "--max_steps", str(max(1, steps // 2)), "--report_to", "none",
        "--output_dir", output_dir,
    ])
    with open(os.path.join(output_dir, "ppo_log.jsonl"), encoding="utf-8") as handle:
        log = [json.loads(line) for line in handle]
    answers = 8 * len(log)
    tokens = sum(entry["answer_length"] * 8 for entry in log)
    rows.append({
        "run": "PPO (8 answers per iteration, 64 new tokens, 2 epochs)", "rate": f"{answers / log[-1]['seconds']:.2f} answers/s",
        "tokens_per_s": round(tokens / log[-1]["seconds"], 1), "peak_rss_gib": round(peak, 2), "wall_s": round(wall, 1),
    })
    return rows


def gpu_share(run: dict, reference: dict) -> str:
    """`; peak GPU memory 41% of its`, where both runs were on a GPU."""
    if run.get("peak_gpu_gib") and reference.get("peak_gpu_gib"):
        return f"; peak GPU memory {100 * run['peak_gpu_gib'] / reference['peak_gpu_gib']:.0f}% of its"
    return ""


def cpu_model() -> str:
    """The CPU's name and whether it multiplies bf16 natively: figures differ a lot between CPUs."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            info = handle.read()
    except OSError:
        return platform.processor() or "CPU"
    from medgpt.arguments import cpu_bf16_units

    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    units = cpu_bf16_units(info)
    return f"{name} ({'with ' + ' and '.join(units) if units else 'without AVX-512 BF16 or AMX'})"


def table(rows: list[dict], gpu: bool) -> list[str]:
    gpu_header, gpu_rule = (" peak GPU memory (GiB) |", "---|") if gpu else ("", "")
    lines = [f"| run | tokens/s (mean) | each run | peak RSS (GiB) |{gpu_header} tokens | wall (s) |",
             f"|---|---|---|---|{gpu_rule}---|---|"]
    for r in rows:
        gpu_cell = f" {r['peak_gpu_gib'] if r.get('peak_gpu_gib') is not None else '-'} |" if gpu else ""
        lines.append(f"| {r['run']} | {r['tokens_per_s']} | {r.get('each', r['tokens_per_s'])} | {r['peak_rss_gib']} |"
                     f"{gpu_cell} {r['tokens']} | {r['wall_s']} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per SFT and DPO run (4 rows each)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each SFT/DPO setting, interleaved")
    parser.add_argument("--stage_steps", type=int, default=10, help="steps per run of the other alignment stages")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where to train (default: cuda where a GPU is visible, else cpu)")
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR,
                        help="model folder to measure (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--template", default="chatml", help="its chat template (template.py name, or auto)")
    parser.add_argument("--skip_sft", action="store_true", help="do not measure SFT and DPO")
    parser.add_argument("--skip_stages", action="store_true", help="do not measure RM, ORPO, GRPO and PPO")
    parser.add_argument("--skip_pipeline", action="store_true", help="do not time scripts/run_pipeline.sh")
    parser.add_argument("--skip_plain_trl", action="store_true", help="do not run TRL's SFTTrainer at its defaults")
    parser.add_argument("--bare_loop", metavar="RESULT_JSON", help=argparse.SUPPRESS)  # the ceiling's own process
    parser.add_argument("--plain_trl", metavar="RESULT_JSON", help=argparse.SUPPRESS)  # the reference's own process
    args = parser.parse_args()
    model = Model(args.model, args.template)
    if args.bare_loop or args.plain_trl:
        from medgpt.allocator import relaunch_with_tcmalloc

        relaunch_with_tcmalloc(__name__)  # the same allocator as the default run
        if args.plain_trl:
            return plain_trl(model, args.steps, args.plain_trl)
        return bare_loop(model, args.steps, args.bare_loop)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no GPU is visible")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if model.path == DEFAULT_MODEL_DIR:
        prepare_default_model(DEFAULT_MODEL_DIR)
    elif not os.path.isfile(os.path.join(model.path, "config.json")):
        raise SystemExit(f"error: {model.path}: not a model folder (no config.json)")

    lines = []
    if not args.skip_sft:
        runs = {
            "naive": lambda: stage_script_run("SFT naive", "scripts/run_sft.sh", model, args.steps, naive=True),
            "default": lambda: stage_script_run("SFT default", "scripts/run_sft.sh", model, args.steps, naive=False),
            "bare": lambda: own_process_run("bare_loop", "bare PyTorch loop, same batches", model, args.steps),
            "plain trl": lambda: own_process_run("plain_trl", "TRL SFTTrainer defaults", model, args.steps),
            "dpo naive": lambda: stage_script_run("DPO naive", "scripts/run_dpo.sh", model, args.steps, naive=True),
            "dpo default": lambda: stage_script_run("DPO default", "scripts/run_dpo.sh", model, args.steps, naive=False),
        }
        if args.skip_plain_trl:
            del runs["plain trl"]
        rows = {name: summary_row(name, results) for name, results in interleaved(runs, args.repeats).items()}
        naive, default, bare = rows["naive"], rows["default"], rows["bare"]
        dpo_naive, dpo_default = rows["dpo naive"], rows["dpo default"]
        naive["run"] = "naive: random order, batch 4 padded to its longest row, fp32, LoRA dropout 0.05, glibc malloc"
        default["run"] = ("default (`scripts/run_sft.sh`): grouped by length, 2 rows x 2 accumulated, tcmalloc"
                          + ("; on the GPU its kernel defaults (see the log)" if device == "cuda" else ""))
        bare["run"] = "bare PyTorch loop on the default run's batches (forward, backward, AdamW)"
        dpo_naive["run"] = "DPO naive: random order, batch 4 pairs, fp32, LoRA dropout 0.05, glibc malloc"
        dpo_default["run"] = "DPO default (`scripts/run_dpo.sh`): grouped by length, 2 pairs x 2 accumulated, tcmalloc"
        sft_rows = [naive, default, bare]
        comparisons = [
            f"- default / naive SFT: {default['tokens_per_s'] / naive['tokens_per_s']:.2f}x",
            f"- default SFT / bare loop: {100 * default['tokens_per_s'] / bare['tokens_per_s']:.0f}%",
        ]
        if "plain trl" in rows:
            trl_row = rows["plain trl"]
            trl_row["run"] = ("TRL SFTTrainer at its defaults (its precision, gradient checkpointing, padding, loss "
                              "on every token), batch 4, same LoRA")
            sft_rows.append(trl_row)
            comparisons.append(f"- default / plain TRL SFT: {default['tokens_per_s'] / trl_row['tokens_per_s']:.2f}x"
                               + gpu_share(default, trl_row))
        comparisons.append(f"- default DPO / default SFT: {100 * dpo_default['tokens_per_s'] / default['tokens_per_s']:.0f}%; "
                           f"default / naive DPO: {dpo_default['tokens_per_s'] / dpo_naive['tokens_per_s']:.2f}x")
        lines += [
            f"SFT on data/finetune (`scripts/run_sft.sh`, max length 512) and DPO on data/reward (`scripts/run_dpo.sh`, "
            f"max length 384), from {os.path.basename(os.path.normpath(model.path))}, LoRA r=8 on all linear layers, "
            "4 rows (pairs) per step, "
            f"{args.steps} steps a run, {args.repeats} runs of each, interleaved; precision: the machine's default "
            "unless noted; tokens are non-padding tokens (DPO: both answers and their prompt):\n",
            *table([*sft_rows, dpo_naive, dpo_default], gpu=device == "cuda"),
            "",
            *comparisons,
        ]
    if not args.skip_stages:
        stages = stage_runs(model, args.stage_steps)
        lines += [
            f"\nThe other stages from the same model, LoRA r=8, the machine's default precision, "
            f"{args.stage_steps} steps each "
            f"({max(1, args.stage_steps // 2)} PPO iterations); pairs: batch 4, max length 384:\n",
            "| stage | samples/s | tokens/s | peak RSS (GiB) | wall (s) |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r['run']} | {r['rate']} | {r['tokens_per_s']} | {r['peak_rss_gib']} | {r['wall_s']} |" for r in stages]
    if not args.skip_pipeline:
        pipeline_s, pipeline_peak = run_measured(
            ["bash", "scripts/run_pipeline.sh"], {"OUT": "outputs/benchmark/pipeline", "PYTHON": sys.executable,
                                                  "MODEL": model.path, "TEMPLATE": model.template}
        )
        lines.append(f"\nDemo pipeline (`bash scripts/run_pipeline.sh`, model already prepared): {pipeline_s:.0f} s wall, "
                     f"peak RSS {pipeline_peak:.2f} GiB.")

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU used"
    machine = (f"{platform.machine()} {cpu_model()}, {psutil.cpu_count()} CPU cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}")
    command = " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]])
    text = "\n".join([f"\n## {datetime.date.today().isoformat()} — {machine}, torch {torch.__version__}\n",
                      f"`{command}`\n", *lines]) + "\n"
    print(text)
    path = os.path.join(REPO, "docs", "benchmarks.md")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("# Benchmarks\n\nWritten by `python scripts/benchmark.py`; newest last.\n")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
