"""Serve a trained model through an OpenAI-compatible HTTP API.

    python openai_api.py --base_model outputs/sft-merged --port 8000
    python openai_api.py --base_model BASE --lora_modules doctor=outputs/sft nurse=outputs/sft2 --api_key KEY

Then point any OpenAI client at http://127.0.0.1:8000/v1 (`model` picks the served model or an adapter).
Concurrent requests are answered together by one engine (medgpt/engine.py); see README, "Serving".
"""

import logging
import os
import sys
from dataclasses import dataclass, field

from medgpt.arguments import at_least, parse_args, setup_logging
from medgpt.errors import InputError, exit_on_input_error
from medgpt.generation import ChatModel, InferenceModelArguments
from medgpt.modeling import check_adapter_path, load_adapter

logger = logging.getLogger(__name__)


@dataclass
class ApiArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    served_model_name: str | None = field(default=None, metadata={"help": "Model id clients ask for; default: "
                                                                          "the model folder's name."})
    lora_modules: list[str] = field(default_factory=list, metadata={"help": "Extra LoRA adapters as name=path, "
                                                                            "chosen by a request's `model`."})
    api_key: str | None = field(default=None, metadata={"help": "Require 'Authorization: Bearer KEY' "
                                                                "(or set MEDGPT_API_KEY)."})
    max_batch_size: int = field(default=8, metadata={"help": "Requests decoded together."})
    max_queue: int = field(default=64, metadata={"help": "Waiting requests beyond this are answered 503."})
    context_length: int | None = field(default=None, metadata={"help": "Prompt + answer tokens; default: the "
                                                                       "model's."})
    max_request_bytes: int = field(default=4 << 20, metadata={"help": "Largest request body accepted; larger "
                                                                      "ones are answered 413."})

    def __post_init__(self):
        at_least(self, "port", 0)
        at_least(self, "max_batch_size", 1)
        at_least(self, "max_queue", 1)
        at_least(self, "max_request_bytes", 1)
        self.api_key = self.api_key or os.environ.get("MEDGPT_API_KEY") or None
        adapters = {}
        for entry in self.lora_modules:
            name, _, path = entry.partition("=")
            if not name or not path:
                raise InputError(f"--lora_modules takes name=path, got '{entry}'")
            adapters[name] = check_adapter_path(path, "--lora_modules")
        self.adapters = adapters


@exit_on_input_error
def main(argv=None):
    from medgpt.api import ModelService, check_port_free, serve

    model_args, api_args = parse_args((InferenceModelArguments, ApiArguments), argv)
    setup_logging()
    if api_args.port:
        check_port_free(api_args.host, api_args.port)  # before minutes of loading
    chat_model = ChatModel(model_args)
    for name, path in api_args.adapters.items():
        chat_model.model = load_adapter(chat_model.model, path, "--lora_modules", name)
    engine = chat_model.start_engine(api_args.context_length, api_args.max_batch_size, api_args.max_queue)
    name = api_args.served_model_name or os.path.basename(os.path.normpath(model_args.lora_model or model_args.base_model))
    service = ModelService(engine, chat_model.chat_format, chat_model.tokenizer, name,
                           {adapter: adapter for adapter in api_args.adapters}, api_args.api_key,
                           api_args.max_request_bytes)
    logger.info("serving %s on http://%s:%d/v1", ", ".join(service.models), api_args.host, api_args.port)
    serve(service, api_args.host, api_args.port)


if __name__ == "__main__":
    sys.exit(main())
