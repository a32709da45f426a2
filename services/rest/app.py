"""The REST endpoints of std-daq's admin interface, as PSI's ``std_daq_client`` 1.3.5
calls them: every answer is HTTP 200 ``{"status": "ok", "message": ..., <payload>}`` or
``{"status": "error", "message": <what is wrong, naming the field>}``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from fastcore.config import ConfigError
from services.daq_client import StdDaqError
from services.requests import RequestError
from services.rest.backend import RestBackend

log = logging.getLogger(__name__)
MAX_LOGS = 1000

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


async def _answer(work: Callable[[], dict]) -> dict:
    """Run blocking ``work`` off the event loop; an error becomes the error envelope."""
    try:
        return await run_in_threadpool(work)
    except _EXPECTED as exc:
        return error(str(exc))
    except Exception as exc:  # the service keeps serving; the caller sees why
        log.exception("request failed")
        return error(f"internal error: {type(exc).__name__}: {exc}")


def create_app(backend: RestBackend) -> FastAPI:
    app = FastAPI(title="stddaq REST", description="std-daq's admin interface "
                  "(std_daq_client 1.3.5 compatible)")

    @app.post("/writer/write_async")
    async def write_async(request: Request) -> dict:
        try:
            body = await _json_body(request)
        except RequestError as exc:
            return error(str(exc))
        return await _answer(lambda: ok("Writing started.",
                                        writer=backend.write(body, wait=False)))

    @app.post("/writer/write_sync")
    async def write_sync(request: Request) -> dict:
        try:
            body = await _json_body(request)
        except RequestError as exc:
            return error(str(exc))
        return await _answer(lambda: ok("Writing finished.",
                                        writer=backend.write(body, wait=True)))

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
        try:
            changes = await _json_body(request)
        except RequestError as exc:
            return error(str(exc))
        return await _answer(lambda: ok("Setting new daq config.",
                                        config=backend.set_config(changes)))

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

    return app
