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

from medgpt.errors import InputError, disk_full_error, is_disk_full

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


def check_not_replacing(output: str | None, inputs, flag: str = "--output_dir") -> None:
    """Refuse an output folder that is one of the folders a run reads (`inputs`: (flag, path) pairs):
    the results written there would replace what is being read."""
    for input_flag, path in inputs:
        if same_folder(output, path):
            raise InputError(f"{flag} is the {input_flag} folder, which the results would replace: write elsewhere",
                             output)


def check_output_file(path: str | None, flag: str = "--output_file") -> None:
    """A file path that can be written: not a folder, its folder not a file."""
    if not path:
        raise InputError(f"{flag} is required")
    if os.path.isdir(path):
        raise InputError(f"{flag} is a folder, not a file", path)
    if os.path.exists(path) and not os.path.isfile(path):
        # A device or a pipe: results are written beside the target and renamed over it, which would
        # replace the device node itself.
        raise InputError(f"{flag} is not a regular file", path)
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
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        if isinstance(error, Exception) and is_disk_full(error):
            # A write error names no file (or the temporary one): name the result that could not be written.
            raise disk_full_error(path) from error
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
    except BaseException as error:
        if isinstance(error, Exception) and is_disk_full(error, output_dir):
            shutil.rmtree(staging, ignore_errors=True)  # half written: nothing in it is worth the space
            raise disk_full_error(output_dir) from error
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


TRAINER_STATE = "trainer_state.json"  # the trainer writes it last into a checkpoint


def _has_optimizer_state(path: str) -> bool:
    """optimizer.pt (or .bin), FSDP's optimizer_* folders, or DeepSpeed's global_step* folder."""
    entries = [os.path.join(path, name) for name in os.listdir(path) if "optimizer" in name or name.startswith("global_step")]
    return any(os.path.isdir(entry) or (os.path.isfile(entry) and os.path.getsize(entry) > 0) for entry in entries)


def _has_checkpoint_weights(path: str) -> bool:
    return has_weights(path) or any(name.startswith(("pytorch_model_fsdp", "global_step")) for name in os.listdir(path))


def checkpoint_global_step(path: str) -> int:
    """The step a checkpoint was saved at, from its trainer_state.json; ValueError when that is damaged."""
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as handle:
            step = json.load(handle)["global_step"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{TRAINER_STATE} is damaged (not the JSON a trainer writes)") from None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{TRAINER_STATE} is damaged (global_step {step!r})")
    return step


def checkpoint_problem(path: str, required_files: tuple[str, ...] = ()) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None. The trainer writes trainer_state.json last,
    so a save cut off by a crash, a kill or a full disk lacks it; the rest finds damage done later.
    A --save_only_model checkpoint has no optimizer state and cannot be resumed either."""
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        return f"no {TRAINER_STATE}"
    try:
        checkpoint_global_step(path)
    except ValueError as error:
        return str(error)
    except OSError as error:
        return f"cannot read {TRAINER_STATE}: {error.strerror}"
    if not _has_checkpoint_weights(path):
        return "no model weights"
    if not _has_optimizer_state(path):
        return "no optimizer state (optimizer.pt)"
    missing = [name for name in required_files if not os.path.isfile(os.path.join(path, name))]
    if missing:
        return f"no {', '.join(missing)}"
    return None


def resolve_checkpoint(value, output_dir: str, required_files: tuple[str, ...] = ()) -> str | None:
    """--resume_from_checkpoint: a checkpoint folder, True/last for the newest complete one in output_dir
    (damaged newer ones are skipped with a warning), or False/none for none; checked before any work."""
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() in ("true", "last"):
        found = list_checkpoints(output_dir)
        if not found:
            raise InputError("no checkpoint-N folder to resume from (--resume_from_checkpoint)", output_dir)
        for folder in reversed(found):
            problem = checkpoint_problem(folder, required_files)
            if problem is None:
                return folder
            logger.warning("skipping the damaged checkpoint %s (%s): trying the one before it", folder, problem)
        raise InputError(f"no complete checkpoint to resume from (--resume_from_checkpoint): all {len(found)} "
                         "checkpoint-N folders are damaged", output_dir)
    if not os.path.isdir(value):
        raise InputError("checkpoint folder not found (--resume_from_checkpoint)", value)
    problem = checkpoint_problem(value, required_files)
    if problem == f"no {TRAINER_STATE}":
        raise InputError(f"not a checkpoint folder (--resume_from_checkpoint): {problem}", value)
    if problem:
        raise InputError(f"cannot resume from this checkpoint (--resume_from_checkpoint): {problem}", value)
    return value


def check_earlier_run(output_dir: str, resume_from_checkpoint: str | None, overwrite: bool) -> None:
    """Before any work: a run that neither resumes nor starts over must not write its checkpoints over an
    earlier run's (the trainer would overwrite them one by one, leaving a mix)."""
    found = list_checkpoints(output_dir)
    if overwrite and resume_from_checkpoint:
        raise InputError("--overwrite_output_dir True starts over, --resume_from_checkpoint continues: give one of them")
    if found and not overwrite and not resume_from_checkpoint:
        raise InputError(f"{output_dir} holds an earlier run's checkpoints, the newest this one: pass "
                         "--resume_from_checkpoint last (or a checkpoint folder) to continue that run, or "
                         "--overwrite_output_dir True to start over (its checkpoint-N folders are removed)", found[-1])


