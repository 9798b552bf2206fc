"""Measure the toolkit on this machine and write the figures to docs/benchmarks.md.

    python scripts/benchmark.py [--steps 20] [--stage_steps 10] [--skip_sft] [--skip_stages] [--skip_pipeline]

For the default model (SmolLM2-135M-Instruct, LoRA r=8 on all linear layers) it runs SFT on the sample
data with and without padding-free packing and records non-padding tokens per second and the peak
resident memory of the training process; then a few steps of each alignment stage (RM, DPO, ORPO, GRPO,
PPO) with their throughput; then times the whole demo pipeline. Not a test: figures depend
on the machine, so they are written down with the date and the machine they were taken on.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

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


def sft_run(name: str, steps: int, extra: list[str]) -> dict:
    output_dir = os.path.join(REPO, "outputs", "benchmark", name.replace(" ", "_").replace(",", ""))
    command = [
        sys.executable, "supervised_finetuning.py", "--model_name_or_path", DEFAULT_MODEL_DIR,
        "--template_name", "chatml", "--train_file_dir", "data/finetune", "--model_max_length", "512",
        "--use_peft", "True", "--target_modules", "all", "--lora_rank", "8", "--lora_dropout", "0",
        "--per_device_train_batch_size", "4", "--max_steps", str(steps), "--logging_steps", "5",
        "--save_strategy", "no", "--report_to", "none", "--output_dir", output_dir, *extra,
    ]
    wall, peak = run_measured(command)
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    with open(os.path.join(output_dir, "all_results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    return {
        "run": name,
        "steps": state["global_step"],
        "tokens": state["num_input_tokens_seen"],
        "tokens_per_s": results["train_tokens_per_second"],
        "peak_rss_gib": round(peak, 2),
        "wall_s": round(wall, 1),
    }


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


LORA = ["--use_peft", "True", "--target_modules", "all", "--lora_rank", "8", "--lora_dropout", "0"]


def stage_runs(steps: int) -> list[dict]:
    """A few steps of each alignment stage from the default model; throughput as each stage counts it."""
    out = os.path.join(REPO, "outputs", "benchmark", "stages")
    common = ["--model_name_or_path", DEFAULT_MODEL_DIR, "--template_name", "chatml", *LORA]
    trainer_flags = ["--max_steps", str(steps), "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none"]
    pairs = ["--train_file_dir", "data/reward", "--max_length", "384", "--max_prompt_length", "192",
             "--per_device_train_batch_size", "4", *trainer_flags]
    rows = []
    for name, script, extra, unit in [
        ("reward modeling", "reward_modeling.py", pairs, "pairs"),
        ("DPO", "dpo_training.py", pairs, "pairs"),
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="SFT steps per measured run")
    parser.add_argument("--stage_steps", type=int, default=10, help="steps per alignment stage run")
    parser.add_argument("--skip_sft", action="store_true", help="do not measure SFT")
    parser.add_argument("--skip_stages", action="store_true", help="do not measure the alignment stages")
    parser.add_argument("--skip_pipeline", action="store_true", help="do not time scripts/run_pipeline.sh")
    args = parser.parse_args()
    prepare_default_model(DEFAULT_MODEL_DIR)

    rows = [] if args.skip_sft else [
        # fp32 spelled out: where the CPU computes bf16 natively, bf16 autocast is the default
        sft_run("padded batches, random order", args.steps, ["--bf16", "False"]),
        sft_run("padded batches, grouped by length", args.steps, ["--train_sampling_strategy", "group_by_length", "--bf16", "False"]),
        sft_run("padding-free packing", args.steps, ["--packing", "True", "--bf16", "False"]),
        sft_run("grouped by length, bf16 autocast", args.steps, ["--train_sampling_strategy", "group_by_length", "--bf16", "True"]),
    ]
    stages = [] if args.skip_stages else stage_runs(args.stage_steps)
    pipeline_s = None
    if not args.skip_pipeline:
        pipeline_s, pipeline_peak = run_measured(
            ["bash", "scripts/run_pipeline.sh"], {"OUT": "outputs/benchmark/pipeline", "PYTHON": sys.executable}
        )

    machine = (f"{platform.machine()} {cpu_model()}, {psutil.cpu_count()} CPU cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU")
    lines = [f"\n## {datetime.date.today().isoformat()} — {machine}, torch {__import__('torch').__version__}\n"]
    if rows:
        lines += [
            "SFT on data/finetune, SmolLM2-135M-Instruct, LoRA r=8 on all linear layers, batch 4, max length 512, "
            f"fp32 unless noted, {args.steps} steps:\n",
            "| run | tokens/s (non-padding) | peak RSS (GiB) | tokens | wall (s) |",
            "|---|---|---|---|---|",
        ]
    lines += [f"| {r['run']} | {r['tokens_per_s']} | {r['peak_rss_gib']} | {r['tokens']} | {r['wall_s']} |" for r in rows]
    if stages:
        lines += [
            f"\nAlignment stages from the same model, LoRA r=8, fp32, {args.stage_steps} steps each "
            f"({max(1, args.stage_steps // 2)} PPO iterations); pairs: batch 4, max length 384:\n",
            "| stage | samples/s | tokens/s | peak RSS (GiB) | wall (s) |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r['run']} | {r['rate']} | {r['tokens_per_s']} | {r['peak_rss_gib']} | {r['wall_s']} |" for r in stages]
    if pipeline_s is not None:
        lines.append(f"\nDemo pipeline (`bash scripts/run_pipeline.sh`, model already prepared): {pipeline_s:.0f} s wall, "
                     f"peak RSS {pipeline_peak:.2f} GiB.")
    text = "\n".join(lines) + "\n"
    print(text)
    path = os.path.join(REPO, "docs", "benchmarks.md")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("# Benchmarks\n\nWritten by `python scripts/benchmark.py`; newest last.\n")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
