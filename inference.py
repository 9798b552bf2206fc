"""Chat with a trained model, or answer a file of questions in batches.

    python inference.py --base_model outputs/merged --interactive                 # streaming chat
    python inference.py --base_model MODEL --lora_model outputs/sft \
        --data_file data/eval/questions.jsonl --output_file outputs/answers.jsonl  # batch

The prompt is rendered with the chat_template saved with the model (the one it was trained with) unless
--template_name names another. Batch queries: .txt (one question a line) or .jsonl/.json records with
"question"/"query"/"prompt"/"instruction", or "conversations"/"messages" ending with a user turn.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

from medgpt.arguments import at_least, parse_args, setup_logging
from medgpt.errors import InputError, exit_on_input_error
from medgpt.data import read_queries
from medgpt.generation import ChatModel, GenerationArguments, InferenceModelArguments, answer_rows
from medgpt.outputs import atomic_write_text, check_output_file

logger = logging.getLogger(__name__)


@dataclass
class InferenceArguments:
    interactive: bool = field(default=False, metadata={"help": "Multi-turn streaming chat in the terminal."})
    data_file: str | None = field(default=None, metadata={"help": "Questions to answer in batches."})
    output_file: str | None = field(default=None, metadata={"help": "JSON Lines answers; default: print them."})
    batch_size: int = field(default=8, metadata={"help": "Questions generated together (left-padded)."})

    def __post_init__(self):
        at_least(self, "batch_size", 1)


def answer_file(chat_model: ChatModel, queries: list[dict], args: InferenceArguments, generation: GenerationArguments) -> None:
    rows = answer_rows(chat_model, queries, generation, args.batch_size)
    if args.output_file:
        atomic_write_text(args.output_file, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        logger.info("%d answers written to %s", len(rows), os.path.abspath(args.output_file))
    else:
        for row in rows:
            print(f"Q: {row['input']}\nA: {row['output']}\n")


def chat_loop(chat_model: ChatModel, generation: GenerationArguments) -> None:
    print("Type a message. 'clear' starts a new conversation, 'exit' quits.")
    history: list[dict] = []
    while True:
        try:
            text = input("\nUser: ").strip()
        except EOFError:
            break
        if text in ("exit", "quit"):
            break
        if text == "clear":
            history = []
            print("(conversation cleared)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("Assistant: ", end="", flush=True)
        pieces = []
        for piece in chat_model.stream_answer(history, generation):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


@exit_on_input_error
def main(argv=None):
    model_args, inference_args, generation = parse_args((InferenceModelArguments, InferenceArguments, GenerationArguments), argv)
    setup_logging()
    if inference_args.interactive == bool(inference_args.data_file):
        raise InputError("pass either --interactive True or --data_file FILE")
    if inference_args.data_file and not os.path.isfile(inference_args.data_file):
        raise InputError("no such file", inference_args.data_file)
    # Questions and the output location are checked before minutes of loading and generating, not after.
    queries = read_queries(inference_args.data_file) if inference_args.data_file else []
    if inference_args.output_file:
        if inference_args.interactive:
            raise InputError("--output_file goes with --data_file, not --interactive")
        check_output_file(inference_args.output_file)
        if os.path.exists(inference_args.output_file) and os.path.samefile(inference_args.output_file, inference_args.data_file):
            raise InputError("--output_file is the --data_file: the answers would replace the questions", inference_args.output_file)
    chat_model = ChatModel(model_args, queries_to_check=queries)
    if inference_args.interactive:
        chat_loop(chat_model, generation)
    else:
        answer_file(chat_model, queries, inference_args, generation)


if __name__ == "__main__":
    sys.exit(main())
