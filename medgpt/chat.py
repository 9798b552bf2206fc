"""One object that renders and splits conversations for a tokenizer: a template from template.py, or
(`--template_name auto`) the model's own Jinja chat_template."""

import logging

from medgpt.errors import InputError

logger = logging.getLogger(__name__)


class ChatFormat:
    def __init__(self, tokenizer, template=None):
        self.tokenizer = tokenizer
        self.template = template

    @classmethod
    def for_model(cls, template_name: str, tokenizer) -> "ChatFormat":
        if template_name == "auto":
            if not tokenizer.chat_template:
                from template import TEMPLATES

                raise InputError(
                    f"the model has no chat_template: pass --template_name (one of {', '.join(sorted(TEMPLATES))})"
                )
            return cls(tokenizer)
        from template import get_template

        try:
            return cls(tokenizer, get_template(template_name))
        except ValueError as error:
            raise InputError(str(error)) from None

    @property
    def name(self) -> str:
        return self.template.name if self.template else "the model's own chat_template"

    def _special_tokens(self) -> dict:
        return {"bos_token": self.tokenizer.bos_token or "", "eos_token": self.tokenizer.eos_token or ""}

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        if self.template is not None:
            return self.template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                        **self._special_tokens())
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def split(self, messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, str]]:
        """(prompt, answer) text pairs, one per assistant turn; joined they give `render(messages)`."""
        if self.template is not None:
            return self.template.split(messages, tools=tools, **self._special_tokens())
        # A Jinja template has no split of its own: render the conversation up to each answer, with and
        # without the answer, and take the difference. That holds for templates that never rewrite
        # earlier turns; any other is refused rather than trained on mismatched text.
        pairs, done = [], ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:index], add_generation_prompt=True, tools=tools)
            through = self.render(messages[: index + 1], tools=tools)
            if not (before.startswith(done) and through.startswith(before)):
                raise InputError(
                    "the model's chat_template rewrites earlier turns, so prompt and answer cannot be told apart: "
                    "pass --template_name"
                )
            pairs.append((before[len(done):], through[len(before):]))
            done = through
        return pairs

    def parse_tool_calls(self, text: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
        """(content, calls) of a generated answer; a model's own chat_template comes with no parser."""
        return self.template.parse_tool_calls(text, tools) if self.template is not None else (text, [])

    def install(self) -> None:
        """Make the tokenizer carry this format, so every model saved with it renders what training saw."""
        if self.template is not None:
            self.tokenizer.chat_template = self.template.to_jinja()

    def stop_token_ids(self) -> list[int]:
        """Token ids that end an answer: the tokenizer's eos and the template's end-of-turn markers."""
        ids = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        stop_words = self.template.stop_words if self.template is not None else []
        for word in stop_words:
            word = word.replace("{eos}", self.tokenizer.eos_token or "")
            token_ids = self.tokenizer.convert_tokens_to_ids([word]) if word else []
            if token_ids and token_ids[0] is not None and token_ids[0] != self.tokenizer.unk_token_id:
                ids.append(token_ids[0])
        return sorted(set(ids))
