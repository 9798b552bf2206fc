"""The model that writes data for the data tools (QA pairs, rephrased cases): a local model folder through
the toolkit's generation engine, or any OpenAI-compatible endpoint (openai_api.py, vLLM, a hosted model)."""

import logging
import os
from dataclasses import dataclass, field

from medgpt.arguments import at_least, require
from medgpt.errors import InputError

logger = logging.getLogger(__name__)


@dataclass
class WriterModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A local model folder (merged model, or a base with --lora_model) that writes the data."})
    lora_model: str | None = field(default=None, metadata={"help": "A LoRA adapter on --model_name_or_path."})
    template_name: str = field(default="auto", metadata={
        "help": "Chat template of the local model: auto (its own) or a name from template.py."})
    api_base: str | None = field(default=None, metadata={
        "help": "Instead of a local model: an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."})
    api_key: str | None = field(default=None, metadata={"help": "The endpoint's key; default: $OPENAI_API_KEY."})
    model: str | None = field(default=None, metadata={"help": "The endpoint's model name (with --api_base)."})
    concurrency: int = field(default=4, metadata={"help": "Requests in flight at once to the endpoint."})
    retries: int = field(default=3, metadata={"help": "Retries of a failed endpoint request, with backoff."})
    timeout: float = field(default=120.0, metadata={
        "help": "Seconds to wait for the endpoint to connect or to send the next piece of an answer."})
    batch_size: int = field(default=8, metadata={
        "help": "Prompts per round: decoded together by a local model; progress is saved after each round."})
    max_new_tokens: int = field(default=384, metadata={"help": "Longest answer the model may write."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0: greedy (repeatable)."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Local model: above 1 discourages loops."})

    def __post_init__(self):
        if self.api_base and self.model_name_or_path:
            raise InputError("give either --model_name_or_path (a local model) or --api_base (an endpoint), not both")
        if self.api_base and not self.model:
            raise InputError("--api_base needs --model: the endpoint's model name")
        for name in ("concurrency", "batch_size", "max_new_tokens"):
            at_least(self, name, 1)
        at_least(self, "retries", 0)
        at_least(self, "temperature", 0)
        require(self.timeout > 0, "timeout", "must be positive", self.timeout)

    @property
    def configured(self) -> bool:
        return bool(self.api_base or self.model_name_or_path)

    def describe(self) -> str:
        """What writes the data, as recorded with the results (a resumed run must use the same)."""
        if self.api_base:
            return f"{self.model} at {self.api_base.rstrip('/')}"
        return os.path.abspath(self.model_name_or_path) + (f" + {os.path.abspath(self.lora_model)}" if self.lora_model else "")


class WriterModel:
    """One answer per conversation, in order, from the local model or the endpoint."""

    def __init__(self, args: WriterModelArguments):
        self.args = args
        if args.api_base:
            from medgpt.evaluation import EndpointGenerator

            logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
            self.endpoint = EndpointGenerator(args.api_base, args.api_key or os.environ.get("OPENAI_API_KEY"),
                                              args.model, args.concurrency, args.timeout, args.retries,
                                              args.temperature)
            self.endpoint.served_models()  # unreachable, or refusing the key: one line now, before any work
            self.chat_model = None
        else:
            from medgpt.generation import ChatModel, InferenceModelArguments

            self.endpoint = None
            self.chat_model = ChatModel(InferenceModelArguments(
                base_model=args.model_name_or_path, lora_model=args.lora_model, template_name=args.template_name))

    def write(self, conversations: list[list[dict]]) -> list[str]:
        """Answers to a round of conversations. A failing endpoint is retried with backoff, then an InputError."""
        if self.endpoint is not None:
            return [answer.text for answer in self.endpoint.generate(conversations, self.args.max_new_tokens)]
        from medgpt.generation import GenerationArguments

        settings = GenerationArguments(max_new_tokens=self.args.max_new_tokens, temperature=self.args.temperature,
                                       repetition_penalty=self.args.repetition_penalty)
        return self.chat_model.answer_batch(conversations, settings, self.args.batch_size)

    def close(self) -> None:
        if self.chat_model is not None:
            from medgpt.evaluation import release

            release(self.chat_model)
