"""A small caproto IOC for the EPICS buffer and writer tests, bound to 127.0.0.1 only.

    python -m tests.epics_ioc --prefix P --port N            # the main IOC
    python -m tests.epics_ioc --prefix P --port N --flaky    # only P:flaky (stop/restart it)

Main IOC PVs:

- ``<P>pulse_id`` (LONG): a counter incremented at 10 Hz, from ``--first_pulse_id``.
- ``<P>float`` (DOUBLE): updated on every 5th pulse (2 Hz) to ``pulse_id + 0.5``, stamped
  1 ms after that pulse, so the pulse id a writer should map it to is ``int(value)``.
- ``<P>string`` (STRING), ``<P>array`` (10 DOUBLEs), ``<P>setpoint`` (DOUBLE): only change
  when a client writes them.

Flaky IOC: ``<P>flaky`` (LONG), a counter at 5 Hz; stop the process to make it disconnect.

Every update is printed as ``update <pv> <value repr> <epics timestamp in us>`` so a test
can compare what a client recorded with what was served. ``ready`` is printed once the
server listens (the caproto log line ``Listening on 127.0.0.1:<port>`` shows the port).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time

EPICS_EPOCH_UNIX_S = 631152000  # 1990-01-01 in unix seconds


def _print_update(name: str, value, stamp_us: int) -> None:
    if hasattr(value, "tolist"):
        value = value.tolist()
    print(f"update {name} {value!r} {stamp_us}", flush=True)


def _now_us(offset_us: int = 0) -> int:
    return time.time_ns() // 1000 + offset_us


def _epics_stamp(stamp_us: int) -> tuple[int, int]:
    """An exact EPICS (seconds since 1990, nanoseconds) timestamp: caproto's float
    conversion rounds, this does not, so clients see exactly the printed microseconds."""
    seconds, micros = divmod(stamp_us, 1_000_000)
    return seconds - EPICS_EPOCH_UNIX_S, micros * 1000


def build(prefix: str, flaky: bool, first_pulse_id: int):
    from caproto.server import PVGroup, pvproperty

    class MainIOC(PVGroup):
        pulse_id = pvproperty(value=first_pulse_id - 1, name="pulse_id", dtype=int,
                              read_only=True)
        float_value = pvproperty(value=0.0, name="float", dtype=float, read_only=True)
        string = pvproperty(value="initial", name="string", dtype=str, report_as_string=True)
        array = pvproperty(value=[float(i) for i in range(10)], name="array", dtype=float,
                           max_length=10)
        setpoint = pvproperty(value=0.0, name="setpoint", dtype=float)

        @pulse_id.startup
        async def pulse_id(self, instance, async_lib):
            print("ready", flush=True)
            period = 0.1
            next_tick = time.monotonic()
            while True:
                pid = instance.value + 1
                stamp = _now_us()
                await instance.write(pid, timestamp=_epics_stamp(stamp))
                _print_update(self.prefix + "pulse_id", pid, stamp)
                if pid % 5 == 0:
                    value = pid + 0.5
                    await self.float_value.write(value, timestamp=_epics_stamp(stamp + 1000))
                    _print_update(self.prefix + "float", value, stamp + 1000)
                next_tick += period
                await async_lib.sleep(max(0.0, next_tick - time.monotonic()))

        @string.putter
        async def string(self, instance, value):
            _print_update(self.prefix + "string", value, _now_us())
            return value

        @array.putter
        async def array(self, instance, value):
            _print_update(self.prefix + "array", list(value), _now_us())
            return value

        @setpoint.putter
        async def setpoint(self, instance, value):
            _print_update(self.prefix + "setpoint", value, _now_us())
            return value

    class FlakyIOC(PVGroup):
        flaky = pvproperty(value=0, name="flaky", dtype=int, read_only=True)

        @flaky.startup
        async def flaky(self, instance, async_lib):
            print("ready", flush=True)
            while True:
                stamp = _now_us()
                await instance.write(instance.value + 1, timestamp=_epics_stamp(stamp))
                _print_update(self.prefix + "flaky", instance.value, stamp)
                await async_lib.sleep(0.2)

    return (FlakyIOC if flaky else MainIOC)(prefix=prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--port", type=int, required=True, help="CA server port (TCP+UDP)")
    parser.add_argument("--flaky", action="store_true", help="serve only <prefix>flaky")
    parser.add_argument("--first_pulse_id", type=int, default=1000)
    args = parser.parse_args(argv)
    # Loopback only: caproto reads the server port from EPICS_CA_SERVER_PORT, and its
    # beacons go to the beacon address list.
    os.environ["EPICS_CA_SERVER_PORT"] = str(args.port)
    os.environ["EPICS_CAS_AUTO_BEACON_ADDR_LIST"] = "NO"
    os.environ["EPICS_CAS_BEACON_ADDR_LIST"] = "127.0.0.1"
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout,
                        format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("caproto.ctx").setLevel(logging.INFO)
    from caproto.server import run

    ioc = build(args.prefix, args.flaky, args.first_pulse_id)
    with contextlib.suppress(KeyboardInterrupt):
        run(ioc.pvdb, interfaces=["127.0.0.1"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
