"""One exception type for problems a user can fix, reported as a single line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("error: interrupted; outputs of this stage were not written", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
