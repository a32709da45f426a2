"""stddaq-run: a complete single-machine std-daq for one detector config, supervised.

Starts, in order, each after the previous one is ready: the UDP receivers, sync, assembler,
HDF5 writer, writer agent (service ``<detector>.writer``), the Epics buffer and writer when
an Epics config is given, the IOC, the REST interface and the simulator when asked. A
service that crashes is restarted with a log line; Ctrl-C or SIGTERM stops everything, in
reverse order, by pid, and no process or shared-memory segment is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import redis

from fastcore.buffer_sizing import BUFFER_SECONDS
from fastcore.buffers import segment_alive, shm_dir, shm_name, shm_prefix
from fastcore.config import ConfigError, load_config, parse_config, read_config_json
from fastcore.names import Segment
from fastcore.runtime import (
    DEFAULT_IPC_DIR,
    add_broker_arguments,
    add_ipc_dir,
    add_log_level,
    add_redis_arguments,
    announce_ready,
    broker_address,
    redis_client,
    setup_logging,
    spelling,
    stop_on_signals,
)
from services.deployment import (
    DEPLOYING,
    DONE,
    ERROR_PREFIX,
    config_stream,
    latest_config,
    publish_config,
    report,
)
from services.supervisor import ServiceSpec, Supervisor

log = logging.getLogger("stddaq-run")
BROKER_CHECK_S = 3.0  # how long stddaq-run waits for RabbitMQ to accept a connection
# the services that read the detector config: a deployed config restarts them
CONFIG_READERS = ("udp-recv", "sync", "assembler", "h5-writer", "writer-agent", "simulator")


@dataclass
class LaunchOptions:
    ipc_dir: str = DEFAULT_IPC_DIR
    log_dir: str | None = None
    simulate_hz: float | None = None
    ioc_prefix: str | None = None
    ioc_port: int | None = None
    epics_config: str | None = None
    broker_url: str = "127.0.0.1"
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    rest_port: int | None = None


def service_specs(config_path: str, options: LaunchOptions) -> list[ServiceSpec]:
    """The processes of a single-machine std-daq for ``config_path``, in start order."""
    config = load_config(config_path)
    name = config.detector_name
    py = [sys.executable, "-m"]
    common = ["--ipc-dir", options.ipc_dir]
    broker_redis = ["--broker-url", options.broker_url, "--redis-host", options.redis_host,
                    "--redis-port", str(options.redis_port)]
    specs = [
        ServiceSpec("udp-recv", [*py, "fastcore.udp_recv", config_path, *common]),
        ServiceSpec("sync", [*py, "fastcore.sync", config_path, *common]),
        ServiceSpec("assembler", [*py, "fastcore.assembler", config_path, *common]),
        *writer_specs(config.n_writers, [*py, "fastcore.h5_writer", config_path, *common]),
        ServiceSpec("writer-agent", [*py, "services.writer_agent", "--service-name",
                                     f"{name}.writer", "--json-config-file", config_path,
                                     *common, *broker_redis]),
    ]
    if options.epics_config:
        for kind in ("epics_buffer", "epics_writer"):
            specs.append(ServiceSpec(kind.replace("_", "-"), [
                *py, f"services.{kind}", "--service-name", f"{name}.{kind}",
                "--json-config-file", options.epics_config, *broker_redis]))
    if options.ioc_prefix:
        ioc = [*py, "ioc.server", config_path, "--prefix", options.ioc_prefix,
               "--writer-service", f"{name}.writer", *broker_redis, *common]
        if options.epics_config:
            ioc += ["--epics-buffer-service", f"{name}.epics_buffer"]
        specs.append(ServiceSpec("ioc", ioc))
    if options.rest_port:
        specs.append(ServiceSpec("rest", [
            *py, "services.rest.server", config_path, "--port", str(options.rest_port),
            "--writer-service", f"{name}.writer", *broker_redis, *common]))
    if options.simulate_hz:
        specs.append(ServiceSpec("simulator", [*py, "fastcore.simulator", config_path,
                                               "--frames", "0", "--rate",
                                               str(options.simulate_hz)], ready_text=None))
    return specs


def writer_specs(n_writers: int, command: list[str]) -> list[ServiceSpec]:
    """The h5 writer processes: ``h5-writer``, or ``h5-writer-<i>`` for each of several."""
    if n_writers == 1:
        return [ServiceSpec("h5-writer", command)]
    return [ServiceSpec(f"h5-writer-{i}", [*command, "--writer-index", str(i)])
            for i in range(n_writers)]


def reads_config(spec: ServiceSpec) -> bool:
    """The service reads the detector config: a deployed config restarts it."""
    return spec.name in CONFIG_READERS or spec.name.startswith("h5-writer-")


class AlreadyRunningError(RuntimeError):
    """The detector's std-daq already runs on this machine."""


