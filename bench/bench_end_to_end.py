"""End to end: the highest zero-loss rate of one Jungfrau module from UDP to an HDF5 file,
as a ratio to the highest zero-loss receive-only rate measured in the same run.

Receive-only: stddaq-udp-recv alone; this process pulls the ModuleFrames and counts the
packets. End to end: stddaq-udp-recv, stddaq-sync, stddaq-assembler, stddaq-h5-writer and
stddaq-writer-agent as processes; this process is the user, one write request per step
through RabbitMQ (DaqClient; RabbitMQ and Redis on 127.0.0.1), and counts an image lost
when it is not in the file as a good image (the request's result). Each step also reports
every process's CPU time per
image (user + system, all its threads, from /proc), next to the costs no implementation
can avoid, measured in the same run on the same images: a plain socket drain's CPU per
frame (bench_receive's drain process, fed at the same rates), a memcpy of the image and a
plain ``os.write`` of it into the same directory as the file. ``cpu_per_image_ratio`` is
the whole pipeline's CPU per image over the sum of those three, at 1 kHz. Since the h5
writer writes with O_DIRECT (no page-cache copy), a plain O_DIRECT ``os.write`` of the same
images is measured too, and ``cpu_per_image_ratio_to_direct_floor`` puts the pipeline
against that cheaper floor. Every series is
fed by bench_receive's pre-built-packet sender (sendmmsg, GSO) on 127.0.0.1, at the same
stepped rates, for ``--seconds`` per step. The last line of the output is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pika
import redis
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_receive as br

from fastcore.direct_io import aligned_zeros
from fastcore.formats import MODULE_FRAME
from fastcore.launch import ChildProcess
from fastcore.names import Stream
from fastcore.process import ipc_address
from fastcore.status import status_key
from fastcore.udp import DEFAULT_RCVBUF
from services.broker.protocol import request_queue_name
from services.daq_client import DaqClient, StdDaqError, WriteRun

RATES = [100, 250, 500, 1000, 1500, 2000, 2500]
COST_RATE = 1000  # the rate of cpu_per_image_ratio
IDLE_S = 5.0  # the pipeline waiting, measured before the steps


def write_config(work: Path, port: int) -> tuple[Path, str]:
    name = f"e2e{uuid.uuid4().hex[:8]}"
    path = work / f"{name}.json"
    path.write_text(json.dumps({
        "detector_name": name, "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
        "image_pixel_height": 512, "image_pixel_width": 1024, "start_udp_port": port,
        "writer_user_id": os.getuid(), "udp_host": "127.0.0.1", "n_image_slots": 2000,
        "output_root": str(work),
        "n_frame_slots": 500, "module_positions": {"0": [0, 0, 1023, 511]}}))
    return path, name


def start(module: str, config: Path, work: Path, *extra: str) -> ChildProcess:
    args = [*extra, "--json-config-file", str(config)] if extra else [str(config)]
    child = ChildProcess.module(module, [*args, "--ipc-dir", str(work)],
                                work / f"{module.split('.')[-1]}.log")
    child.wait_for("ready", 60)
    return child


def send(sender, port: int, rate: float, frames: int, first: int) -> int:
    return send_timed(sender, port, rate, frames, first)[0]


def send_timed(sender, port: int, rate: float, frames: int, first: int) -> tuple[int, float]:
    """Frames sent and the rate the sender reached (it falls short when the CPU is busy)."""
    sender.send((port, rate, frames / rate, frames, first))
    sent, _, elapsed, _ = sender.recv()
    return sent, sent / max(elapsed, frames / rate)


def receive_only(sender, config: Path, name: str, port: int, work: Path, rates, seconds):
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.bind(ipc_address(str(work), name, Stream.FRAMES))
    recv = start("fastcore.udp_recv", config, work)
    results, frame = {}, 1
    try:
        send(sender, port, 500, 500, frame)  # warm-up: page in the FrameBuffer
        frame += 500
        time.sleep(0.5)
        while pull.poll(200):
            pull.recv()
        for rate in rates:
            n = int(rate * seconds)
            sent, sent_hz = send_timed(sender, port, rate, n, frame)
            frame += sent
            packets = frames = 0
            while pull.poll(500):
                records = np.frombuffer(pull.recv(), MODULE_FRAME)  # one or more
                packets += int(records["n_recv_packets"].sum())
                frames += len(records)
            lost = sent * 128 - packets
            results[rate] = {"sent": sent, "sent_hz": round(sent_hz, 1), "lost_packets": lost}
            print(f"  receive-only {rate:5d} Hz: {sent} frames sent at {sent_hz:.0f} Hz, "
                  f"{lost} packets lost", flush=True)
    finally:
        recv.stop()
        pull.close(0)
    return results


def cpu_seconds(child: ChildProcess) -> float:
    """User + system CPU time of a child and the processes of its session (a receiver per
    module), all their threads included."""
    total = 0
    for pid in child.session_pids():
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def end_to_end(sender, config: Path, name: str, port: int, work: Path, rates, seconds):
    service = f"{name}.writer"
    stages = {m.split(".")[-1]: start(m, config, work) for m in (
        "fastcore.udp_recv", "fastcore.sync", "fastcore.assembler", "fastcore.h5_writer")}
    stages["writer_agent"] = start("services.writer_agent", config, work,
                                   "--service-name", service)
    client = DaqClient(service, "127.0.0.1", redis.Redis("127.0.0.1", 6379))
    source = source_ring()
    results, frame = {}, 1
    try:
        client.check_agent(name)
        cpu = {stage: cpu_seconds(child) for stage, child in stages.items()}
        time.sleep(IDLE_S)  # no detector, no run: what waiting costs
        results["idle_percent_of_a_core"] = {
            stage: round((cpu_seconds(child) - cpu[stage]) * 100 / IDLE_S, 2)
            for stage, child in stages.items()}
        print(f"  idle {IDLE_S:g} s: % of a core {results['idle_percent_of_a_core']}",
              flush=True)
        send(sender, port, 500, 500, frame)  # warm-up
        frame += 500
        time.sleep(1.0)
        for run_id, rate in enumerate(rates, start=1):
            n = int(rate * seconds)
            out = work / f"run{run_id}.h5"
            prefault(work, n)
            run = client.start_write({"output_file": str(out), "n_images": n,
                                      "image_timeout": 30}, timeout=30.0)
            cpu = {stage: cpu_seconds(child) for stage, child in stages.items()}
            sent, sent_hz = send_timed(sender, port, rate, n, frame)
            frame += sent
            result = _finish(client, run)
            cpu_ms = {stage: round((cpu_seconds(child) - cpu[stage]) * 1e3 / sent, 3)
                      for stage, child in stages.items()}
            out.unlink()
            rows = result["n_images"] + result["n_missing"]
            floor = copy_costs(work, rows, source)  # into the pages it freed
            lost = sent - result["n_good"]
            results[rate] = {"sent": sent, "sent_hz": round(sent_hz, 1), "written": rows,
                             "good": result["n_good"], "flags": result["n_flagged"],
                             "absent": result["n_absent"], "outcome": result["outcome"],
                             "lost_images": lost, "cpu_ms_per_image": cpu_ms,
                             "copy_ms_per_image": floor}
            print(f"  end-to-end   {rate:5d} Hz: {sent} frames sent at {sent_hz:.0f} Hz, "
                  f"{result['outcome']}: {result['summary']} "
                  f"-> {lost} images lost; CPU ms/image {cpu_ms}", flush=True)
    finally:
        client.close()
        for child in reversed(stages.values()):
            child.stop()
        forget_service(service)
    return results


def _finish(client: DaqClient, run: WriteRun) -> dict:
    """The request's result once it ended: a run short of images after the sender
    finished (lost before the writer) is killed after 5 s and ends partial."""
    if not run.done.wait(5.0):
        client.kill(run, timeout=60.0)
    if not run.done.wait(60.0):
        raise RuntimeError(f"request {run.request_id} did not end within 60 s of its kill")
    if run.failed:
        raise StdDaqError(f"request {run.request_id} failed: {run.message}")
    return run.result or {}


def forget_service(service: str) -> None:
    """Remove the writer agent's request queue and Redis status."""
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    try:
        connection.channel().queue_delete(request_queue_name(service))
    finally:
        connection.close()
    redis.Redis("127.0.0.1", 6379).delete(status_key(service))


