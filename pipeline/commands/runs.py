"""`python -m pipeline runs`: the training runs side by side in the terminal, newest first.

The terminal twin of the MLflow UI's compare view: preset, key params, test and handwriting
accuracy, and the registered version with its aliases, one row per `train` run.
"""

from __future__ import annotations

from datetime import datetime

import pandas as pd

from pipeline.commands.common import parser as command_parser
from pipeline.commands.common import positive
from pipeline.core.errors import PipelineError, exit_on_user_error

# shown column -> its `mlflow.search_runs` column (params are strings there, metrics floats)
COLUMNS = {
    "started": "start_time",
    "run": "run_id",
    "preset": "params.preset",
    "epochs_run": "metrics.epochs_run",
    "batch_size": "params.recipe.batch_size",
    "learning_rate": "params.recipe.learning_rate",
    "dropout": "params.recipe.dropout",
    "test_accuracy": "metrics.test_accuracy",
    "handwriting_accuracy": "metrics.handwriting_accuracy",
    "version": "tags.registered_version",
}
TEXT_COLUMNS = ("run", "preset", "aliases")  # sorted A-Z; the others highest (newest) first
SORTABLE = (*COLUMNS, "aliases")
NUMBERS = {"epochs_run": "{:.0f}", "batch_size": "{:.0f}", "learning_rate": "{:g}", "dropout": "{:g}",  # and their
           "test_accuracy": "{:.4f}", "handwriting_accuracy": "{:.4f}", "version": "{:.0f}"}  # formats


def runs_table(runs: pd.DataFrame, aliases: dict[str, str], sort: str = "started",
               top: int | None = None) -> pd.DataFrame:
    """`mlflow.search_runs` rows as the comparison: typed columns, each version's `aliases` (from
    {version: "champion,..."}), ordered by `sort` (numbers and times highest first, text A-Z, ties
    newest first), the first `top` rows."""
    if sort not in SORTABLE:
        raise PipelineError(f"cannot sort by {sort!r}; choose one of {', '.join(SORTABLE)}")
    missing = pd.Series(None, index=runs.index, dtype=object)  # a column no run has (search_runs leaves it out)
    table = pd.DataFrame({name: runs[column] if column in runs else missing for name, column in COLUMNS.items()})
    table["started"] = pd.to_datetime(table["started"], utc=True)
    for name in NUMBERS:
        table[name] = pd.to_numeric(table[name], errors="coerce")
    table["aliases"] = [aliases.get(f"{version:.0f}") if pd.notna(version) else None for version in table["version"]]
    table = table.sort_values("started", ascending=False, kind="stable")
    if sort != "started":
        table = table.sort_values(sort, ascending=sort in TEXT_COLUMNS, na_position="last", kind="stable")
    return table.head(top).reset_index(drop=True) if top else table.reset_index(drop=True)


def format_runs(table: pd.DataFrame) -> str:
    """The comparison as text: start times local to the minute, short run ids, '-' where a value is missing."""
    if table.empty:
        return "(no training runs)"
    local = datetime.now().astimezone().tzinfo

    def cell(name: str, value) -> str:
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            return "-"
        if name == "started":
            return value.tz_convert(local).strftime("%Y-%m-%d %H:%M")
        if name == "run":
            return value[:8]
        return NUMBERS[name].format(value) if name in NUMBERS else str(value)

    shown = pd.DataFrame({name: [cell(name, value) for value in table[name]] for name in table.columns})
    return shown.to_string(index=False)


def version_aliases(client, model_name: str) -> dict[str, str]:
    """{version: "challenger,champion"} of a registered model; empty before one is registered (a store
    error is one line, never "no aliases")."""
    from pipeline.registry.store import aliases_by_version

    return {version: ",".join(names) for version, names in (aliases_by_version(client, model_name) or {}).items()}


def training_runs(experiment: str) -> pd.DataFrame:
    """Every `train` run of the experiment, newest first; one error line when there is no store or
    experiment yet, or the store cannot be reached."""
    import mlflow

    from pipeline.core import tracking
    from pipeline.commands.ui import require_store

    uri = tracking.tracking_uri()
    require_store(uri)  # before configure_tracking, which would create an empty embedded store
    tracking.configure_tracking()
    if tracking.is_remote(uri) and not uri.startswith("databricks"):
        tracking.check_server(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
        runs = None if found is None else mlflow.search_runs(
            [found.experiment_id], filter_string=f"tags.`{tracking.RUN_KIND_TAG}` = 'train'",
            order_by=["attributes.start_time DESC"], output_format="pandas")
    except Exception as error:  # MlflowException, or the database driver's own
        raise PipelineError(f"MLflow tracking store {uri} cannot be read ({type(error).__name__}); "
                            "check MLFLOW_TRACKING_URI") from None
    if found is None:
        raise PipelineError(f"no experiment {experiment!r} in the MLflow store {uri} yet; run `dvc repro` to train")
    return runs


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline runs [--sort COLUMN] [--top N]`."""
    import mlflow

    from pipeline.core.config import PARAMS_FILE, load_params
    from pipeline.core.paths import project_root
    from pipeline.core.runtime import setup_logging

    parser = command_parser("runs", "Compare the training runs, newest first: the terminal twin of the MLflow "
                            "UI's compare view.")
    parser.add_argument("--sort", default="started", choices=SORTABLE, metavar="COLUMN",
                        help=f"order by this column: numbers highest first, text A-Z (one of {', '.join(SORTABLE)}; "
                             "default: started)")
    parser.add_argument("--top", type=positive(int), metavar="N", help="show only the first N runs")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(project_root() / PARAMS_FILE)
    runs = training_runs(params.tracking.experiment)
    aliases = version_aliases(mlflow.MlflowClient(), params.tracking.registered_model)
    print(format_runs(runs_table(runs, aliases, args.sort, args.top)))
    return 0