class Launcher:
    """Run the services of one detector under a Supervisor (also used by the demo)."""

    def __init__(self, config_path: str, options: LaunchOptions):
        self.raw_config = read_config_json(config_path)
        self.config = parse_config(self.raw_config, source=config_path)
        self.options = options
        self.log_dir = Path(options.log_dir or tempfile.mkdtemp(prefix="stddaq-run-"))
        if options.ioc_port:
            os.environ["EPICS_CA_SERVER_PORT"] = str(options.ioc_port)
        self.supervisor = Supervisor(service_specs(config_path, options), self.log_dir)

    def start(self) -> None:
        for buffer in Segment:
            name = shm_name(self.config.detector_name, buffer)
            if segment_alive(name):
                raise AlreadyRunningError(
                    f"std-daq for {self.config.detector_name} is already running here (its "
                    f"shared memory {name} belongs to a running process): stop it first or "
                    "use another detector_name")
        plan = self.config.buffer_plan()
        log.info("buffers: %s", plan.describe())
        if plan.short:
            log.warning("the buffers hold less than %g s at the nominal %g Hz%s: a writer or "
                        "consumer stalled longer than that loses images (see "
                        "docs/operations.md, sizing the buffers)", BUFFER_SECONDS,
                        plan.nominal_rate_hz,
                        " (cut to the memory budget)" if plan.clamped else "")
        try:
            self.supervisor.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        leftovers = self.supervisor.stop()
        if leftovers:
            log.warning("killed processes that outlived their service: %s", leftovers)
        prefix = shm_prefix(self.config.detector_name)
        directory = shm_dir()
        for entry in os.listdir(directory):
            # a segment whose creator still runs belongs to another instance: keep it
            if entry.startswith(prefix) and not segment_alive(entry):
                log.warning("removing shared memory %s left by a killed service", entry)
                os.unlink(os.path.join(directory, entry))

    def supervise(self, stop: threading.Event, deployments: ConfigDeployments | None = None
                  ) -> None:
        while not stop.wait(0.5):
            self.supervisor.check()
            if deployments is not None:
                deployments.poll(self)

    def apply_config(self, raw: dict) -> None:
        """Restart the services that read the detector config with ``raw`` (ConfigError
        when it is not valid; RuntimeError when a service does not come back)."""
        config = parse_config(raw, source="the deployed config")
        path = self.log_dir / f"{config.detector_name}.deployed.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(raw, indent=2))
        temporary.replace(path)
        specs = [spec for spec in service_specs(str(path), self.options) if reads_config(spec)]
        log.info("deploying a new config: restarting %s; buffers: %s",
                 ", ".join(spec.name for spec in specs), config.buffer_plan().describe())
        self.config = config
        self.supervisor.restart(specs)


