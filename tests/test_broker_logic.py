"""Broker logic without a broker: StatusAggregator, request decoding, header values."""

from __future__ import annotations

import threading
import time

import pika
import pytest

from services.broker import StatusAggregator
from services.broker.protocol import (
    ACTION_REQUEST_FAIL,
    ACTION_REQUEST_START,
    ACTION_REQUEST_SUCCESS,
    BadRequestError,
    check_fields,
    decode_request,
    header_value,
    parse_status,
    primary_failure_message,
    status_properties,
)

pytestmark = pytest.mark.timeout(30)


def status(action: str, source: str = "writer", message=None) -> dict:
    return {"action": action, "source": source, "message": message}


def test_aggregator_keeps_the_last_100_requests_fifo():
    aggregator = StatusAggregator()
    for i in range(150):
        aggregator.on_status_message(f"id{i}", {"i": i}, status(ACTION_REQUEST_START))
    assert len(aggregator) == 100
    assert aggregator.request_ids()[0] == "id50" and aggregator.request_ids()[-1] == "id149"
    assert "id49" not in aggregator
    aggregator.on_status_message("id50", {"i": 50}, status(ACTION_REQUEST_SUCCESS, message=1))
    assert len(aggregator) == 100  # an update is no new id
    assert aggregator.get("id50") == {
        "request": {"i": 50},
        "services": {"writer": [[ACTION_REQUEST_START, None], [ACTION_REQUEST_SUCCESS, 1]]}}


def test_wait_for_complete_returns_the_outcome_and_times_out():
    aggregator = StatusAggregator()
    with pytest.raises(TimeoutError, match=r"^The request did not complete in time\.$"):
        aggregator.wait_for_complete("nothing", timeout=0.1)

    aggregator.on_status_message("a", {"n": 1}, status(ACTION_REQUEST_START))
    aggregator.on_status_message("a", {"n": 1}, status(ACTION_REQUEST_SUCCESS, message="ok"))
    # statuses that arrived before the call count (the original's PUB/SUB race is gone)
    assert aggregator.wait_for_complete("a", timeout=0.1) == {
        "status": ACTION_REQUEST_SUCCESS, "request_details": {"n": 1}}

    aggregator.on_status_message("b", {"n": 2}, status(ACTION_REQUEST_START, "writer"))
    aggregator.on_status_message("b", {"n": 2}, status(ACTION_REQUEST_START, "epics"))
    aggregator.on_status_message("b", {"n": 2}, status(ACTION_REQUEST_FAIL, "epics", "x"))
    with pytest.raises(TimeoutError):
        aggregator.wait_for_complete("b", timeout=0.1)  # the writer is still running

    def finish_later() -> None:
        time.sleep(0.2)
        aggregator.on_status_message("b", {"n": 2}, status(ACTION_REQUEST_SUCCESS, "writer"))

    thread = threading.Thread(target=finish_later)
    thread.start()
    started = time.monotonic()
    assert aggregator.wait_for_complete("b", timeout=5) == {
        "status": ACTION_REQUEST_FAIL, "request_details": {"n": 2}}  # any failure fails
    assert time.monotonic() - started < 2
    thread.join()


def test_wait_with_named_services_and_counts():
    aggregator = StatusAggregator()
    aggregator.on_status_message("r", {}, status(ACTION_REQUEST_SUCCESS, "writer", "done"))
    assert aggregator.wait("r", timeout=0.1)["status"] == ACTION_REQUEST_SUCCESS
    with pytest.raises(TimeoutError, match=r"epics \(no status yet\)"):
        aggregator.wait("r", ["writer", "epics"], timeout=0.1)
    with pytest.raises(TimeoutError, match="1 of 2 services finished"):
        aggregator.wait("r", 2, timeout=0.1)
    aggregator.on_status_message("r", {}, status(ACTION_REQUEST_START, "epics"))
    with pytest.raises(TimeoutError, match=r"epics \(last status request_start\)"):
        aggregator.wait("r", 2, timeout=0.1)
    assert aggregator.wait("r", ["epics"], timeout=0.1, until="start")["status"] is None
    aggregator.on_status_message("r", {}, status(ACTION_REQUEST_SUCCESS, "epics", 3))
    result = aggregator.wait("r", 2, timeout=0.1)
    assert result == {"request_id": "r", "request": {}, "status": ACTION_REQUEST_SUCCESS,
                      "services": {"writer": [[ACTION_REQUEST_SUCCESS, "done"]],
                                   "epics": [[ACTION_REQUEST_START, None],
                                             [ACTION_REQUEST_SUCCESS, 3]]}}


def test_aggregator_callback_and_tracking_only():
    seen = []
    aggregator = StatusAggregator(lambda rid, entry: seen.append((rid, entry)),
                                  track_all=False)
    aggregator.on_status_message("other", {}, status(ACTION_REQUEST_START))
    assert "other" not in aggregator and seen == []
    aggregator.track("mine", {"n": 1})
    aggregator.on_status_message("mine", None, status(ACTION_REQUEST_START))
    assert seen == [("mine", {"request": {"n": 1},
                              "services": {"writer": [[ACTION_REQUEST_START, None]]}})]


@pytest.mark.parametrize(("body", "text"), [
    (b"{", "request body is not valid JSON: "),
    (b"", "request body is not valid JSON: "),
    (b"\x80", "request body is not valid UTF-8: "),
    (b"null", "request body must be a JSON object, got null"),
    (b"[]", "request body must be a JSON object, got an array"),
    (b'"x"', "request body must be a JSON object, got a string"),
    (b"3", "request body must be a JSON object, got a number"),
])
def test_decode_request_names_the_problem(body, text):
    with pytest.raises(BadRequestError) as caught:
        decode_request(body)
    assert str(caught.value).startswith(text)


def test_decode_request_accepts_objects():
    assert decode_request(b'{"n_images": 3}') == {"n_images": 3}


def test_check_fields():
    request = {"output_file": "/a.h5", "n_images": 3, "flag": True, "rate": 2}
    check_fields(request, {"output_file": str, "n_images": int},
                 {"rate": float, "user_id": int, "other": str})
    with pytest.raises(BadRequestError, match="request field 'user_id' is missing"):
        check_fields(request, {"user_id": int})
    with pytest.raises(BadRequestError, match="'flag' must be an integer, got a boolean"):
        check_fields(request, {"flag": int})
    with pytest.raises(BadRequestError, match="'output_file' must be an integer or a number"):
        check_fields(request, {}, {"output_file": (int, float)})


def test_header_values_are_encodable():
    value = header_value({"a": (1, 2.5), 3: {1.0, None}, "b": float("nan"), "c": object(),
                          "d": "x" * 10000})
    assert value["a"] == [1, "2.5"] and value["3"] in (["1.0", None], [None, "1.0"])
    assert value["b"] == "nan" and value["c"].startswith("<object")
    assert len(value["d"]) < 9000
    properties = status_properties("rid", ACTION_REQUEST_SUCCESS, "svc", value)
    properties.encode()  # pika can send it
    parsed = parse_status(properties, b'{"n": 1}')
    assert (parsed.request_id, parsed.action, parsed.source) == ("rid", ACTION_REQUEST_SUCCESS,
                                                                 "svc")
    assert parsed.request == {"n": 1} and parsed.final and parsed.message_id
    assert parse_status(pika.BasicProperties(), b"not json").request == "not json"


def test_primary_failure_message_is_the_original():
    assert primary_failure_message("writer") == "Primary service writer failure. "
