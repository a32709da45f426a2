"""ModuleReceiver on real UDP (loopback): how it announces committed frames to sync."""

from __future__ import annotations

import threading

import numpy as np
import zmq

from fastcore.buffers import FrameBuffer, shm_name
from fastcore.config import load_config
from fastcore.detectors import module_format
from fastcore.formats import MODULE_FRAME
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address
from fastcore.simulator import DetectorSimulator, Faults
from fastcore.udp_recv import PUBLISH_BATCH, ModuleReceiver


def test_a_backlog_is_announced_in_batches_and_the_last_frames_at_once(make_config,
                                                                       ipc_dir):
    """20 frames already waiting in the socket: the receiver announces them in messages of
    PUBLISH_BATCH ModuleFrames while more packets wait, and the rest as soon as the socket
    is empty; every frame once, in order, complete."""
    path, _ = make_config("jungfrau_1m.json")
    config = load_config(path)
    fmt = module_format(config.detector_type, config.bit_depth, config.image_shape)
    frames = FrameBuffer.create(shm_name(config.detector_name, Segment.FRAMES),
                                config.n_frame_slots, config.n_modules, fmt.frame_bytes)
    pull = zmq.Context.instance().socket(zmq.PULL)
    address = ipc_address(ipc_dir, config.detector_name, Stream.FRAMES)
    pull.bind(address)
    receiver = ModuleReceiver(config, 0, address)
    sock = receiver.open_socket()
    thread = threading.Thread(target=receiver.run, args=(sock,), daemon=True)
    try:
        sent = DetectorSimulator(config, faults=Faults(silent_modules={1})).run(20)
        assert sent == 20
        thread.start()
        messages = []
        while sum(len(m) for m in messages) < 20 * MODULE_FRAME.itemsize and pull.poll(10_000):
            messages.append(pull.recv())
    finally:
        receiver.stop_event.set()
        thread.join(10)
        pull.close(0)
        frames.close()
    assert not thread.is_alive()
    records = [np.frombuffer(m, MODULE_FRAME) for m in messages]
    assert [len(r) for r in records] == [PUBLISH_BATCH, PUBLISH_BATCH, 20 - 2 * PUBLISH_BATCH]
    every = np.concatenate(records)
    assert every["id"].tolist() == list(range(1, 21))
    assert (every["n_recv_packets"] == fmt.n_packets).all()
