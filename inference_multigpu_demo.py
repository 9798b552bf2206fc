"""Answer a file of questions with several processes, one model copy each (data parallel).

    torchrun --nproc_per_node 4 inference_multigpu_demo.py --base_model outputs/sft-merged \
        --data_file data/eval/questions.jsonl --output_file outputs/answers.jsonl

Each process takes every N-th question not answered yet and writes its answers, batch by batch, to its own
`OUTPUT.rankR.partial` file; rank 0 then writes OUTPUT in input order, every question exactly once
(rows as inference.py writes them, plus "index", the question's position in the file). Run it again with the
same --output_file after an interruption, or after deleting rows, and only the missing questions are
answered. On GPUs each process uses its own (LOCAL_RANK); without GPUs, CPU processes talk over gloo.
"""

import glob
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from medgpt.arguments import at_least, parse_args, setup_logging
from medgpt.errors import InputError, exit_on_input_error
from medgpt.data import read_queries
from medgpt.generation import ChatModel, GenerationArguments, InferenceModelArguments, answer_rows
from medgpt.outputs import atomic_write_text, check_output_file

logger = logging.getLogger(__name__)


@dataclass
class MultiInferenceArguments:
    data_file: str = field(default=None, metadata={"help": "Questions to answer (the formats of inference.py)."})
    output_file: str = field(default=None, metadata={"help": "JSON Lines answers, in input order; resumed if present."})
    batch_size: int = field(default=8, metadata={"help": "Questions generated together in each process."})

    def __post_init__(self):
        at_least(self, "batch_size", 1)
        if not self.data_file or not self.output_file:
            raise InputError("pass --data_file and --output_file")


def partial_files(path: str) -> list[str]:
    return sorted(glob.glob(glob.escape(path) + ".rank*.partial"))


def read_answered(path: str, queries: list[dict]) -> dict[int, dict]:
    """Rows already answered (in OUTPUT and in partial files of an interrupted run), by question index.
    A row counts only if its index and question still match the data file."""
    rows = {}
    for candidate in [path] + partial_files(path):
        if not os.path.isfile(candidate):
            continue
        with open(candidate, encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption: answered again
                index = row.get("index") if isinstance(row, dict) else None
                if isinstance(index, int) and 0 <= index < len(queries) and \
                        row.get("input") == queries[index]["messages"][-1]["content"]:
                    rows[index] = row
    return rows


def shard_answers(chat_model, queries, pending, args, generation, rank: int) -> None:
    """Answer this rank's questions, appending each batch to its partial file as soon as it is done."""
    partial = f"{args.output_file}.rank{rank}.partial"
    with open(partial, "a", encoding="utf-8") as handle:
        for start in range(0, len(pending), args.batch_size):
            indices = pending[start : start + args.batch_size]
            rows = answer_rows(chat_model, [queries[i] for i in indices], generation, args.batch_size)
            for index, row in zip(indices, rows):
                handle.write(json.dumps({"index": index, **row}, ensure_ascii=False) + "\n")
            handle.flush()


@exit_on_input_error
def main(argv=None):
    model_args, args, generation = parse_args((InferenceModelArguments, MultiInferenceArguments, GenerationArguments), argv)
    setup_logging()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = None
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    elif distributed:
        device = "cpu"
    if not os.path.isfile(args.data_file):
        raise InputError("no such file", args.data_file)
    queries = read_queries(args.data_file)
    check_output_file(args.output_file)
    answered = read_answered(args.output_file, queries)
    pending = [index for index in range(len(queries)) if index not in answered]
    if distributed:
        dist.barrier()  # every rank has read the same answered set before any rank writes more
    if rank == 0:
        logger.info("%d questions, %d answered before, %d to answer on %d process(es)",
                    len(queries), len(answered), len(pending), world)
    if pending:
        chat_model = ChatModel(model_args, queries_to_check=[queries[i] for i in pending], device=device)
        shard_answers(chat_model, queries, pending[rank::world], args, generation, rank)
    if distributed:
        dist.barrier()  # every partial file is complete
    if rank == 0:
        rows = read_answered(args.output_file, queries)
        missing = [index for index in range(len(queries)) if index not in rows]
        if missing:
            raise InputError(f"{len(missing)} questions have no answer (first: line of question {missing[0] + 1}); "
                             "run again to answer them")
        atomic_write_text(args.output_file, "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in range(len(queries))))
        for path in partial_files(args.output_file):
            os.remove(path)
        logger.info("%d answers written to %s", len(rows), os.path.abspath(args.output_file))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
