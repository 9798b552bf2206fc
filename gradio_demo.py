"""A chat page for a trained model (Gradio), answering as it generates.

    python gradio_demo.py --base_model outputs/sft-merged            # http://127.0.0.1:7860
    python gradio_demo.py --base_model BASE --lora_model outputs/sft --port 7861 --share True

Every browser tab has its own conversation; tabs that ask at the same time are answered together by the
serving engine (medgpt/engine.py). A history too long for the context loses its oldest exchanges, never the
system prompt.
"""

import logging
import sys
from dataclasses import dataclass, field

from medgpt.api import check_port_free
from medgpt.arguments import at_least, parse_args, setup_logging
from medgpt.encoding import drop_oldest_exchange
from medgpt.engine import EngineBusy, SamplingParams
from medgpt.errors import exit_on_input_error
from medgpt.generation import ChatModel, InferenceModelArguments

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a careful medical assistant. Answer clearly; advise seeing a doctor when it may be serious."
NOTICE = ("For research and education only: not medical advice. Consult a qualified clinician for diagnosis and "
          "treatment.")


@dataclass
class DemoArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    share: bool = field(default=False, metadata={"help": "Also publish a temporary public gradio.live link."})
    max_batch_size: int = field(default=8, metadata={"help": "Conversations answered together."})
    context_length: int | None = field(default=None, metadata={"help": "Prompt + answer tokens; default: the model's."})

    def __post_init__(self):
        at_least(self, "port", 0)
        at_least(self, "max_batch_size", 1)


def fit_to_context(chat_model: ChatModel, messages: list[dict], room: int) -> list[int]:
    """The prompt's token ids, after dropping the oldest exchanges until it leaves `room` tokens for the
    answer (the system prompt and the newest question always stay)."""
    while True:
        ids = chat_model.tokenizer(chat_model.prompt(messages), add_special_tokens=False)["input_ids"]
        shorter = drop_oldest_exchange(messages) if len(ids) > room else None
        if shorter is None:
            return ids
        messages = shorter


def build_demo(chat_model: ChatModel, engine, max_batch_size: int):
    import gradio as gr

    def respond(message, history, system_prompt, temperature, top_p, max_new_tokens, seed):
        messages = ([{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else [])
        messages += [{"role": turn["role"], "content": _text(turn["content"])} for turn in history]
        messages.append({"role": "user", "content": message})
        max_new_tokens = int(max_new_tokens)
        ids = fit_to_context(chat_model, messages, engine.context_length - max_new_tokens)
        params = SamplingParams(max_new_tokens=engine.max_new_tokens(len(ids), max_new_tokens),
                                temperature=float(temperature), top_p=float(top_p),
                                seed=int(seed) if seed is not None and seed >= 0 else None)
        answer = ""
        try:
            for piece in engine.stream(ids, params):  # closing the page or Stop cancels the request
                answer += piece
                yield answer
        except EngineBusy as error:
            raise gr.Error(str(error)) from None

    return gr.ChatInterface(
        respond,
        title="MedGPT",
        description=NOTICE,
        additional_inputs=[
            gr.Textbox(DEFAULT_SYSTEM, label="System prompt"),
            gr.Slider(0, 1.5, value=0.7, step=0.05, label="Temperature (0: greedy)"),
            gr.Slider(0.05, 1, value=0.9, step=0.05, label="top_p"),
            gr.Slider(16, 2048, value=512, step=16, label="Max new tokens"),
            gr.Number(-1, precision=0, label="Seed (-1: random)"),
        ],
        concurrency_limit=max_batch_size,  # tabs generate at once; the engine batches them
    )


def _text(content) -> str:
    """A chat history entry's text (Gradio may hold a list of text parts)."""
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


@exit_on_input_error
def main(argv=None):
    model_args, demo_args = parse_args((InferenceModelArguments, DemoArguments), argv)
    setup_logging()
    if demo_args.port:
        check_port_free(demo_args.host, demo_args.port)  # before minutes of loading
    chat_model = ChatModel(model_args)
    engine = chat_model.start_engine(demo_args.context_length, demo_args.max_batch_size)
    demo = build_demo(chat_model, engine, demo_args.max_batch_size)
    demo.queue(default_concurrency_limit=demo_args.max_batch_size)
    demo.launch(server_name=demo_args.host, server_port=demo_args.port, share=demo_args.share, show_error=True)


if __name__ == "__main__":
    sys.exit(main())
