"""The service directory (I/O on the database): add, list, show and import services.

Validation is pure and lives in :mod:`balf.db.service_rows`; this module only writes what
validated, and an import is one transaction: all rows or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from balf.db.models import Service, ServiceAddress, ServiceKind
from balf.db.service_rows import RowError, ServiceRow


class DirectoryError(Exception):
    """The directory refuses a change; ``errors`` says which rows and why."""

    def __init__(self, errors: Sequence[RowError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = list(errors)


@dataclass(frozen=True)
class ServiceView:
    """A service as shown by `balf service list/show`."""

    code: str
    kind: str
    department: str
    name: str
    imap_account: str
    addresses: tuple[str, ...]
    acknowledge: bool
    active: bool


def _view(service: Service) -> ServiceView:
    return ServiceView(service.code, service.kind.value, service.department, service.name,
                       service.imap_account, tuple(a.address for a in service.addresses),
                       service.acknowledge, service.active)


async def add_services(session: AsyncSession, rows: Sequence[ServiceRow]) -> list[ServiceView]:
    """Insert validated rows; conflicts with existing codes or addresses fail them all."""
    errors: list[RowError] = []
    codes = [r.code for r in rows]
    existing_codes = set((await session.scalars(select(Service.code).where(Service.code.in_(codes)))).all())
    keys = [a.lower() for r in rows for a in r.addresses]
    existing = {
        key: code
        for key, code in (await session.execute(
            select(ServiceAddress.address_key, Service.code)
            .join(Service).where(ServiceAddress.address_key.in_(keys))
        )).all()
    }
    for row in rows:
        if row.code in existing_codes:
            errors.append(RowError(row.line, "code", f"service {row.code} already exists"))
        for address in row.addresses:
            if address.lower() in existing:
                errors.append(RowError(row.line, "addresses",
                                       f"{address} already belongs to service {existing[address.lower()]}"))
    if errors:
        raise DirectoryError(errors)
    services = []
    for row in rows:
        service = Service(code=row.code, kind=ServiceKind(row.kind), department=row.department,
                          name=row.name, imap_account=row.imap_account, acknowledge=row.acknowledge,
                          addresses=[ServiceAddress(address=a, address_key=a.lower()) for a in row.addresses])
        session.add(service)
        services.append(service)
    await session.flush()
    return [_view(s) for s in services]


async def list_services(session: AsyncSession, department: str | None = None) -> list[ServiceView]:
    query = select(Service).options(selectinload(Service.addresses)).order_by(Service.department, Service.code)
    if department:
        query = query.where(Service.department == department)
    return [_view(s) for s in (await session.scalars(query)).all()]


async def get_service(session: AsyncSession, code_or_address: str) -> ServiceView | None:
    """A service by its code or by one of its addresses."""
    query = select(Service).options(selectinload(Service.addresses))
    service = (await session.scalars(query.where(func.upper(Service.code) == code_or_address.upper()))).first()
    if service is None:
        service = (await session.scalars(
            query.join(ServiceAddress).where(ServiceAddress.address_key == code_or_address.lower())
        )).first()
    return _view(service) if service else None
