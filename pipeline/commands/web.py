"""`python -m pipeline web`: a page to draw or upload a digit, on waitress."""

from __future__ import annotations

import argparse

from pipeline.commands.common import address_options, log_options, model_option, monitor_settings, non_negative, parser
from pipeline.monitoring.log import describe_log, open_log
from pipeline.core.errors import PipelineError, exit_on_user_error
from pipeline.core.runtime import setup_logging
from pipeline.serving.following import DEFAULT_REFRESH_S
from pipeline.serving.web import MAX_UPLOAD_BYTES, THREADS, create_app, too_large_body, warm_up


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    command = parser("web", "Draw or upload a digit, see the prediction.", address_options(5005), model_option())
    command.add_argument("--refresh-s", type=non_negative(float), default=DEFAULT_REFRESH_S,
                         help="with an alias (models:/<name>@champion), look this often for the version it names "
                         f"and switch to it; 0: never (default: {DEFAULT_REFRESH_S:g})")
    log_options(command)
    return command.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    prediction_log = open_log(monitor_settings(args.log_storage), enabled=not args.no_log)
    app = create_app(args.model, refresh_s=args.refresh_s, prediction_log=prediction_log)
    warm_up(app)
    from pipeline.serving.lingering import lingering_server

    try:  # waitress refuses a body over the limit before Flask sees it, in the same words
        server = lingering_server(app, lambda: too_large_body(MAX_UPLOAD_BYTES), host=args.host, port=args.port,
                                  threads=THREADS, max_request_body_size=MAX_UPLOAD_BYTES)
    except OSError as error:
        raise PipelineError(f"cannot listen on {args.host}:{args.port} ({error.strerror}); pass another --port") from None
    from pipeline.serving.serve import freeze_startup_heap

    freeze_startup_heap()  # as serve does
    print(f"serving on http://{args.host}:{args.port}/ (model {app.extensions['mnist_model'].uri}); Ctrl+C stops",
          flush=True)
    print(describe_log(prediction_log), flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        prediction_log.stop()
    return 0
