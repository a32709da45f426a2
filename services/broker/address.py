"""A RabbitMQ address as users write it: host, host:port, amqp://host[:port]/, [v6]:port."""

from __future__ import annotations

AMQP_PORT = 5672


def parse_broker_url(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``amqp://host[:port][/]`` or ``[v6addr]:port`` ->
    (host, port); ValueError naming the problem."""
    value = text.strip()
    for scheme in ("amqp://", "AMQP://"):
        if value.startswith(scheme):
            value = value[len(scheme):].split("/", 1)[0].rsplit("@", 1)[-1]
    if not value:
        raise ValueError(f"empty broker address {text!r}")
    host, port = value, AMQP_PORT
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad broker address {text!r}")
            port = _port(rest[1:], text)
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        port = _port(port_text, text)
    if not host:
        raise ValueError(f"bad broker address {text!r}: no host")
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in broker address {whole!r}")
    return int(text)