def drain_costs(ctx, sender, port: int, rates, seconds: float) -> dict[int, float]:
    """CPU ms per frame of a plain socket drain (recv_into, counting) at each rate."""
    parent, child = ctx.Pipe()
    drain = ctx.Process(target=br.drain_main, args=(child, port, DEFAULT_RCVBUF, None),
                        daemon=True)
    drain.start()
    costs = {}
    try:
        parent.recv()  # ready
        frame = 1
        for rate in rates:
            parent.send(("arm",))
            _, cpu_start = parent.recv()
            sent = send(sender, port, rate, int(rate * seconds), frame)
            frame += sent
            time.sleep(0.5)  # the drain has caught up and published at a quiet moment
            parent.send(("snapshot",))
            *_, cpu_end = parent.recv()
            costs[rate] = round((cpu_end - cpu_start) * 1e3 / sent, 3)
            print(f"  plain drain  {rate:5d} Hz: {sent} frames, {costs[rate]} CPU ms/frame",
                  flush=True)
    finally:
        parent.send(("stop",))
        drain.join(10)
    return costs


def prefault(work: Path, n: int) -> None:
    """Write and delete ``n`` MiB in ``work`` (untimed), so that the next ``n`` MiB written
    land in page-cache pages the machine has just used: on a VM a page the guest touches
    for the first time (or after it went back to the host) costs several times more
    kernel time than a recycled one, which would otherwise decide who pays what."""
    path = work / "prefault.bin"
    block = np.zeros(2**20, np.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(n):
            os.write(fd, block)
    finally:
        os.close(fd)
        path.unlink()


SOURCE_IMAGES = 256  # distinct 1 MiB images the baselines copy from: far more than a cache


def source_ring() -> np.ndarray:
    """Distinct images for the memcpy and write baselines: like the ImageBuffer the writer
    copies from, they come from memory, not from a cache-hot single image; page-aligned,
    as ImageBuffer slots are (O_DIRECT)."""
    shape = (SOURCE_IMAGES, 512, 1024)
    ring = aligned_zeros(2 * int(np.prod(shape))).view(np.uint16).reshape(shape)
    ring[:] = np.random.default_rng(0).integers(0, 2**16, shape, np.uint16)
    return ring


def copy_costs(work: Path, n: int, source: np.ndarray) -> dict[str, float]:
    """CPU ms per image of a memcpy and of a plain os.write of ``n`` images (taken in turn
    from ``source``) into a new file in ``work``, right after the run's file was deleted
    (the same recycled pages as the writer had, see :func:`prefault`); and, reported
    beside them, of a plain O_DIRECT os.write of the same images (``write_direct``: what
    stddaq-h5-writer does, the page cache bypassed)."""
    out = np.empty_like(source[0])
    start = time.process_time()
    for i in range(n):
        np.copyto(out, source[i % len(source)])
    memcpy = time.process_time() - start
    written = timed_write(work / "plain.bin", 0, n, source)
    direct = timed_write(work / "plain.bin", os.O_DIRECT, n, source)
    return {"memcpy": round(memcpy * 1e3 / n, 3), "write": round(written * 1e3 / n, 3),
            "write_direct": round(direct * 1e3 / n, 3)}


def timed_write(path: Path, flags: int, n: int, source: np.ndarray) -> float:
    """CPU seconds of ``os.write`` of ``n`` images from ``source`` into a new file opened
    with ``flags`` added (deleted after)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
    start = time.process_time()
    try:
        for i in range(n):
            os.write(fd, source[i % len(source)])
        return time.process_time() - start
    finally:
        os.close(fd)
        path.unlink()


def best(results: dict, key: str) -> float:
    """The highest rate the sender reached in a step without loss (a step in which the
    sender fell short counts at the rate it reached, not at its target)."""
    ok = [min(rate, r["sent_hz"]) for rate, r in results.items() if r[key] == 0]
    return max(ok) if ok else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per rate step")
    parser.add_argument("--quick", action="store_true", help="1 s steps, fewer rates")
    parser.add_argument("--huge-pages", action="store_true",
                        help="buffers on a private huge=always tmpfs (as bench_receive; "
                        "needs root)")
    args = parser.parse_args(argv)
    if args.huge_pages:
        with br.huge_page_shm(4096):
            return run(args)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Both series of rate steps (buffers in ``shm_dir()``)."""
    rates = RATES[:5] if args.quick else RATES
    seconds = 1.0 if args.quick else args.seconds
    work = Path(tempfile.mkdtemp(prefix="stddaq-e2e-"))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    sender = ctx.Process(target=br.sender_main, args=(child, None, True), daemon=True)
    sender.start()
    try:
        port = br.free_udp_port()
        config, name = write_config(work, port)
        print(f"1 Jungfrau module, {seconds:g} s per step, rates {rates} Hz; buffers in "
              f"{br.shm_pages()}")
        recv = receive_only(parent, config, name, port, work, rates, seconds)
        drain = drain_costs(ctx, parent, br.free_udp_port(), rates, seconds)
        e2e = end_to_end(parent, config, name, port, work, rates, seconds)
    finally:
        parent.send(None)
        sender.join(10)
        shutil.rmtree(work, ignore_errors=True)
    idle = e2e.pop("idle_percent_of_a_core")
    receive_best, e2e_best = best(recv, "lost_packets"), best(e2e, "lost_images")
    costs = {}
    for rate, step in e2e.items():
        pipeline = sum(step["cpu_ms_per_image"].values())
        copies = step["copy_ms_per_image"]
        floor = drain[rate] + copies["memcpy"] + copies["write"]
        direct_floor = drain[rate] + copies["memcpy"] + copies["write_direct"]
        costs[rate] = {"pipeline_ms": round(pipeline, 3), "floor_ms": round(floor, 3),
                       "ratio": round(pipeline / floor, 2),
                       "direct_floor_ms": round(direct_floor, 3),
                       "ratio_to_direct_floor": round(pipeline / direct_floor, 2)}
        print(f"  cost at {rate:5d} Hz: pipeline {pipeline:.2f} CPU ms/image, floor (drain "
              f"{drain[rate]:.2f} + memcpy + write {copies}) {floor:.2f} -> ratio "
              f"{costs[rate]['ratio']} (with an O_DIRECT write instead: "
              f"{costs[rate]['ratio_to_direct_floor']})")
    figures = {
        "benchmark": "bench_end_to_end", "seconds_per_step": seconds, "rates_hz": rates,
        "huge_pages": args.huge_pages, "shm": br.shm_pages(),
        "receive_only_best_zero_loss_hz": receive_best,
        "end_to_end_best_zero_loss_hz": e2e_best,
        "end_to_end_best_zero_loss_gbps": round(e2e_best * 2**20 / 1e9, 3),
        "ratio_end_to_end_to_receive_only": round(e2e_best / receive_best, 3)
        if receive_best else None,
        "cpu_per_image_ratio": costs.get(COST_RATE, {}).get("ratio"),
        "cpu_per_image_ratio_to_direct_floor": costs.get(COST_RATE, {}).get(
            "ratio_to_direct_floor"),
        "idle_percent_of_a_core": idle,
        "cost_per_rate": costs,
        "steps": {"receive_only": recv, "plain_drain_ms_per_frame": drain,
                  "end_to_end": e2e},
    }
    print(f"highest zero-loss rate: receive-only {receive_best:g} Hz, simulator -> file "
          f"{e2e_best:g} Hz (ratio {figures['ratio_end_to_end_to_receive_only']})")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
