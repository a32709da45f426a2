"""stddaq-ioc: a caproto IOC for one std-daq detector.

Record groups (PV = prefix + group + name): ``BUF:`` detector buffer (ioc.buffer),
``WRT:`` file writer (ioc.writer), ``EPB:`` Epics buffer (ioc.epics_buffer). The IOC starts
even when RabbitMQ, Redis or the data plane are down, shows them Disconnected, and
recovers when they return.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import signal
import socket
import sys
from dataclasses import dataclass

import caproto
import redis
from caproto.server import PVGroup, SubGroup, run, template_arg_parser

from fastcore.config import ConfigError, load_config
from fastcore.runtime import (
    add_broker_arguments,
    add_ipc_dir,
    add_redis_arguments,
    announce_ready,
    broker_address,
    handle_signals,
    redis_client,
    setup_logging,
)
from ioc.access import AccessRules
from ioc.buffer import BufferGroup
from ioc.epics_buffer import EpicsBufferGroup
from ioc.writer import WriterGroup
from services.daq_client import DaqClient

DESC_MAX = 40  # characters of an EPICS record's DESC field


@dataclass(frozen=True)
class IocSettings:
    detector_name: str
    ipc_dir: str
    writer_service: str
    epics_buffer_service: str | None
    broker_host: str
    broker_port: int
    redis_host: str
    redis_port: int

    def redis(self) -> redis.Redis:
        return redis_client(self.redis_host, self.redis_port)

    def daq_client(self) -> DaqClient:
        return DaqClient(self.writer_service, self.broker_host, self.redis(),
                         broker_port=self.broker_port)


class StddaqIOC(PVGroup):
    """All records of one detector."""

    buf = SubGroup(BufferGroup, prefix="BUF:", doc="Detector buffer")
    wrt = SubGroup(WriterGroup, prefix="WRT:", doc="File writer")
    epb = SubGroup(EpicsBufferGroup, prefix="EPB:", doc="Epics buffer")

    def __init__(self, *args, settings: IocSettings, **kwargs):
        self.settings = settings
        super().__init__(*args, **kwargs)


async def publish_record_fields(pvdb: dict) -> None:
    """Store each record's DESC (its doc=), EGU and PREC in the fields themselves: caproto
    answers a CA get of them through getters, but a monitor (a phoebus label) gets the
    stored value, empty until written."""
    for channel in {id(c): c for c in pvdb.values()}.values():
        fields = getattr(channel, "field_inst", None)
        if fields is None:
            continue
        doc = getattr(channel, "__doc__", None)
        if doc and hasattr(fields, "description"):
            await fields.description.write(doc[:DESC_MAX])
        units = getattr(channel, "units", None)
        if units and hasattr(fields, "engineering_units"):
            await fields.engineering_units.write(units)
        precision = getattr(channel, "precision", None)
        if precision and hasattr(fields, "display_precision"):
            await fields.display_precision.write(precision)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser, split_args = template_arg_parser(
        default_prefix="STDDAQ:", desc="EPICS records (BUF:, WRT:, EPB:) of a std-daq "
        "detector: buffer state and counters, file writing (areaDetector style), Epics buffer.",
        supported_async_libs=("asyncio",))
    parser.add_argument("config", help="detector config JSON")
    parser.add_argument("--writer-service", default=None,
                        help="service name of the writer agent (default: <detector>.writer)")
    parser.add_argument("--epics-buffer-service", default=None,
                        help="service name of the Epics buffer (default: none)")
    add_broker_arguments(parser)
    parser.add_argument("--broker-port", type=int, default=None,
                        help="RabbitMQ port, when --broker-url does not name one")
    add_redis_arguments(parser)
    add_ipc_dir(parser)
    parser.add_argument("--write-hosts", type=_names, default=None, metavar="HOST,...",
                        help="only these client hosts may write PVs (as the clients name "
                        "themselves; default: any host); everyone may read")
    parser.add_argument("--write-users", type=_names, default=None, metavar="USER,...",
                        help="only these client users may write PVs (default: any user)")
    args = parser.parse_args(argv)
    ioc_options, run_options = split_args(args)
    setup_logging(logging.INFO)
    try:
        config = load_config(args.config)
        broker_host, broker_port = broker_address(args)
    except (ConfigError, ValueError) as exc:
        print(f"stddaq-ioc: error: {exc}", file=sys.stderr)
        return 1
    settings = IocSettings(
        detector_name=config.detector_name, ipc_dir=args.ipc_dir,
        writer_service=args.writer_service or f"{config.detector_name}.writer",
        epics_buffer_service=args.epics_buffer_service, broker_host=broker_host,
        broker_port=args.broker_port or broker_port,
        redis_host=args.redis_host, redis_port=args.redis_port)
    port = int(caproto.get_environment_variables()["EPICS_CA_SERVER_PORT"])
    taken = taken_ca_port(run_options.get("interfaces") or ["0.0.0.0"], port)
    if taken:
        print(f"stddaq-ioc: error: the CA server port {port} on {taken} is taken (another "
              "IOC?): stop it, or give this IOC its own EPICS_CA_SERVER_PORT (caproto would "
              "otherwise move to a random port that clients do not search)", file=sys.stderr)
        return 1
    ioc = StddaqIOC(settings=settings, **ioc_options)
    rules = AccessRules.from_lists(args.write_hosts, args.write_users)
    rules.apply(ioc.pvdb)

    async def announce(async_lib) -> None:
        await publish_record_fields(ioc.pvdb)
        announce_ready("%d PVs with prefix %s on %s; %s", len(ioc.pvdb), ioc_options["prefix"],
                       ", ".join(run_options.get("interfaces") or ["all interfaces"]),
                       rules.describe())

    def terminate(*_) -> None:
        raise KeyboardInterrupt  # caproto shuts down cleanly (shutdown hooks) on it

    handle_signals(terminate, (signal.SIGTERM,))
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run(ioc.pvdb, startup_hook=announce, **run_options)
    except OSError as exc:  # e.g. the UDP search port bound exclusively by another program
        reason = exc.strerror or str(exc)
        print(f"stddaq-ioc: error: cannot serve Channel Access on port {port}: {reason}",
              file=sys.stderr)
        return 1
    logging.getLogger(__name__).info("stopped")
    return 0


def taken_ca_port(interfaces: list[str], port: int) -> str | None:
    """The first interface on which the CA server's TCP ``port`` cannot be bound, if any."""
    for interface in interfaces:
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((interface, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return interface
    return None


if __name__ == "__main__":
    raise SystemExit(main())
