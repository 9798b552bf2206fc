"""Loading a trained model for inference and generating answers: batched (left padding) or streamed."""

import logging
from dataclasses import dataclass, field

import torch

from medgpt.arguments import at_least, require
from medgpt.chat import ChatFormat
from medgpt.errors import InputError
from medgpt.modeling import (bitsandbytes_config, check_adapter_path, check_model_path, hub_kwargs, load_adapter,
                             open_tokenizer, resolve_dtype, tokenizer_folder)

logger = logging.getLogger(__name__)


@dataclass
class GenerationArguments:
    max_new_tokens: int = field(default=512, metadata={"help": "Longest answer in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 means greedy decoding."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling probability mass."})
    top_k: int = field(default=40, metadata={"help": "Sample among the k most likely tokens (0: no limit)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Above 1 discourages repeating tokens."})
    seed: int = field(default=42, metadata={"help": "Random seed for sampling."})

    def __post_init__(self):
        at_least(self, "max_new_tokens", 1)
        at_least(self, "temperature", 0)
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        at_least(self, "top_k", 0)
        require(self.repetition_penalty > 0, "repetition_penalty", "must be positive", self.repetition_penalty)

    def sampling(self, **extra):
        """These settings as the engine's SamplingParams."""
        from medgpt.engine import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, repetition_penalty=self.repetition_penalty, **extra)


@dataclass
class InferenceModelArguments:
    base_model: str = field(default=None, metadata={"help": "A model folder (merged, or the base of --lora_model)."})
    lora_model: str | None = field(default=None, metadata={"help": "A LoRA adapter folder applied on the base model."})
    template_name: str = field(
        default="auto", metadata={"help": "auto: the chat_template saved with the model; or a name from template.py."}
    )
    torch_dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the weights in 4 bit (bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the weights in 8 bit (bitsandbytes)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the model."})
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt for every conversation."})


@dataclass
class Generated:
    """One generated answer; times in seconds from when its batch was submitted."""

    text: str
    completion_tokens: int
    first_token_seconds: float
    total_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed after the first token (the prompt's prefill is in first_token_seconds)."""
        decoding = self.total_seconds - self.first_token_seconds
        return (self.completion_tokens - 1) / decoding if self.completion_tokens > 1 and decoding > 0 else 0.0


class ChatModel:
    """A model, its tokenizer and the chat format it was trained with, ready to answer conversations."""

    def __init__(self, args: InferenceModelArguments, queries_to_check: list[dict] = (), device: str | None = None):
        """`queries_to_check` ({"messages", "tools", "source"}) are rendered before the weights load, so a
        conversation the template cannot render fails at once, naming its line. `device` puts the whole model
        on one device (a data-parallel process); by default it is spread over the GPUs there are."""
        from transformers import AutoModelForCausalLM

        base = check_model_path(args.base_model, "--base_model")
        if args.lora_model:
            check_adapter_path(args.lora_model, "--lora_model")
        tokenizer_source = tokenizer_folder(base, args.lora_model)
        # Left padding: generation continues from the right end of every row.
        self.tokenizer = open_tokenizer(tokenizer_source, "left",
                                        **hub_kwargs(tokenizer_source, trust_remote_code=args.trust_remote_code))
        self.chat_format = ChatFormat.for_model(args.template_name, self.tokenizer)
        self.system_prompt = args.system_prompt
        for query in queries_to_check:
            self.prompt(query["messages"], query["tools"], source=query["source"])
        self._engine_instance = None  # started on first use by answer_batch / stream_answer

        dtype = resolve_dtype(args.torch_dtype)
        kwargs = dict(hub_kwargs(base, trust_remote_code=args.trust_remote_code), dtype=dtype)
        quantization = bitsandbytes_config(args.load_in_4bit, args.load_in_8bit, dtype)
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        if device is not None:
            kwargs["device_map"] = {"": device}
        elif torch.cuda.is_available():
            kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        if args.lora_model:
            model = load_adapter(model, args.lora_model, "--lora_model")
            if not (args.load_in_4bit or args.load_in_8bit):
                model = model.merge_and_unload()  # same outputs, faster generation
        self.model = model.eval()
        self.stop_token_ids = self.chat_format.stop_token_ids()
        logger.info("model %s%s ready, template: %s", base, f" + {args.lora_model}" if args.lora_model else "", self.chat_format.name)

    def start_engine(self, context_length: int | None = None, max_batch_size: int = 8, max_queue: int = 64,
                     **options):
        """The serving engine over this model (after any adapters were added to `self.model`)."""
        from medgpt.engine import GenerationEngine

        context = context_length or getattr(self.model.config, "max_position_embeddings", None) or 2048
        return GenerationEngine(self.model.eval(), self.tokenizer, self.stop_token_ids, context, max_batch_size,
                                max_queue, **options)

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def prompt(self, messages: list[dict], tools: list[dict] | None = None, source: str | None = None) -> str:
        """The text a conversation is answered from; a conversation the template refuses is an InputError
        (located at the record's "path:line" `source` when given)."""
        from template import TemplateError

        try:
            return self.chat_format.render(self.with_system(messages), add_generation_prompt=True, tools=tools)
        except TemplateError as error:
            raise (InputError.at(str(error), source) if source else InputError(str(error))) from None

    def _engine(self, batch_size: int | None = None):
        """The one engine of batch answers and streaming (one worker owns the model); `batch_size` sets how
        many requests it decodes together from now on."""
        if self._engine_instance is None:
            self._engine_instance = self.start_engine(max_batch_size=batch_size or 1, max_queue=1_000_000,
                                                      gather_seconds=0)
        if batch_size:
            self._engine_instance.max_batch_size = batch_size
        return self._engine_instance

    def _ids(self, messages: list[dict], tools=None) -> list[int]:
        return self.tokenizer(self.prompt(messages, tools), add_special_tokens=False)["input_ids"]

    def answer_batch(self, conversations: list[list[dict]], generation: GenerationArguments, batch_size: int = 8,
                     tools: list | None = None) -> list[str]:
        """One answer per conversation, in the same order, `batch_size` decoded together by the engine;
        `tools`, when given, holds each conversation's tool definitions (or None). With tools, special tokens
        such as Mistral's [TOOL_CALLS] stay in the text for the tool-call parser."""
        return [answer.text for answer in self.generate_batch(conversations, generation, batch_size, tools)]

    def generate_batch(self, conversations: list[list[dict]], generation: GenerationArguments, batch_size: int = 8,
                       tools: list | None = None) -> list["Generated"]:
        """answer_batch with each answer's token count and timings."""
        import queue
        import time

        from tqdm.auto import tqdm

        from medgpt.engine import Finished

        engine, events = self._engine(batch_size), queue.Queue()
        tools = tools or [None] * len(conversations)
        texts = [[] for _ in conversations]
        answers: list[Generated | None] = [None] * len(conversations)
        started, first_piece = time.perf_counter(), [None] * len(conversations)
        for index, (messages, definitions) in enumerate(zip(conversations, tools, strict=True)):
            ids = self._ids(messages, definitions)
            params = generation.sampling(keep_special_tokens=bool(definitions))
            params.max_new_tokens = max(1, engine.max_new_tokens(len(ids), params.max_new_tokens))
            engine.submit(ids, params, lambda event, i=index: events.put((i, event, time.perf_counter())))
        finished = 0
        with tqdm(total=len(conversations), desc="generating", unit="answer") as progress:
            while finished < len(conversations):
                index, event, when = events.get()
                if not isinstance(event, Finished):
                    texts[index].append(event)
                    first_piece[index] = first_piece[index] or when
                elif event.reason == "error":
                    raise RuntimeError(f"generation failed: {event.error}")
                else:
                    first = (first_piece[index] or when) - started
                    answers[index] = Generated("".join(texts[index]).strip(), event.completion_tokens, first,
                                               when - started)
                    finished += 1
                    progress.update()
        return answers

    def stream_answer(self, messages: list[dict], generation: GenerationArguments):
        """Yield the answer to one conversation piece by piece as it is generated."""
        yield from self._engine().stream(self._ids(messages), generation.sampling())


def answer_rows(chat_model: ChatModel, queries: list[dict], generation: GenerationArguments, batch_size: int) -> list[dict]:
    """One output row per query, in order: {"input", "output"}, plus "tool_calls" when the query has tools
    and "reference" when it carries one."""
    answers = chat_model.answer_batch([q["messages"] for q in queries], generation, batch_size,
                                      tools=[q["tools"] for q in queries])
    rows = []
    for query, answer in zip(queries, answers, strict=True):
        row = {"input": query["messages"][-1]["content"], "output": answer}
        if query["tools"]:  # the calls the answer makes, read back in the template's format
            row["output"], row["tool_calls"] = chat_model.chat_format.parse_tool_calls(answer, query["tools"])
        if query["reference"] is not None:
            row["reference"] = query["reference"]
        rows.append(row)
    return rows
