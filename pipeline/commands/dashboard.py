"""`python -m pipeline dashboard [--params params.yaml] [--host 127.0.0.1] [--port 8080]`: optuna-dashboard
on the study storage that params.yaml names."""

from __future__ import annotations

import logging

from pipeline.commands.common import address_options, params_option, parser
from pipeline.core.config import load_params
from pipeline.core.errors import PipelineError, exit_on_user_error, first_line
from pipeline.core.runtime import setup_logging
from pipeline.tuning.dashboard import storage_for_dashboard, study_names
from pipeline.tuning.study import study_name

log = logging.getLogger("pipeline.commands.dashboard")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parser("dashboard", __doc__.splitlines()[0], params_option(), address_options(8080)).parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    storage = storage_for_dashboard(params.tune.storage)
    current = study_name(params)
    try:
        names = study_names(storage)
    except Exception as error:
        raise PipelineError(f"cannot read Optuna storage {params.tune.storage} ({type(error).__name__}: "
                            f"{first_line(error)}); start the database or fix tune.storage") from None
    if current not in names:
        log.warning("study %s (the current params) is not in this storage yet; %d other studies are", current,
                    len(names))
    log.info("optuna-dashboard on %s, current study %s: http://%s:%d", storage, current, args.host, args.port)

    from optuna_dashboard import run_server

    run_server(storage, host=args.host, port=args.port)
    return 0

