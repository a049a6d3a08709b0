"""`python -m pipeline info`: where the stores, data, model and metrics live."""

from __future__ import annotations

from pipeline.commands.common import parser
from pipeline.core.errors import exit_on_user_error, redact

DESCRIPTION = "print where the stores, data, model and metrics live"


def info_lines(params_path: str = "params.yaml") -> list[str]:
    """Where everything lives, one `key: value` per line."""
    from pipeline.core import tracking
    from pipeline.core.config import load_params
    from pipeline.core.paths import project_root
    from pipeline.registry.store import champion_uri_of
    from pipeline.tuning.study import resolve_storage_url, study_name

    params = load_params(params_path)
    root = project_root()
    return [
        f"project_root: {root}",
        f"tracking_uri: {tracking.tracking_uri()}",
        f"artifact_root: {tracking.default_artifact_root()}",
        f"experiment: {params.tracking.experiment}",
        f"registered_model: {params.tracking.registered_model}",
        f"champion_uri: {champion_uri_of(params.tracking.registered_model)}",
        f"study_storage: {resolve_storage_url(params.tune.storage)}",
        f"study_name: {study_name(params)}",
        *(f"paths.{key}: {root / value}" for key, value in params.paths.model_dump().items()),
    ]


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser("info", DESCRIPTION).parse_args(argv)
    print(redact("\n".join(info_lines())))
    return 0
