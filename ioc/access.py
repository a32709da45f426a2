"""Who may write the IOC's PVs: hosts and users named by the operator; everyone reads.

Pure logic (no I/O): :meth:`AccessRules.rights` gives the Channel Access rights of a
client (host name and user name as the client reports them, the way EPICS access security
groups match them). Without rules every client may write, as an IOC without an ACF file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from caproto import AccessRights

READ_WRITE = AccessRights.READ | AccessRights.WRITE


@dataclass(frozen=True)
class AccessRules:
    write_hosts: frozenset[str] | None = None  # None: any host
    write_users: frozenset[str] | None = None  # None: any user

    @classmethod
    def from_lists(cls, hosts: Iterable[str] | None, users: Iterable[str] | None
                   ) -> AccessRules:
        def names(items: Iterable[str] | None) -> frozenset[str] | None:
            return None if items is None else frozenset(
                item.strip().lower() for item in items if item.strip())
        return cls(names(hosts), names(users))

    @property
    def restricted(self) -> bool:
        return self.write_hosts is not None or self.write_users is not None

    def rights(self, hostname: str, username: str) -> AccessRights:
        """READ|WRITE when both the host and the user are allowed to write, else READ."""
        host_ok = self.write_hosts is None or (hostname or "").lower() in self.write_hosts
        user_ok = self.write_users is None or (username or "").lower() in self.write_users
        return READ_WRITE if host_ok and user_ok else AccessRights.READ

    def describe(self) -> str:
        if not self.restricted:
            return "any client may write"
        hosts = "any host" if self.write_hosts is None else ", ".join(sorted(self.write_hosts))
        users = "any user" if self.write_users is None else ", ".join(sorted(self.write_users))
        return f"writes only from {hosts} by {users}; everyone reads"

    def apply(self, pvdb: dict) -> None:
        """Give every PV of ``pvdb`` these rules (caproto asks each PV's check_access)."""
        if not self.restricted:
            return
        for channel in pvdb.values():
            channel.check_access = self.rights
