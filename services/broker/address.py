"""A RabbitMQ address as users write it: host, host:port, amqp://host[:port]/, [v6]:port.

The parser is the process runtime's (fastcore.runtime, which reads ``--broker-url``);
re-exported here for the broker's users."""

from fastcore.runtime import AMQP_PORT, parse_broker_url

__all__ = ["AMQP_PORT", "parse_broker_url"]