class ConfigDeployments:
    """Applies the detector configs the REST interface publishes (services.deployment) and
    reports each one's progress under this host's name."""

    def __init__(self, client: redis.Redis, raw_config: dict):
        self.client = client
        self.detector_name = raw_config["detector_name"]
        self.server_name = socket.gethostname()
        self.running = raw_config
        self._warned = False
        latest = latest_config(client, self.detector_name)
        if latest is None or latest[1] != raw_config:  # what runs is what the REST shows
            self.last_id = publish_config(client, raw_config)
            report(client, self.detector_name, self.last_id, self.server_name, DONE)
        else:
            self.last_id = latest[0]

    def poll(self, launcher: Launcher) -> None:
        try:
            entries = self.client.xread({config_stream(self.detector_name): self.last_id},
                                        count=1)
            self._warned = False
        except redis.RedisError as exc:
            if not self._warned:
                log.warning("cannot follow config deployments (Redis: %s); retrying", exc)
                self._warned = True
            return
        for _, messages in entries:
            for entry_id, fields in messages:
                self.last_id = entry_id.decode()
                self._deploy(launcher, json.loads(fields[b"json"]))

    def _deploy(self, launcher: Launcher, raw: dict) -> None:
        report(self.client, self.detector_name, self.last_id, self.server_name, DEPLOYING)
        try:
            launcher.apply_config(raw)
        except (ConfigError, RuntimeError, OSError) as exc:
            reason = str(exc).splitlines()[0]
            log.error("config %s not deployed: %s; going back to the previous one",
                      self.last_id, reason)
            report(self.client, self.detector_name, self.last_id, self.server_name,
                   f"{ERROR_PREFIX}: {reason}")
            with contextlib.suppress(ConfigError, RuntimeError, OSError):
                launcher.apply_config(self.running)
            return
        self.running = raw
        report(self.client, self.detector_name, self.last_id, self.server_name, DONE)
        log.info("config %s deployed", self.last_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-run",
        description="Start a complete single-machine std-daq for a detector config and keep "
        "it running: receivers, sync, assembler, HDF5 writer, writer agent, optionally the "
        "Epics buffer/writer, the IOC and a simulated detector. Ctrl-C stops everything.",
        epilog="example: stddaq-run configs/jungfrau_1m.json --simulate 100 "
        "--ioc-prefix JF1M:")
    parser.add_argument("config", help="detector config JSON (see configs/)")
    parser.add_argument("--simulate", type=float, metavar="HZ", default=None,
                        help="also run the detector simulator at this frame rate")
    parser.add_argument("--ioc-prefix", default=None, help="also run the IOC with this prefix")
    parser.add_argument("--ioc-port", type=int, default=None,
                        help="CA server port of the IOC (EPICS_CA_SERVER_PORT)")
    parser.add_argument("--rest-port", type=int, default=None, metavar="PORT",
                        help="also serve the REST admin interface (std_daq_client) on "
                        "127.0.0.1:PORT (the original's is 5000)")
    parser.add_argument("--epics-config", default=None,
                        help="Epics buffer/writer config JSON (pv_list, pulse_id_pv, ...)")
    add_ipc_dir(parser)
    parser.add_argument("--log-dir", default=None,
                        help="directory of the service logs (default: a new temporary one)")
    add_broker_arguments(parser)
    add_redis_arguments(parser)
    add_log_level(parser)
    args = parser.parse_args(argv)
    try:
        broker = broker_address(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.simulate is not None and args.simulate <= 0:
        parser.error(f"--simulate: expected a frame rate > 0, got {args.simulate}")
    setup_logging(args.log_level)
    options = LaunchOptions(args.ipc_dir, args.log_dir, args.simulate, args.ioc_prefix,
                            args.ioc_port, args.epics_config, args.broker_url,
                            args.redis_host, args.redis_port, args.rest_port)
    try:
        launcher = Launcher(args.config, options)
    except ConfigError as exc:
        print(f"stddaq-run: error: {exc}", file=sys.stderr)
        return 1
    try:
        socket.create_connection(broker, timeout=BROKER_CHECK_S).close()
    except OSError as exc:
        print(f"stddaq-run: error: RabbitMQ at {broker[0]}:{broker[1]} does not answer "
              f"({exc.strerror or exc}): start it, or name it with "
              f"{spelling(args, 'broker_url')} HOST[:PORT]",
              file=sys.stderr)
        return 1
    stop = stop_on_signals()
    try:
        launcher.start()
    except AlreadyRunningError as exc:
        print(f"stddaq-run: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"stddaq-run: error: a service did not start: {exc}", file=sys.stderr)
        return 1
    try:
        deployments = ConfigDeployments(redis_client(args.redis_host, args.redis_port),
                                        launcher.raw_config)
    except redis.RedisError as exc:
        log.warning("configs deployed through the REST interface will not be applied: %s",
                    exc)
        deployments = None
    announce_ready("std-daq for %s running; logs in %s; Ctrl-C stops it",
                   launcher.config.detector_name, launcher.log_dir)
    try:
        launcher.supervise(stop, deployments)
    finally:
        launcher.stop()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
