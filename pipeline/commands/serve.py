"""`python -m pipeline serve`: the model over MLflow's scoring protocol, on uvicorn."""

from __future__ import annotations

import argparse
import logging

from pipeline.commands.common import address_options, model_option, non_negative, positive
from pipeline.commands.common import parser as command_parser
from pipeline.core.errors import exit_on_user_error
from pipeline.core.runtime import setup_logging
from pipeline.commands.common import log_options, monitor_settings
from pipeline.monitoring.log import describe_log, open_log
from pipeline.registry.store import champion_uri
from pipeline.serving.classifier import load_classifier
from pipeline.serving.following import DEFAULT_REFRESH_S, AliasFollower
from pipeline.serving.serve import (
    DEFAULT_MAX_BODY_MB,
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_IMAGES,
    DEFAULT_TIMEOUT_S,
    GRACEFUL_SHUTDOWN_S,
    MIB,
    build_app,
    listen,
)

log = logging.getLogger("pipeline.serving.serve")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("serve", "Serve a registered model over MLflow's scoring protocol (/invocations, /ping, "
                            "/version), with this project's own server and request limits.", model_option(),
                            address_options(5001))
    parser.add_argument("--max-body-mb", type=positive(float), default=DEFAULT_MAX_BODY_MB,
                        help=f"larger request bodies get 413, in MiB (default: {DEFAULT_MAX_BODY_MB:g})")
    parser.add_argument("--max-images", type=positive(int), default=DEFAULT_MAX_IMAGES,
                        help=f"most images in one request (default: {DEFAULT_MAX_IMAGES})")
    parser.add_argument("--max-concurrent", type=positive(int), default=DEFAULT_MAX_CONCURRENT,
                        help=f"requests in flight beyond this get 503 (default: {DEFAULT_MAX_CONCURRENT})")
    parser.add_argument("--timeout-s", type=positive(float), default=DEFAULT_TIMEOUT_S,
                        help=f"a request not answered within this gets 503 (default: {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--refresh-s", type=non_negative(float), default=DEFAULT_REFRESH_S,
                        help="with an alias (models:/<name>@champion), look this often for the version it names "
                        f"and switch to it; 0: never (default: {DEFAULT_REFRESH_S:g})")
    log_options(parser)
    parser.add_argument("--no-digit-verdict", action="store_true",
                        help="skip the digit check: answers carry no is_digit (the check costs little; see bench serve)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from pipeline.serving.lingering import LingeringHttpToolsProtocol

    args = parse_args(argv)
    setup_logging()

    uri = args.model or champion_uri()
    server_socket = listen(args.host, args.port)  # a busy port fails before the model loads
    def adapt(model):
        return model.without_verdict("the digit check is turned off (--no-digit-verdict)") if args.no_digit_verdict else model

    model = AliasFollower(uri, args.refresh_s, load_classifier, adapt)
    prediction_log = open_log(monitor_settings(args.log_storage), enabled=not args.no_log)
    app = build_app(model, int(args.max_body_mb * MIB), args.max_images, args.max_concurrent,
                    args.timeout_s, prediction_log, uri)
    netloc = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    log.info("serving %s at http://%s/invocations; bodies over %g MiB get 413, over %d images 413, "
             "beyond %d concurrent requests 503", uri, netloc, args.max_body_mb, args.max_images,
             args.max_concurrent)
    log.info("%s", describe_log(prediction_log))
    config = uvicorn.Config(app, http=LingeringHttpToolsProtocol, log_level="info", access_log=args.access_log,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    uvicorn.Server(config).run(sockets=[server_socket])
    return 0
