"""Bad input, reported the same way everywhere: one line on stderr that names the file, field or
value, exit code 2, no traceback. Input files are read as text here only, so a file that is not
UTF-8 (a binary file, a Latin-1 export) names its path and line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# What bad input raises: our validation (ValueError and its subclasses: TraceError,
# UnicodeDecodeError) and the file system (missing, a directory, no permission).
INPUT_ERRORS = (ValueError, OSError)


def is_int(value: Any) -> bool:
    """An int as a sweep file means one (YAML's true/false are bools, not 1/0)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_text(path: str | Path, what: str = "file") -> str:
    """The file's text (UTF-8). ValueError naming the path (and line) for a missing file, a folder
    or bytes that are not UTF-8."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{what} {str(path)!r} is a folder, not a file") from None
    except FileNotFoundError:
        raise ValueError(f"no such {what} {str(path)!r}") from None
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} cannot be read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Excel's CSV export) is not content
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                         "is it a binary file?") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def report(command: str, exc: Exception) -> int:
    """Prints the one line for an exception that ended a command; returns the exit code: 2 for bad
    input, 1 for anything else (an internal error: --debug shows its traceback)."""
    if isinstance(exc, INPUT_ERRORS):
        print(f"alto {command}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    print(f"alto {command}: internal error: {type(exc).__name__}: {first_line(exc)} "
          f"(alto {command} --debug shows the traceback)", file=sys.stderr)
    return 1
