"""The serving floor: what any server of this model must do, on `serve`'s own stack, without the model.

    python -m bench.floor --port 5099

Starlette on uvicorn with httptools and the same listening socket as `serve` (`serve.listen`):
POST /invocations reads the body, decodes it with `json.loads` into a float32 (n, 28, 28, 1) array
and answers a fixed {"predictions": ...} JSON; GET /ping answers. `python -m bench serve` times it
beside `pipeline serve`, request by request, as the floor the project's latency is divided by.
"""

from __future__ import annotations

import argparse
import json

FIXED_ANSWER = json.dumps({"predictions": [[0.1] * 10]}).encode()


def build_floor_app():
    import numpy as np
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def invocations(request: Request) -> Response:
        images = np.asarray(json.loads(await request.body())["inputs"], dtype=np.float32).reshape(-1, 28, 28, 1)
        assert len(images)  # the array is built and used, as a server would
        return Response(FIXED_ANSWER, media_type="application/json")

    async def ping(_: Request) -> Response:
        return Response("\n", media_type="application/json")

    return Starlette(routes=[Route("/invocations", invocations, methods=["POST"]), Route("/ping", ping, methods=["GET"])])


def main() -> None:
    import uvicorn

    from pipeline.serving.serve import listen

    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--host", default="127.0.0.1")
    arguments.add_argument("--port", type=int, required=True)
    args = arguments.parse_args()
    config = uvicorn.Config(build_floor_app(), http="httptools", log_level="warning")
    uvicorn.Server(config).run(sockets=[listen(args.host, args.port)])


if __name__ == "__main__":
    main()
