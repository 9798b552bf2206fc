"""Writing results safely: output locations checked before any work, files written under a temporary
name and renamed into place, so an interrupted run leaves the old result or the new one, never a mix."""

import contextlib
import fnmatch
import glob
import json
import logging
import os
import re
import shutil
import tempfile

from medgpt.errors import InputError

logger = logging.getLogger(__name__)

# Files that make a folder load as a model or as an adapter, with its tokenizer. A model written into a
# folder replaces all of them: an adapter left beside merged weights would be loaded instead of them, old
# shards beside new ones would be mixed in, an old chat template would be read with the new tokenizer.
CONFIG_FILES = ("config.json", "adapter_config.json")
MODEL_FILE_PATTERNS = CONFIG_FILES + (
    "generation_config.json", "adapter_model.safetensors", "adapter_model.bin",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json", "value_head.safetensors",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
MODEL_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
WEIGHT_PATTERNS = MODEL_WEIGHT_PATTERNS + ("adapter_model.bin",)
STAGING_NAME = ".partial"
# Read once, while the process has one thread: os.umask can only be read by setting it.
UMASK = os.umask(0o022)
os.umask(UMASK)


def is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILE_PATTERNS)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output_dir(path: str | None, flag: str = "--output_dir") -> None:
    """A folder that is (or can become) a writable folder: not a file, not below a file."""
    if not path:
        raise InputError(f"{flag} is required")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} is an existing file, not a folder", path)
    _check_creatable(path, flag, path)


def _check_creatable(folder: str, flag: str, path: str) -> None:
    """`folder` exists as a writable folder, or can be made below one (nothing on the way is a file)."""
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise InputError(f"{flag} cannot be created: {existing} is a file", path)
    if not os.access(existing, os.W_OK):
        raise InputError(f"{flag} is not writable", path)


def same_folder(first: str | None, second: str | None) -> bool:
    """Whether two paths name the same existing folder (through links and relative paths too)."""
    if not first or not second or not (os.path.isdir(first) and os.path.isdir(second)):
        return False
    return os.path.samefile(first, second)


def check_output_file(path: str | None, flag: str = "--output_file") -> None:
    """A file path that can be written: not a folder, its folder not a file."""
    if not path:
        raise InputError(f"{flag} is required")
    if os.path.isdir(path):
        raise InputError(f"{flag} is a folder, not a file", path)
    _check_creatable(os.path.dirname(os.path.abspath(path)), flag, path)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside `path`; on success it replaces `path` in one rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        with open(temporary, mode, encoding=encoding if "b" not in mode else None) as stream:
            yield stream
        os.chmod(temporary, 0o666 & ~UMASK)  # mkstemp makes it private; results are ordinary files
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_write(path) as stream:
        stream.write(text)


def check_new_output_file(path: str | None, overwrite: bool, flag: str = "--output_file") -> None:
    """check_output_file, and refuse to replace results already there unless asked (before any work)."""
    check_output_file(path, flag)
    if os.path.exists(path) and os.path.getsize(path) > 0 and not overwrite:
        raise InputError(f"{flag} already holds results: pass --overwrite True to replace them", path)


def jsonl_text(records) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_jsonl(path: str, records) -> None:
    """One JSON object a line, UTF-8 as is (Chinese stays readable), replacing `path` in one rename."""
    atomic_write_text(path, jsonl_text(records))


def write_jsonl_files(contents: dict[str, list]) -> None:
    """Files that belong together (a training and a validation split), each as write_jsonl: all are
    complete under temporary names before the first is renamed into place, so a run stopped while
    writing leaves all the old files, not a new one beside an old one."""
    with contextlib.ExitStack() as stack:
        for path, records in contents.items():
            stack.enter_context(atomic_write(path)).write(jsonl_text(records))


def staging_path(output_dir: str) -> str:
    """A fixed temporary folder inside `output_dir`: on its file system (so files are renamed, not copied,
    into place), in a folder already checked as writable, the same name in every process of a run."""
    return os.path.join(output_dir, STAGING_NAME)


@contextlib.contextmanager
def staging_folder(output_dir: str):
    """`staging_path(output_dir)`, emptied first. Removed once the block succeeds; kept when it fails, so a
    model that was written but could not be moved into place is not lost (the next save clears it)."""
    staging = staging_path(output_dir)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        if os.path.isdir(staging) and os.listdir(staging):
            logger.error("the new files are left in %s", staging)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def has_weights(folder: str, patterns=WEIGHT_PATTERNS) -> bool:
    """Whether `folder` holds weight files (a model's or an adapter's; MODEL_WEIGHT_PATTERNS: a model's)."""
    return any(glob.glob(os.path.join(folder, pattern)) for pattern in patterns)


def publish_model_folder(staging: str, output_dir: str) -> list[str]:
    """Move a model written into `staging` into `output_dir`. Files of an earlier model or adapter there
    (config, weights, shards, adapter and tokenizer files) are replaced or removed; everything else of the
    user's (logs, checkpoints, notes) stays. Returns the earlier files removed.

    The new model is complete in `staging` before anything in `output_dir` changes. The earlier config
    files go first and the new ones come last, so a run stopped halfway leaves a folder that no loader
    takes for a model (and the whole new model still in `staging`), never old and new weights mixed."""
    if not has_weights(staging):
        raise RuntimeError(f"no model weights were written into {staging}: {output_dir} is left as it was")
    new_files = set(os.listdir(staging))
    earlier = [name for name in os.listdir(output_dir) if is_model_file(name)]
    for name in sorted(earlier, key=lambda n: n not in CONFIG_FILES):  # configs first
        os.remove(os.path.join(output_dir, name))
    for name in sorted(new_files, key=lambda n: n in CONFIG_FILES):  # configs last
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    return sorted(set(earlier) - new_files)


# ---- training checkpoints ----


def checkpoint_step(path: str) -> int | None:
    found = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    return int(found.group(1)) if found else None


def list_checkpoints(output_dir: str) -> list[str]:
    """The checkpoint-N folders in output_dir, oldest (smallest N) first."""
    folders = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*")) if os.path.isdir(p) and checkpoint_step(p) is not None]
    return sorted(folders, key=checkpoint_step)


def is_trainer_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "trainer_state.json"))


def resolve_checkpoint(value, output_dir: str, is_checkpoint=is_trainer_checkpoint) -> str | None:
    """--resume_from_checkpoint: a checkpoint folder, True/last for the newest one in output_dir, or
    False/none for none; checked before any work."""
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() in ("true", "last"):
        found = [p for p in list_checkpoints(output_dir) if is_checkpoint(p)]
        if not found:
            raise InputError("no checkpoint-N folder to resume from (--resume_from_checkpoint)", output_dir)
        return found[-1]
    if not os.path.isdir(value):
        raise InputError("checkpoint folder not found (--resume_from_checkpoint)", value)
    if not is_checkpoint(value):
        raise InputError("not a checkpoint folder (--resume_from_checkpoint): no trainer_state.json or its companions", value)
    return value
