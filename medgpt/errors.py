"""One error type for bad input, reported as `path:line: what is wrong` and exit status 2; the wrapper every
script's main uses, which also reports a full disk in one line."""

import contextlib
import errno
import functools
import logging
import os
import shutil
import sys


class InputError(Exception):
    """Bad user input (a data file, a config, a path). Carries where it was found."""

    def __init__(self, message: str, path: str | None = None, line: int | str | None = None):
        self.path, self.line, self.message = path, line, message
        where = f"{path}:{line}: " if path is not None and line is not None else (f"{path}: " if path else "")
        super().__init__(where + message)

    @classmethod
    def at(cls, message: str, source: str) -> "InputError":
        """The error located at a record's "path:line" source."""
        path, _, line = source.rpartition(":")
        return cls(message, path, line)


NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
# What torch.save's C++ writer says when a write comes up short: it carries no errno.
TORCH_SHORT_WRITE = ("inline_container.cc", "PytorchStreamWriter")
LOW_FREE_SPACE = 16 * 2**20  # bytes: below this, a short write of a tensor file is taken for a full disk


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _nearly_full(folder: str | None) -> bool:
    try:
        return folder is not None and shutil.disk_usage(folder).free < LOW_FREE_SPACE
    except OSError:
        return False


def is_disk_full(error: BaseException, folder: str | None = None) -> bool:
    """Whether `error` (or what caused it) is a write that found no space left: OSError ENOSPC, or the same
    error as libraries report it without an errno (safetensors: "No space left on device (os error 28)";
    torch.save: a short write, taken for a full disk only when `folder`'s file system is nearly full)."""
    for link in _causes(error):
        if isinstance(link, OSError) and link.errno == errno.ENOSPC:
            return True
        text = str(link)
        if NO_SPACE in text or "os error 28" in text:
            return True
        if isinstance(link, RuntimeError) and any(mark in text for mark in TORCH_SHORT_WRITE) and _nearly_full(folder):
            return True
    return False


def disk_full_error(path: str) -> OSError:
    return OSError(errno.ENOSPC, NO_SPACE, path)


def close_progress_bars() -> None:
    """Close the progress bars a failed step left open: each would redraw itself after the error line."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def _flush_log_handlers() -> None:
    for handler in logging.getLogger().handlers:  # earlier log lines first, then the error
        with contextlib.suppress(OSError, ValueError):  # a stream closed under us, as shutdown() allows
            handler.flush()


def exit_on_input_error(main):
    """Wrap a script's main so bad input (and a file it may not read or write) ends with one line on stderr
    and exit status 2, and a full disk with one line naming what was being written and exit status 1; no
    traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as error:
            _flush_log_handlers()
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except PermissionError as error:
            # Any file or folder the user cannot read or write (the data readers say so themselves; this
            # is for every other place a script opens something).
            _flush_log_handlers()
            where = f"{error.filename}: " if error.filename else ""
            print(f"error: {where}{error.strerror or 'permission denied'}", file=sys.stderr)
            sys.exit(2)
        except Exception as error:
            if not is_disk_full(error):
                raise
            # Results are renamed into place only once whole, so what was being written is not left
            # looking complete; the user has to free space (or choose another disk) and run again.
            path = next((link.filename for link in _causes(error) if isinstance(link, OSError) and link.filename), None)
            close_progress_bars()
            _flush_log_handlers()
            print(f"error: {path + ': ' if path else ''}no space left on device", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            # What was written is whole (results are renamed into place; resumable tools say how to go on).
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
