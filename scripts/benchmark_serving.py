"""Load benchmark of the OpenAI-compatible API: streaming clients at several concurrency levels, against our
openai_api.py and, in the same run, `transformers serve` on the same model.

    python scripts/benchmark_serving.py                       # the default model, 1 4 8 16 clients
    python scripts/benchmark_serving.py --model outputs/pipeline/dpo-merged --clients 1 8 --requests 4

Each client sends --requests streaming chat completions one after another (greedy, --max_tokens tokens,
usage included) with questions from data/eval/questions.jsonl. Reported per server and level: requests/s,
output tokens/s over the whole level, p50/p95 time to first token. Results are printed as a Markdown
table and written to --output (JSON).
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: the server exited (status {process.returncode}); see its log")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"error: the server did not answer {url} within {timeout:.0f} s")


def questions() -> list[str]:
    with open(os.path.join(REPO, "data", "eval", "questions.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line)["question"] for line in handle if line.strip()]


async def one_client(client, model: str, prompts: list[str], max_tokens: int, results: list) -> None:
    for prompt in prompts:
        start, first, tokens = time.perf_counter(), None, 0
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        results.append({"ttft": first if first is not None else time.perf_counter() - start, "tokens": tokens})


async def run_level(base_url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="benchmark", max_retries=0, timeout=1800)
    pool, results = questions(), []
    start = time.perf_counter()
    await asyncio.gather(*(one_client(client, model, [pool[(c * requests + r) % len(pool)] for r in range(requests)],
                                      max_tokens, results) for c in range(clients)))
    elapsed = time.perf_counter() - start
    await client.close()
    ttfts = sorted(result["ttft"] for result in results)
    return {"clients": clients, "requests": len(results), "seconds": round(elapsed, 2),
            "requests_per_s": round(len(results) / elapsed, 3),
            "output_tokens_per_s": round(sum(result["tokens"] for result in results) / elapsed, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3)}


def serve(name: str, model: str, port: int, log) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if name == "ours":
        command = [sys.executable, os.path.join(REPO, "openai_api.py"), "--base_model", model, "--port", str(port),
                   "--served_model_name", "model", "--max_batch_size", "16"]
    else:
        command = [os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", model, "--port", str(port),
                   "--host", "127.0.0.1", "--continuous-batching"] + (["--device", "cpu"] if name.endswith("cpu") else [])
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--servers", nargs="+", default=["ours", "transformers"], choices=["ours", "transformers"])
    parser.add_argument("--output", default="outputs/benchmark_serving.json")
    args = parser.parse_args()
    if args.model == "models/SmolLM2-135M-Instruct" and not os.path.isfile(os.path.join(args.model, "config.json")):
        subprocess.run([sys.executable, os.path.join(REPO, "scripts", "prepare_default_model.py"), args.model], check=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "model": args.model, "max_tokens": args.max_tokens, "servers": {}}
    for name in args.servers:
        port = free_port()
        with open(os.path.abspath(args.output) + f".{name}.log", "w") as log:
            process = serve(name, os.path.abspath(args.model), port, log)
            try:
                wait_ready(f"http://127.0.0.1:{port}/health", process)
                model = "model" if name == "ours" else os.path.abspath(args.model)
                asyncio.run(run_level(f"http://127.0.0.1:{port}/v1", model, 1, 1, 8))  # warm-up
                report["servers"][name] = [asyncio.run(run_level(f"http://127.0.0.1:{port}/v1", model, clients,
                                                                 args.requests, args.max_tokens))
                                           for clients in args.clients]
            finally:
                process.terminate()
                process.wait(timeout=60)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print("| server | clients | requests/s | output tokens/s | TTFT p50 (s) | TTFT p95 (s) |\n|---|---|---|---|---|---|")
    for name, levels in report["servers"].items():
        for level in levels:
            print(f"| {name} | {level['clients']} | {level['requests_per_s']} | {level['output_tokens_per_s']} | "
                  f"{level['ttft_p50_s']} | {level['ttft_p95_s']} |")


if __name__ == "__main__":
    main()
