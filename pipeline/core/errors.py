"""One exception type for problems a user can fix, reported as a single line."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


# `scheme://user:password@host` in any text: the password part, up to the `@`
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/:@\s]*:)(?P<password>[^@\s/]+)@")


def redact(text: str) -> str:
    """`text` with every password in a URL replaced by `***` (storage and tracking URLs may hold one)."""
    return _URL_PASSWORD.sub(lambda match: f"{match['head']}***@", str(text))


class RedactingFilter(logging.Filter):
    """Masks URL passwords in every log record a handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _URL_PASSWORD.search(message):
            record.msg, record.args = redact(message), None
        return True


class PipelineError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Turn a PipelineError raised by a stage's main() into one stderr line and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as error:
            logging.getLogger("pipeline").debug("user error", exc_info=True)
            print(f"error: {redact(str(error))}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("error: interrupted; outputs of this stage were not written", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


def first_line(error: BaseException) -> str:
    """An exception's first line (at most 200 characters), for one-line error messages."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
