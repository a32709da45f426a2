"""The REST endpoints of std-daq's admin interface, as PSI's ``std_daq_client`` 1.3.5
calls them: every answer is HTTP 200 ``{"status": "ok", "message": ..., <payload>}`` or
``{"status": "error", "message": <what is wrong, naming the field>}``."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from fastcore.config import ConfigError
from services.daq_client import StdDaqError
from services.requests import RequestError
from services.rest.backend import RestBackend
from services.rest.live import colormap, render
from services.rest.simulation import DEFAULT_RATE_HZ

log = logging.getLogger(__name__)
MAX_LOGS = 1000
LIVE_PERIOD_S = 0.2  # the live stream's frames: at most 5 per second
STATIC = Path(__file__).parent / "static"  # the dashboard

_EXPECTED = (StdDaqError, RequestError, ConfigError, ValueError)


def ok(message: str, **payload: Any) -> dict:
    return {"status": "ok", "message": message, **payload}


def error(message: str) -> dict:
    return {"status": "error", "message": message}


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None


async def _answer_body(request: Request, work: Callable[[Any], dict]) -> dict:
    """``_answer`` for an endpoint that takes a JSON body: ``work(body)``."""
    try:
        body = await _json_body(request)
    except RequestError as exc:
        return error(str(exc))
    return await _answer(lambda: work(body))


async def _answer(work: Callable[[], dict]) -> dict:
    """Run blocking ``work`` off the event loop; an error becomes the error envelope."""
    try:
        return await run_in_threadpool(work)
    except _EXPECTED as exc:
        return error(str(exc))
    except Exception as exc:  # the service keeps serving; the caller sees why
        log.exception("request failed")
        return error(f"internal error: {type(exc).__name__}: {exc}")


KEY_PREFIX = "/key/"
KEY_HEADER = "x-api-key"


class ApiKeyMiddleware:
    """With an API key, every request that changes something (any method but GET) must
    carry it: as the path prefix ``/key/<KEY>`` (std_daq_client cannot send headers: give
    it ``url_base="http://host:port/key/<KEY>"``) or the ``X-API-Key`` header."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.api_key:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        given = None
        if path.startswith(KEY_PREFIX):
            given, _, rest = path[len(KEY_PREFIX):].partition("/")
            scope = dict(scope, path="/" + rest, raw_path=("/" + rest).encode())
        else:
            headers = dict(scope.get("headers") or [])
            raw = headers.get(KEY_HEADER.encode())
            given = raw.decode(errors="replace") if raw is not None else None
        if given is not None and not hmac.compare_digest(given.encode(), self.api_key.encode()):
            await JSONResponse(error("api key: wrong key"))(scope, receive, send)
            return
        if given is None and scope["method"] != "GET":
            await JSONResponse(error(
                "api key: this stddaq-rest requires its key for changes: use "
                "http://<host>:<port>/key/<KEY> as the client's url_base, or the X-API-Key "
                "header"))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(backend: RestBackend, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="stddaq REST", description="std-daq's admin interface "
                  "(std_daq_client 1.3.5 compatible)")
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """A path or query value of the wrong type: the envelope, naming the parameter."""
        problems = [f"{e['loc'][-1]}: {e['msg'].lower()}, got {e.get('input')!r:.40}"
                    for e in exc.errors()]
        return JSONResponse(error("; ".join(problems)))

    @app.post("/writer/write_async")
    async def write_async(request: Request) -> dict:
        return await _answer_body(request, lambda body: ok(
            "Writing started.", writer=backend.write(body, wait=False)))

    @app.post("/writer/write_sync")
    async def write_sync(request: Request) -> dict:
        return await _answer_body(request, lambda body: ok(
            "Writing finished.", writer=backend.write(body, wait=True)))

    @app.post("/writer/stop")
    async def writer_stop() -> dict:
        return await _answer(lambda: ok("Writing stopped.", writer=backend.stop()))

    @app.get("/writer/status")
    async def writer_status() -> dict:
        status = backend.status()
        return ok(f"Writer is {status['state']}", writer=status)

    @app.get("/daq/config")
    async def get_config() -> dict:
        def work() -> dict:
            config_id, config = backend.current_config()
            return ok(f"DAQ configured for bit_depth={config.get('bit_depth')}.",
                      config=config, config_id=config_id)

        return await _answer(work)

    @app.post("/daq/config")
    async def set_config(request: Request) -> dict:
        return await _answer_body(request, lambda changes: ok(
            "Setting new daq config.", config=backend.set_config(changes)))

    @app.get("/daq/deployment")
    async def get_deployment() -> dict:
        return await _answer(lambda: ok("Last config deployment.",
                                        deployment=backend.deployment()))

    @app.get("/daq/stats")
    async def get_stats() -> dict:
        return ok("DAQ statistics of the last second.", stats=backend.rates)

    @app.get("/daq/logs/{n_logs}")
    async def get_logs(n_logs: str) -> dict:
        if not n_logs.isdigit() or not 0 < int(n_logs) <= MAX_LOGS:
            return error(f"n_logs: expected an integer from 1 to {MAX_LOGS}, got {n_logs!r:.40}")
        return await _answer(lambda: ok("Last acquisitions that produced a file.",
                                        logs=backend.logs(int(n_logs))))

    @app.get("/daq/stats/history")
    async def stats_history() -> dict:
        return ok("Rates per second over the last minutes.", history=list(backend.history))

    @app.get("/daq/services")
    async def services() -> dict:
        return await _answer(lambda: ok("Services and detector buffer.",
                                        **backend.services()))

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/daq/live/image")
    async def live_image(cmap: str = "gray", low: float | None = None,
                         high: float | None = None, size: int = 512,
                         when_missing: str = "error") -> Response:
        """The newest image as PNG (headers X-Image-Id, X-Low, X-High); none yet: 503, or
        204 with ``when_missing=empty`` (a page polling it logs no error)."""
        def work() -> Response:
            newest = backend.live.newest()
            if newest is None and when_missing == "empty":
                return Response(status_code=204)
            if newest is None:
                return JSONResponse(error("no image in the detector's buffer yet (is the "
                                          "detector or the simulator running?)"),
                                    status_code=503)
            image_id, image = newest
            picture, used_low, used_high = render(image, low, high, cmap, size)
            return Response(picture, media_type="image/png", headers={
                "X-Image-Id": str(image_id), "X-Low": f"{used_low:g}",
                "X-High": f"{used_high:g}", "Cache-Control": "no-store"})

        try:
            return await run_in_threadpool(work)
        except ValueError as exc:
            return JSONResponse(error(str(exc)), status_code=400)

    @app.get("/daq/live")
    async def live_stream(cmap: str = "gray", size: int = 512) -> Response:
        """The newest image, a few times a second, as an MJPEG stream (as the original)."""
        try:
            colormap(cmap)
        except ValueError as exc:
            return JSONResponse(error(str(exc)), status_code=400)

        async def frames():
            last_id = None
            while True:
                newest = await run_in_threadpool(backend.live.newest)
                if newest is not None and newest[0] != last_id:
                    last_id = newest[0]
                    picture, _, _ = await run_in_threadpool(
                        render, newest[1], None, None, cmap, size, "JPEG")
                    yield (b"--frame\r\nContent-Type: image/jpeg\r\n\r\n" + picture
                           + b"\r\n")
                await asyncio.sleep(LIVE_PERIOD_S)

        return StreamingResponse(frames(),
                                 media_type="multipart/x-mixed-replace; boundary=frame")

    @app.get("/simulation/status")
    async def simulation_status() -> dict:
        return ok("Simulation status.", simulation=backend.simulation.status())

    @app.post("/simulation/start")
    async def simulation_start(request: Request) -> dict:
        def start(body: Any) -> dict:
            rate = body.get("rate_hz", DEFAULT_RATE_HZ) if isinstance(body, dict) else body
            return ok("Simulation started.", simulation=backend.simulation.start(rate))

        return await _answer_body(request, start)

    @app.post("/simulation/stop")
    async def simulation_stop() -> dict:
        return await _answer(lambda: ok("Simulation stopped.",
                                        simulation=backend.simulation.stop()))

    return app
