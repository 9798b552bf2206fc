"""Writing results safely: output locations checked before any work, files written under a temporary
name and renamed into place, so an interrupted run leaves the old result or the new one, never a mix."""

import contextlib
import fnmatch
import os
import shutil
import tempfile

from medgpt.errors import InputError

# Files that make a folder load as a model or as an adapter. A model written into a folder replaces all of
# them: an adapter left beside merged weights would be loaded instead of them (and old shards beside new
# ones would be mixed in).
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
    "value_head.safetensors",
)


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
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise InputError(f"{flag} cannot be created: {existing} is a file", path)
    if not os.access(existing, os.W_OK):
        raise InputError(f"{flag} is not writable", path)


def check_output_file(path: str | None, flag: str = "--output_file") -> None:
    """A file path that can be written: not a folder, its folder not a file."""
    if not path:
        raise InputError(f"{flag} is required")
    if os.path.isdir(path):
        raise InputError(f"{flag} is a folder, not a file", path)
    existing = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(existing):
        raise InputError(f"{flag} cannot be created: {existing} is a file", path)
    if not os.access(existing, os.W_OK):
        raise InputError(f"{flag} is not writable", path)


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
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes it private; results are ordinary files
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    with atomic_write(path) as stream:
        stream.write(text)


def staging_path(output_dir: str) -> str:
    """A fixed temporary folder beside `output_dir` (same file system, so its files can be renamed into
    place; the same name in every process of a distributed run)."""
    absolute = os.path.abspath(output_dir)
    return os.path.join(os.path.dirname(absolute), f".{os.path.basename(absolute)}.partial")


@contextlib.contextmanager
def staging_folder(output_dir: str):
    """`staging_path(output_dir)`, emptied first and removed afterwards whatever happens."""
    staging = staging_path(output_dir)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_model_folder(staging: str, output_dir: str) -> list[str]:
    """Move a model written into `staging` into `output_dir`. Files of an earlier model or adapter there
    (weights, shards, adapter files) that the new model does not have are removed; everything else of the
    user's (logs, checkpoints, notes) stays. Returns the stale files removed.

    The new model is complete in `staging` before anything in `output_dir` changes; a new folder is
    renamed into place whole."""
    if not os.path.exists(output_dir):
        os.replace(staging, output_dir)
        return []
    new_files = set(os.listdir(staging))
    stale = [name for name in os.listdir(output_dir) if is_model_file(name) and name not in new_files]
    # Stale weights go first: were the run stopped midway, the folder would hold no model that loads,
    # rather than an old adapter quietly shadowing the new weights.
    for name in stale:
        os.remove(os.path.join(output_dir, name))
    for name in sorted(new_files, key=lambda n: (n == "config.json" or n == "adapter_config.json")):
        # config files last: a folder is recognized as a model by them, after its weights are in place
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    return stale
