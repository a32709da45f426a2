"""ZMQ addresses of a detector's internal streams (the rest of what every process shares
is the process runtime, fastcore.runtime)."""

from __future__ import annotations

import os

import zmq

from fastcore.names import Stream

IPC_PATH_MAX = getattr(zmq, "IPC_PATH_MAX_LEN", 107)


def ipc_address(ipc_dir: str, detector_name: str, stream: Stream) -> str:
    """ZMQ ipc address of one of a detector's internal streams (ValueError when the socket
    path is longer than a Unix socket allows)."""
    path = os.path.join(ipc_dir, f"stddaq-{detector_name}-{stream}")
    if len(path) > IPC_PATH_MAX:
        raise ValueError(f"the ipc socket path {path} has {len(path)} characters, more than "
                         f"the {IPC_PATH_MAX} a Unix socket allows: use a shorter --ipc-dir "
                         "(or $STDDAQ_IPC_DIR)")
    return f"ipc://{path}"


def subscribe(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A SUB socket connected to ``address``, subscribed to everything."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.connect(address)
    return sub
