"""`python -m pipeline registry | promote | rollback`: the registry from the terminal."""

from __future__ import annotations

from pipeline.commands.common import parser, positive
from pipeline.core.errors import exit_on_user_error


def format_table(rows: list[dict[str, str]]) -> str:
    """The versions as an aligned text table, one row each."""
    import pandas as pd

    if not rows:
        return "(no versions)"
    return pd.DataFrame(rows).to_string(index=False, justify="left")


def parse(command: str, description: str, argv: list[str] | None, *arguments: tuple[tuple, dict]):
    """The command's arguments, then logging and the project's params."""
    from pipeline.core.config import load_params
    from pipeline.core.runtime import setup_logging

    command_parser = parser(command, description)
    for names, options in arguments:
        command_parser.add_argument(*names, **options)
    args = command_parser.parse_args(argv)
    setup_logging()
    return args, load_params()


@exit_on_user_error
def list_main(argv: list[str] | None = None) -> int:
    """`python -m pipeline registry`: the versions, aliases, status and metrics."""
    from pipeline.registry.store import version_rows

    _, params = parse("registry", "list registered versions, aliases and metrics", argv)
    print(format_table(version_rows(params.tracking.registered_model)))
    return 0


@exit_on_user_error
def promote_main(argv: list[str] | None = None) -> int:
    """`python -m pipeline promote --version N`: the promotion rule by hand; exit 1 when rejected."""
    from pipeline.registry.store import promote, rescore_on_test

    args, params = parse("promote", "promote a registered version to champion", argv,
                         (("--version",), {"required": True, "type": positive(int), "help": "model version number"}),
                         (("--force",), {"action": "store_true", "help": "promote even if it does not beat the champion"}))
    name = params.tracking.registered_model
    score, digest = rescore_on_test(params)
    decision = promote(name, args.version, params.promote.margin, digest, score, force=args.force,
                       lock_url=params.promote.lock)
    print(f"{name} v{args.version}: {decision.status}: {decision.reason}")
    return 0 if decision.promote else 1


@exit_on_user_error
def rollback_main(argv: list[str] | None = None) -> int:
    """`python -m pipeline rollback`: champion back to the version that held it before."""
    from pipeline.registry.store import client, rollback_champion

    _, params = parse("rollback", "move champion back to the previous champion", argv)
    name = params.tracking.registered_model
    previous, restored = rollback_champion(client(), name, params.promote.lock)
    print(f"{name}: champion moved back from v{previous} to v{restored}")
    return 0
