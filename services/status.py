"""The status hash ``status.<service_name>``: defined once in fastcore.status (the writer,
StatusHeartbeat, and the readers' parser, ServiceStatus, side by side); re-exported here for
the services that read it."""

from fastcore.status import (
    HEARTBEAT_S,
    STATUS_FRESH_S,
    STATUS_PREFIX,
    STATUS_TTL_S,
    ServiceStatus,
    StatusHeartbeat,
    read_status,
    status_key,
)

__all__ = ["HEARTBEAT_S", "STATUS_FRESH_S", "STATUS_PREFIX", "STATUS_TTL_S", "ServiceStatus",
           "StatusHeartbeat", "read_status", "status_key"]
