"""Which service a recipient address belongs to (no I/O).

The :class:`ServiceTable` is a snapshot of the BALF addresses loaded from the database; the SMTP
layer checks RCPT against it (and keeps the last snapshot while the database is down).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from balf.gateway import tokens
from balf.gateway.errors import UnknownRecipient
from balf.gateway.model import ServiceRef, Target


@dataclass(frozen=True)
class ServiceTable:
    """BALF addresses (lower-cased) to services."""

    by_address: Mapping[str, ServiceRef] = field(default_factory=dict)

    def lookup(self, address: str) -> ServiceRef | None:
        return self.by_address.get(address.strip().strip("<>").lower())

    def __len__(self) -> int:
        return len(self.by_address)


def resolve_recipient(address: str, table: ServiceTable, secret: bytes) -> Target:
    """The service (and thread, for a reply address) of one RCPT address.

    ``local@domain`` must be a BALF address; ``local+TOKEN@domain`` must also carry a token
    whose MAC checks. Anything else is :class:`UnknownRecipient` (550 5.1.1).
    """
    base, detail, domain = tokens.split_address(address)
    service = table.lookup(f"{base}@{domain}")
    if service is None:
        raise UnknownRecipient(f"unknown recipient {address}")
    if detail is None:
        return Target(address, service)
    thread_id = tokens.check_token(secret, detail)
    if thread_id is None:
        raise UnknownRecipient(f"invalid reply token in {address}")
    return Target(address, service, thread_id)


def resolve_recipients(addresses: tuple[str, ...], table: ServiceTable,
                       secret: bytes) -> tuple[Target, ...]:
    """One target per service (several BALF addresses of one service get one copy);
    unknown recipients (the directory changed since RCPT) are left out."""
    seen: dict[int, Target] = {}
    for address in addresses:
        try:
            target = resolve_recipient(address, table, secret)
        except UnknownRecipient:
            continue
        # A reply address wins over the plain address of the same service.
        if target.service.id not in seen or target.token_thread_id is not None:
            if seen.get(target.service.id) is None or seen[target.service.id].token_thread_id is None:
                seen[target.service.id] = target
    return tuple(seen.values())
