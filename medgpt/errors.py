"""One error type for bad input, reported as `path:line: what is wrong` and exit status 2."""

import contextlib
import functools
import logging
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


def exit_on_input_error(main):
    """Wrap a script's main so bad input ends with one line on stderr and exit status 2, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as error:
            for handler in logging.getLogger().handlers:  # earlier log lines first, then the error
                with contextlib.suppress(OSError, ValueError):  # a stream closed under us, as shutdown() allows
                    handler.flush()
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            # What was written is whole (results are renamed into place; resumable tools say how to go on).
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
