"""End to end: the highest zero-loss rate of one Jungfrau module from UDP to an HDF5 file,
as a ratio to the highest zero-loss receive-only rate measured in the same run.

Receive-only: stddaq-udp-recv alone; this process pulls the ModuleFrames and counts the
packets. End to end: stddaq-udp-recv, stddaq-sync, stddaq-assembler and stddaq-h5-writer
as processes; this process plays the writer agent (a StoreStream per image) and counts an
image lost when it is missing from the file or flagged. Both are fed by bench_receive's
pre-built-packet sender (sendmmsg, GSO) on 127.0.0.1, at the same stepped rates, for
``--seconds`` per step. The last line of the output is one JSON object.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_receive as br

from fastcore.formats import IMAGE_METADATA, MODULE_FRAME, ImageStatus
from fastcore.launch import ChildProcess
from fastcore.process import ipc_address
from fastcore.writer_protocol import RunInfo, image_message, stop_message

RATES = [250, 500, 1000, 1500, 2000, 2500]


def write_config(work: Path, port: int) -> tuple[Path, str]:
    name = f"e2e{uuid.uuid4().hex[:8]}"
    path = work / f"{name}.json"
    path.write_text(json.dumps({
        "detector_name": name, "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
        "image_pixel_height": 512, "image_pixel_width": 1024, "start_udp_port": port,
        "writer_user_id": 0, "udp_host": "127.0.0.1", "n_image_slots": 2000,
        "n_frame_slots": 500, "module_positions": {"0": [0, 0, 1023, 511]}}))
    return path, name


def start(module: str, config: Path, work: Path) -> ChildProcess:
    child = ChildProcess.module(module, [str(config), "--ipc-dir", str(work)],
                                work / f"{module.split('.')[-1]}.log")
    child.wait_for("ready", 60)
    return child


def send(sender, port: int, rate: float, frames: int, first: int) -> int:
    sender.send((port, rate, frames / rate, frames, first))
    sent, _, _, _ = sender.recv()
    return sent


def receive_only(sender, config: Path, name: str, port: int, work: Path, rates, seconds):
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.bind(ipc_address(str(work), name, "frames"))
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
            sent = send(sender, port, rate, n, frame)
            frame += sent
            packets = frames = 0
            while pull.poll(500):
                records = np.frombuffer(pull.recv(), MODULE_FRAME)  # one or more
                packets += int(records["n_recv_packets"].sum())
                frames += len(records)
            lost = sent * 128 - packets
            results[rate] = {"sent": sent, "lost_packets": lost}
            print(f"  receive-only {rate:5d} Hz: {sent} frames sent, {lost} packets lost",
                  flush=True)
    finally:
        recv.stop()
        pull.close(0)
    return results


def end_to_end(sender, config: Path, name: str, port: int, work: Path, rates, seconds):
    procs = [start(m, config, work) for m in ("fastcore.udp_recv", "fastcore.sync",
                                               "fastcore.assembler", "fastcore.h5_writer")]
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(ipc_address(str(work), name, "image"))
    push = ctx.socket(zmq.PUSH)
    push.connect(ipc_address(str(work), name, "writer"))
    status = ctx.socket(zmq.SUB)
    status.setsockopt(zmq.SUBSCRIBE, b"")
    status.connect(ipc_address(str(work), name, "writer-status"))
    time.sleep(0.5)
    results, frame = {}, 1
    try:
        send(sender, port, 500, 500, frame)  # warm-up
        frame += 500
        time.sleep(1.0)
        while sub.poll(200):
            sub.recv()
        for run_id, rate in enumerate(rates, start=1):
            n = int(rate * seconds)
            out = work / f"run{run_id}.h5"
            pool = ThreadPoolExecutor(1)
            pending = pool.submit(send, sender, port, rate, n, frame)
            forwarded = 0
            deadline = time.monotonic() + seconds * 3 + 10
            while forwarded < n and time.monotonic() < deadline:
                if sub.poll(100):
                    meta = np.frombuffer(sub.recv(), IMAGE_METADATA)[0]
                    info = RunInfo(str(out), n) if forwarded == 0 else None
                    push.send_multipart(image_message(meta, run_id, forwarded, n, info))
                    forwarded += 1
                elif pending.done() and forwarded:
                    break
            sent = pending.result()
            pool.shutdown()
            frame += sent
            if forwarded < n:
                push.send_multipart(stop_message(run_id))
            stop = _await_stop(status, run_id)
            with h5py.File(out, "r") as f:
                statuses = f[name]["status"][:]
            flagged = int(np.count_nonzero(statuses))
            by_flag = {flag.name: int(np.count_nonzero(statuses & np.uint64(flag)))
                       for flag in ImageStatus if flag}
            out.unlink()
            lost = n - stop["n_written"] + flagged
            results[rate] = {"sent": sent, "written": stop["n_written"], "flagged": flagged,
                             "flags": by_flag, "lost_images": lost}
            print(f"  end-to-end   {rate:5d} Hz: {sent} frames sent, {stop['n_written']} "
                  f"written, {flagged} flagged {by_flag} -> {lost} images lost", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
        for sock in (sub, push, status):
            sock.close(0)
    return results


def _await_stop(status: zmq.Socket, run_id: int) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if status.poll(200):
            event = json.loads(status.recv())
            if event.get("run_id") == run_id and event["event"] == "stop":
                return event
    raise RuntimeError(f"the writer did not finish run {run_id}")


def best(results: dict, key: str) -> float:
    ok = [rate for rate, r in results.items() if r[key] == 0]
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
    rates = RATES[:4] if args.quick else RATES
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
        e2e = end_to_end(parent, config, name, port, work, rates, seconds)
    finally:
        parent.send(None)
        sender.join(10)
        shutil.rmtree(work, ignore_errors=True)
    receive_best, e2e_best = best(recv, "lost_packets"), best(e2e, "lost_images")
    figures = {
        "benchmark": "bench_end_to_end", "seconds_per_step": seconds, "rates_hz": rates,
        "huge_pages": args.huge_pages, "shm": br.shm_pages(),
        "receive_only_best_zero_loss_hz": receive_best,
        "end_to_end_best_zero_loss_hz": e2e_best,
        "end_to_end_best_zero_loss_gbps": round(e2e_best * 2**20 / 1e9, 3),
        "ratio_end_to_end_to_receive_only": round(e2e_best / receive_best, 3)
        if receive_best else None,
        "steps": {"receive_only": recv, "end_to_end": e2e},
    }
    print(f"highest zero-loss rate: receive-only {receive_best:g} Hz, simulator -> file "
          f"{e2e_best:g} Hz (ratio {figures['ratio_end_to_end_to_receive_only']})")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
