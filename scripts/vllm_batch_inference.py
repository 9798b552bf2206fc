"""Answer a question file with vLLM (CUDA GPUs; run it with .venv-vllm/bin/python after
`bash scripts/setup_env.sh --vllm`). Same questions and output rows as inference.py:

    .venv-vllm/bin/python scripts/vllm_batch_inference.py --model outputs/pipeline/dpo-merged \
        --data_file data/eval/questions.jsonl --output_file outputs/answers_vllm.jsonl

The prompts are rendered by vLLM with the chat template saved in the model's tokenizer (the one training
used). Greedy by default; --temperature, --top_p, --max_new_tokens, --tensor_parallel_size as in vLLM.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt.data import read_queries  # noqa: E402  (the repository root is on the path only now)
from medgpt.errors import InputError, exit_on_input_error  # noqa: E402
from medgpt.outputs import atomic_write_text, check_output_file  # noqa: E402


@exit_on_input_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, help="a merged model folder")
    parser.add_argument("--data_file", required=True)
    parser.add_argument("--output_file", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--tensor_parallel_size", type=int, default=1)
    parser.add_argument("--max_model_len", type=int, default=4096)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise InputError("not a model folder (merge an adapter with scripts/merge_lora.sh first)", args.model)
    if not os.path.isfile(args.data_file):
        raise InputError("no such file", args.data_file)
    queries = read_queries(args.data_file)  # checked before the model loads
    with_tools = next((query["source"] for query in queries if query["tools"]), None)
    if with_tools:  # vLLM's chat() takes one tools list for the whole batch
        raise InputError.at("questions with tools are answered by inference.py, not this script", with_tools)
    check_output_file(args.output_file)
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise InputError("vllm is not installed here: run this with .venv-vllm/bin/python "
                         "(bash scripts/setup_env.sh --vllm, CUDA GPUs only)") from None

    llm = LLM(model=args.model, tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens)
    outputs = llm.chat([query["messages"] for query in queries], sampling)
    rows = []
    for query, output in zip(queries, outputs, strict=True):
        row = {"input": query["messages"][-1]["content"], "output": output.outputs[0].text.strip()}
        if query["reference"] is not None:
            row["reference"] = query["reference"]
        rows.append(row)
    atomic_write_text(args.output_file, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"{len(rows)} answers written to {os.path.abspath(args.output_file)}")


if __name__ == "__main__":
    sys.exit(main())
