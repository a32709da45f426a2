"""Write progress over real Redis pub/sub: rate limit, final message, outage."""

from __future__ import annotations

import threading
import time
import uuid

import redis

from services.progress import ProgressFollower, ProgressPublisher
from tests.netproxy import TcpProxy


def test_progress_reaches_a_follower_rate_limited_with_the_final_state():
    client = redis.Redis("127.0.0.1", 6379)
    name = f"test.{uuid.uuid4().hex[:8]}"
    received, done = [], threading.Event()

    def on_progress(progress):
        received.append(progress)
        if progress["done"]:
            done.set()

    follower = ProgressFollower(client, name, on_progress).start()
    try:
        assert follower.connected
        publisher = ProgressPublisher(client, name, max_rate_hz=10)
        began = time.monotonic()
        for n in range(1, 201):  # 200 updates in ~0.4 s
            publisher.publish({"request_id": "r", "n_written": n, "done": False})
            time.sleep(0.002)
        elapsed = time.monotonic() - began
        publisher.publish({"request_id": "r", "n_written": 200, "done": True})
        assert done.wait(5)
    finally:
        follower.stop()
    counts = [p["n_written"] for p in received]
    assert counts[0] == 1 and counts[-1] == 200 and counts == sorted(counts)
    assert len(received) <= 10 * elapsed + 3, len(received)


def test_follower_recovers_after_a_redis_outage():
    name = f"test.{uuid.uuid4().hex[:8]}"
    publisher = ProgressPublisher(redis.Redis("127.0.0.1", 6379), name)
    received = []
    with TcpProxy(("127.0.0.1", 6379)) as proxy:
        client = redis.Redis("127.0.0.1", proxy.port, socket_timeout=2,
                             socket_connect_timeout=2)
        follower = ProgressFollower(client, name, received.append).start()
        try:
            publisher.publish({"n_written": 1, "done": True})
            deadline = time.monotonic() + 5
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
            proxy.down()
            time.sleep(1.0)
            proxy.up()
            deadline = time.monotonic() + 10
            while len(received) < 2 and time.monotonic() < deadline:
                publisher.publish({"n_written": 2, "done": True})
                time.sleep(0.3)
        finally:
            follower.stop()
    assert [p["n_written"] for p in received][:1] == [1]
    assert received[-1]["n_written"] == 2, "no progress after Redis came back"


def test_the_last_update_of_a_burst_is_sent_after_the_interval():
    client = redis.Redis("127.0.0.1", 6379)
    name = f"test.{uuid.uuid4().hex[:8]}"
    received = []
    follower = ProgressFollower(client, name, received.append).start()
    try:
        publisher = ProgressPublisher(client, name, max_rate_hz=5)
        for n in range(1, 5):  # a burst well inside one interval
            publisher.publish({"n_written": n, "done": False})
        deadline = time.monotonic() + 3
        while (not received or received[-1]["n_written"] != 4) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        follower.stop()
    counts = [p["n_written"] for p in received]
    assert counts[-1] == 4 and len(counts) <= 2 and counts == sorted(counts)
