"""stddaq-ioc as a real process, read and written by real CA clients over loopback:
pyepics (libca) and caproto-get/put, in subprocesses with their own EPICS environment."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import h5py
import pytest

from tests.conftest import Proc, free_tcp_port, free_udp_ports, module_cmd
from tests.netproxy import TcpProxy
from tests.test_writer_agent_service import AgentSetup

pytestmark = pytest.mark.timeout(180)


# The clients register with a repeater at this port (a free UDP port, not the server port
# + 1, which may be another IOC's or a client's port: caproto-put once failed on a foreign
# datagram there, "Packet with bad command ID 0x18").
REPEATER_PORT = free_udp_ports(1)


def ca_env(port: int) -> dict:
    env = dict(os.environ)
    env.update(EPICS_CA_AUTO_ADDR_LIST="NO", EPICS_CA_ADDR_LIST=f"127.0.0.1:{port}",
               EPICS_CA_SERVER_PORT=str(port), EPICS_CA_REPEATER_PORT=str(REPEATER_PORT))
    return env


class Ioc:
    def __init__(self, config_path, ipc_dir, log_dir, writer_service="none.writer",
                 broker_port=5672, epics_buffer_service=None, extra=()):
        self.port = free_tcp_port()
        self.prefix = f"T{uuid.uuid4().hex[:6]}:"
        args = module_cmd("ioc.server", str(config_path), "--prefix", self.prefix,
                          "--interfaces=127.0.0.1", "--ipc-dir", ipc_dir,
                          "--writer-service", writer_service,
                          "--broker-host", "127.0.0.1")
        if broker_port != 5672:
            args += ["--broker-port", str(broker_port)]
        if epics_buffer_service:
            args += ["--epics-buffer-service", epics_buffer_service]
        args += list(extra)
        self.proc = Proc(args, log_dir / "ioc.log", env=ca_env(self.port))
        self.proc.wait_for("ready", 30)

    def client(self, code: str, timeout: float = 60) -> dict:
        """Run pyepics code (``P`` = the prefix) in a fresh process; it prints JSON."""
        script = f"import json, epics, time\nP = {self.prefix!r}\n" + textwrap.dedent(code)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=ca_env(self.port), timeout=timeout)
        assert done.returncode == 0, done.stderr + self.proc.output[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def caproto(self, *args: str) -> str:
        done = subprocess.run(["caproto-" + args[0], "--no-repeater", *args[1:]],
                              capture_output=True, text=True, env=ca_env(self.port),
                              timeout=30, cwd="/tmp",
                              executable=os.path.join(os.path.dirname(sys.executable),
                                                      "caproto-" + args[0]))
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop(self) -> int:
        return self.proc.stop()


WAIT = """
def wait(pv, want, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = epics.caget(pv, as_string=True, use_monitor=False)
        if value == want:
            return value
        time.sleep(0.1)
    return epics.caget(pv, as_string=True, use_monitor=False)
def sev(pv):
    return epics.PV(pv, form="ctrl").get_ctrlvars(timeout=5)["severity"]
"""


@pytest.fixture
def stack(make_config, ipc_dir, tmp_path):
    """The writer side (h5 writer, writer agent, fake assembler) plus the IOC."""
    agent = AgentSetup(make_config, ipc_dir, tmp_path)
    config_path = tmp_path / f"{agent.config.detector_name}.json"
    try:
        ioc = Ioc(config_path, ipc_dir, tmp_path, writer_service=agent.service)
    except BaseException:
        agent.close()
        raise
    yield agent, ioc
    code = ioc.stop()
    agent.close()
    assert code == 0, ioc.proc.output


def test_long_path_round_trips_through_pyepics_and_caproto(stack, tmp_path):
    _, ioc = stack
    long_dir = tmp_path / ("d" * 60) / ("e" * 60) / ("f" * 60)
    long_dir.mkdir(parents=True)
    path = str(long_dir) + "/"
    assert len(path) >= 200
    result = ioc.client(f"""
epics.caput(P + "WRT:FilePath", {str(long_dir)!r}, wait=True)
time.sleep(0.3)
print(json.dumps({{
    "path": epics.caget(P + "WRT:FilePath", as_string=True, use_monitor=False),
    "exists": epics.caget(P + "WRT:FilePathExists_RBV", as_string=True, use_monitor=False),
    # a monitor's first value, as a display gets it: the fields are stored, not computed
    "desc": epics.PV(P + "WRT:NumCapture.DESC", auto_monitor=True).get(as_string=True),
    "egu": epics.PV(P + "BUF:ArrayRate_RBV.EGU", auto_monitor=True).get(as_string=True),
    "prec": epics.PV(P + "BUF:ArrayRate_RBV.PREC", auto_monitor=True).get()}}))
""")
    assert result["path"] == path and result["exists"] == "Yes"
    assert result["desc"] == "Images to write per capture"
    assert result["egu"] == "Hz" and result["prec"] == 1
    assert ioc.caproto("get", "-S", f"{ioc.prefix}WRT:FilePath").split(None, 1)[1].strip() == \
        path
    ioc.caproto("put", "-S", f"{ioc.prefix}WRT:FileName", "x" * 150)
    assert ioc.client('print(json.dumps(epics.caget(P + "WRT:FileName", as_string=True, '
                      'use_monitor=False)))') == "x" * 150


def test_capture_writes_a_file_and_the_records_follow(stack):
    agent, ioc = stack
    out_dir = str(agent.out_dir)
    # the client waits for "Writing", then the test produces images: run both together
    go = f"/tmp/{ioc.prefix.strip(':')}.go"
    proc = subprocess.Popen([sys.executable, "-c", f"import json, epics, time\nP = {ioc.prefix!r}\n"
                             + textwrap.dedent(WAIT) + textwrap.dedent(f"""
epics.caput(P + "WRT:FilePath", {out_dir!r}, wait=True)
epics.caput(P + "WRT:FileName", "scan", wait=True)
epics.caput(P + "WRT:FileNumber", 7, wait=True)
epics.caput(P + "WRT:NumCapture", 3, wait=True)
epics.caput(P + "WRT:Capture", 1, wait=True)
state = wait(P + "WRT:WriterState_RBV", "Writing")
open({go!r}, "w").close()
captured = wait(P + "WRT:NumCaptured_RBV", "3")
done = wait(P + "WRT:Capture", "Done")
print(json.dumps({{"state": state, "captured": captured, "capture": done,
    "full": epics.caget(P + "WRT:FullFileName_RBV", as_string=True, use_monitor=False),
    "status": epics.caget(P + "WRT:WriteStatus", as_string=True, use_monitor=False),
    "number": epics.caget(P + "WRT:FileNumber", use_monitor=False),
    "final": wait(P + "WRT:WriterState_RBV", "Done"),
    "counter": wait(P + "BUF:ArrayCounter_RBV", "3")}}))
""")], env=ca_env(ioc.port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    agent.emit(3, pause=0.05)
    stdout, stderr = proc.communicate(timeout=60)
    os.unlink(go)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    expected = os.path.join(out_dir, "scan_007.h5")
    assert result == {"state": "Writing", "captured": "3", "capture": "Done",
                      "full": expected, "status": "Write OK", "number": 8, "final": "Done",
                      "counter": "3"}, ioc.proc.output[-2000:]
    with h5py.File(expected, "r") as f:
        assert f[agent.config.detector_name]["data"].shape[0] == 3


def test_bad_path_is_published_and_other_records_stay_clean(stack):
    agent, ioc = stack
    missing = str(agent.out_dir / "no" / "such")
    result = ioc.client(WAIT + f"""
epics.caput(P + "WRT:FilePath", {missing!r}, wait=True)
epics.caput(P + "WRT:FileName", "x", wait=True)
epics.caput(P + "WRT:Capture", 1, wait=True)
time.sleep(0.5)
print(json.dumps({{
    "exists": epics.caget(P + "WRT:FilePathExists_RBV", as_string=True, use_monitor=False),
    "exists_sev": sev(P + "WRT:FilePathExists_RBV"),
    "status": wait(P + "WRT:WriteStatus", "Write error"),
    "status_sev": sev(P + "WRT:WriteStatus"),
    "message": epics.caget(P + "WRT:WriteMessage", as_string=True, use_monitor=False),
    "capture": epics.caget(P + "WRT:Capture", as_string=True, use_monitor=False),
    "others": [sev(P + name) for name in ("WRT:NumCapture", "WRT:FileName",
                                          "BUF:ArrayCounter_RBV", "WRT:NumCaptured_RBV")]}}))
""")
    assert result["exists"] == "No" and result["exists_sev"] == 2
    assert result["status"] == "Write error" and result["status_sev"] == 2
    assert result["message"] == f"output_file: directory {missing} does not exist"
    assert result["capture"] == "Done"
    assert result["others"] == [0, 0, 0, 0]


def test_starts_disconnected_and_recovers(make_config, ipc_dir, tmp_path):
    path, _ = make_config("jungfrau_1m.json")
    with TcpProxy(("127.0.0.1", 5672)) as proxy:
        proxy.down()
        ioc = Ioc(path, ipc_dir, tmp_path, broker_port=proxy.port,
                  epics_buffer_service=f"t.{uuid.uuid4().hex[:6]}.epics_buffer")
        try:
            before = ioc.client(WAIT + """
print(json.dumps({
    "writer": wait(P + "WRT:WriterState_RBV", "Disconnected"),
    "writer_sev": sev(P + "WRT:WriterState_RBV"),
    "buffer": wait(P + "BUF:DetectorState_RBV", "Disconnected"),
    "buffer_sev": sev(P + "BUF:DetectorState_RBV"),
    "epb": wait(P + "EPB:State_RBV", "Disconnected")}))
""")
            assert before == {"writer": "Disconnected", "writer_sev": 3,
                              "buffer": "Disconnected", "buffer_sev": 3,
                              "epb": "Disconnected"}
            proxy.up()
            after = ioc.client(WAIT + """
print(json.dumps({"writer": wait(P + "WRT:WriterState_RBV", "Idle", 30),
                  "writer_sev": sev(P + "WRT:WriterState_RBV")}))
""")
            assert after == {"writer": "Idle", "writer_sev": 0}, ioc.proc.output[-2000:]
        finally:
            began = time.monotonic()
            ioc.proc.popen.send_signal(signal.SIGTERM)
            assert ioc.proc.popen.wait(10) == 0
            assert time.monotonic() - began < 5
            ioc.stop()


def test_access_rules_let_only_the_named_users_write(make_config, ipc_dir, tmp_path):
    path, _ = make_config("jungfrau_1m.json")
    me = getpass.getuser()
    for writers, can_write in (("operator,e12345", False), (f"operator,{me}", True)):
        ioc = Ioc(path, ipc_dir, tmp_path, extra=["--write-users", writers])
        try:
            names = ", ".join(sorted(writers.lower().split(",")))
            assert f"writes only from any host by {names}; everyone reads" in ioc.proc.output
            pv = ioc.prefix + "WRT:NumCapture"
            done = subprocess.run(
                [os.path.join(os.path.dirname(sys.executable), "caproto-put"), "--no-repeater",
                 pv, "7"], capture_output=True, text=True, env=ca_env(ioc.port),
                timeout=30, cwd="/tmp")
            value = ioc.caproto("get", pv).split()[-1].strip("[]")
            if can_write:
                assert done.returncode == 0, done.stderr
                assert value == "7"
            else:
                # caproto-put prints the server's refusal (and exits 0 all the same)
                assert f"username {me} cannot write" in done.stdout + done.stderr, done
                assert value != "7"  # readable, unchanged
        finally:
            ioc.stop()


@pytest.mark.parametrize("layer", ["pyepics", "caproto"])
def test_ophyd_epics_signals_over_the_ioc(stack, tmp_path, layer):
    _, ioc = stack
    long_dir = tmp_path / ("p" * 90) / ("q" * 90)
    long_dir.mkdir(parents=True)
    script = textwrap.dedent(f"""
        import json, ophyd
        ophyd.set_cl({layer!r})
        from ophyd import EpicsSignal, EpicsSignalRO
        path = EpicsSignal({ioc.prefix + 'WRT:FilePath'!r}, string=True, name="path")
        count = EpicsSignal({ioc.prefix + 'WRT:NumCapture'!r}, name="count")
        state = EpicsSignalRO({ioc.prefix + 'WRT:WriterState_RBV'!r}, string=True, name="s")
        for sig in (path, count, state):
            sig.wait_for_connection(timeout=10)
        path.set({str(long_dir) + "/"!r}).wait(10)
        count.set(42).wait(10)
        print(json.dumps([path.get(use_monitor=False), count.get(), state.get()]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=ca_env(ioc.port), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    path, count, state = json.loads(done.stdout.strip().splitlines()[-1])
    assert path == str(long_dir) + "/" and count == 42 and state in ("Idle", "Disconnected")


def test_capture_zero_stops_the_write_with_a_valid_file(stack):
    agent, ioc = stack
    from tests.test_ophyd import FreeRunning

    detector = FreeRunning(agent, rate_hz=20)
    try:
        result = ioc.client(WAIT + f"""
epics.caput(P + "WRT:FilePath", {str(agent.out_dir)!r}, wait=True)
epics.caput(P + "WRT:FileName", "stopped", wait=True)
epics.caput(P + "WRT:NumCapture", 100000, wait=True)
epics.caput(P + "WRT:Capture", 1, wait=True)
writing = wait(P + "WRT:WriterState_RBV", "Writing")
time.sleep(1.0)
epics.caput(P + "WRT:Capture", 0, wait=True)
print(json.dumps({{"writing": writing,
    "capture": wait(P + "WRT:Capture", "Done"),
    "state": wait(P + "WRT:WriterState_RBV", "Done"),
    "captured": epics.caget(P + "WRT:NumCaptured_RBV", use_monitor=False),
    "status": epics.caget(P + "WRT:WriteStatus", as_string=True, use_monitor=False),
    "status_sev": sev(P + "WRT:WriteStatus"),
    "message": epics.caget(P + "WRT:WriteMessage", as_string=True, use_monitor=False),
    "full": epics.caget(P + "WRT:FullFileName_RBV", as_string=True, use_monitor=False)}}))
""")
    finally:
        detector.stop()
    assert result["writing"] == "Writing" and result["capture"] == "Done"
    assert result["state"] == "Done" and result["captured"] > 0
    # a stopped capture is a partial file: OK, with what it holds as a minor alarm
    assert result["status"] == "Write OK" and result["status_sev"] == 1
    assert result["message"] == (f"{result['captured']} of 100000 images in {result['full']} "
                                 f"({result['captured']} good)")
    with h5py.File(result["full"], "r") as f:
        assert f[agent.config.detector_name]["data"].shape[0] == result["captured"]


def test_a_taken_ca_port_is_named_not_silently_moved(make_config, ipc_dir, tmp_path):
    import socket

    path, _ = make_config("jungfrau_1m.json")
    port = free_tcp_port()
    with socket.socket() as other_ioc:
        other_ioc.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other_ioc.bind(("127.0.0.1", port))
        other_ioc.listen(1)
        done = subprocess.run(module_cmd("ioc.server", str(path), "--prefix", "TQ:",
                                         "--interfaces=127.0.0.1", "--ipc-dir", ipc_dir),
                              capture_output=True, text=True, env=ca_env(port), timeout=60)
    assert done.returncode == 1, done.stderr
    assert (f"stddaq-ioc: error: the CA server port {port} on 127.0.0.1 is taken (another "
            "IOC?)") in done.stderr
    assert "Traceback" not in done.stderr
