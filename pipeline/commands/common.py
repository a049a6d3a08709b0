"""What several commands' parsers share: a positive-number type, the listening address, the params file."""

from __future__ import annotations

import argparse

from pipeline.core.config import PARAMS_FILE


def bounded(kind: type, minimum: float, inclusive: bool):
    """An argparse type: a number of `kind` at least (`inclusive`) or above `minimum`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error
    return parse


def positive(kind: type = int):
    return bounded(kind, 0, inclusive=False)


def non_negative(kind: type = int):
    return bounded(kind, 0, inclusive=True)


def address_options(default_port: int) -> argparse.ArgumentParser:
    """A parent parser for --host and --port of a command that listens."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parent.add_argument("--port", type=int, default=default_port, help=f"port (default: {default_port})")
    return parent


MODEL_HELP = ("models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/model or a .keras file "
              "(default: models:/<tracking.registered_model>@champion from params.yaml)")


def model_option() -> argparse.ArgumentParser:
    """A parent parser for --model, the model a serving command loads."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--model", help=MODEL_HELP)
    return parent


def params_option() -> argparse.ArgumentParser:
    """A parent parser for --params."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--params", default=PARAMS_FILE, help=f"params file (default: {PARAMS_FILE})")
    return parent


def parser(command: str, description: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m pipeline {command}", description=description, parents=list(parents))


def monitor_settings(storage: str | None = None, params_file: str = PARAMS_FILE):
    """params.yaml's `monitor` section (the prediction log's store and knobs), its storage replaced by
    `storage` (--log-storage) when given; None outside a project."""
    from pipeline.core.config import load_params, parse_params
    from pipeline.core.paths import resolve_in_project

    path = resolve_in_project(params_file)
    if not path.is_file():
        return None
    params = load_params(path)
    if storage is None:
        return params.monitor
    raw = params.model_dump()
    raw["monitor"]["storage"] = storage
    return parse_params(raw).monitor


def log_storage_option(command: argparse.ArgumentParser) -> None:
    """--log-storage, for every command that reads or writes the prediction log."""
    command.add_argument("--log-storage", metavar="URL",
                         help="the prediction log's store, a SQLite or PostgreSQL URL (default: monitor.storage "
                         "in params.yaml)")


def log_options(command: argparse.ArgumentParser) -> None:
    """--no-log and --log-storage, for the servers that write the prediction log."""
    command.add_argument("--no-log", action="store_true",
                         help="record nothing: no prediction log, no prediction ids in answers, no /feedback")
    log_storage_option(command)