def start_run(output_dir: str, resume_from_checkpoint: str | None, overwrite: bool, main_process: bool) -> None:
    """At the start of training, after the data and model are ready: say where a resumed run starts, or
    remove the earlier run's checkpoints when starting over (a later --resume_from_checkpoint last must not
    find them)."""
    if resume_from_checkpoint:
        logger.info("resuming from %s (step %d)", resume_from_checkpoint, checkpoint_global_step(resume_from_checkpoint))
    elif overwrite and main_process:
        removed = list_checkpoints(output_dir)
        for folder in removed:
            shutil.rmtree(folder)
        if removed:
            logger.info("starting over (--overwrite_output_dir True): removed the earlier run's %s from %s",
                        ", ".join(os.path.basename(folder) for folder in removed), output_dir)


def remove_incomplete_checkpoint(path: str) -> bool:
    """Remove a checkpoint folder whose saving failed (it could never be resumed); whether there was one."""
    if os.path.isdir(path) and checkpoint_problem(path) is not None:
        shutil.rmtree(path, ignore_errors=True)
        return True
    return False


# ---- outputs apart from inputs ----


def _is_within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_apart_from_inputs(output: str | None, inputs, flag: str = "--output_dir") -> None:
    """Refuse an output (file or folder) that is, or lies inside, an input data folder: data folders are
    read recursively, so what this run writes there (a model's JSON files, converted records, statistics)
    would be read as data by the next run on that folder. `inputs`: (flag, path) pairs; files, missing
    paths and None are passed over (an input file is checked by the tools' own output checks)."""
    if not output:
        return
    for input_flag, path in inputs:
        if not path or not os.path.isdir(path) or not _is_within(output, path):
            continue
        where = "is the" if os.path.realpath(output) == os.path.realpath(path) else "is inside the"
        raise InputError(f"{flag} {where} {input_flag} folder ({path}), which is read as data, all files below it: "
                         "write elsewhere", output)


def check_inputs_outside_checkpoints(output_dir: str, inputs) -> None:
    """With --overwrite_output_dir True the earlier checkpoints are removed: none may be read by this run
    (e.g. --peft_path OUTPUT_DIR/checkpoint-500)."""
    for folder in list_checkpoints(output_dir):
        for input_flag, path in inputs:
            if path and os.path.exists(path) and _is_within(path, folder):
                raise InputError(f"{input_flag} is inside {folder}, which --overwrite_output_dir True would remove: "
                                 "copy it elsewhere first, or resume (--resume_from_checkpoint)", path)
