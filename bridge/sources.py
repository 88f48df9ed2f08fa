"""The source side of the bascule: one Protocol and the factory from a plan's source URI.

``open_source`` does I/O only when it reads the names or membership files of a DXL source.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from balf.bridge.errors import PlanError
from balf.bridge.login import Login
from balf.bridge.options import MailboxOptions

if TYPE_CHECKING:  # the quick rerun imports this module and needs none of them
    from balf.bridge.model import SourceFolder, SourceItem

SCHEMES = ("imap", "imaps", "mbox", "maildir", "eml", "dxl")


class MailSource(Protocol):
    """Something to migrate from: folders, then each folder's messages streamed in position order.

    ``messages(folder, after)`` yields every message (or damage record) whose position comes after
    ``after`` (None: from the start), one at a time; ``remarks`` collects what the report must
    mention about the source as a whole (a truncated export, non-mail documents).
    """

    kind: str
    remarks: list[tuple[str, str]]

    def folders(self) -> list[SourceFolder]: ...

    def messages(self, folder: SourceFolder, after: str | None = None) -> Iterator[SourceItem]: ...

    def close(self) -> None: ...


def validate_uri(uri: str) -> str:
    """The scheme of a source URI; PlanError naming the problem otherwise (pure)."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme.lower() not in SCHEMES:
        raise PlanError(f"source {uri!r}: expected one of {', '.join(s + ':' for s in SCHEMES)}")
    if scheme.lower() in ("imap", "imaps"):
        parsed = urllib.parse.urlsplit(uri)
        if not parsed.hostname or not parsed.username:
            raise PlanError(f"source {uri!r}: expected imap://user@host[:port]")
    elif not rest.lstrip("/"):
        raise PlanError(f"source {uri!r}: no path")
    return scheme.lower()


def source_password(options: MailboxOptions, environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if options.password is not None:
        return options.password
    if options.password_env:
        if options.password_env not in env:
            raise PlanError(f"source password: environment variable {options.password_env} is not set")
        return env[options.password_env]
    if options.password_file:
        try:
            return Path(options.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise PlanError(f"source password file {options.password_file}: {exc}") from exc
    raise PlanError("IMAP source without a password: set password_env or password_file in the plan's options")


def _path(uri: str) -> Path:
    rest = uri.split(":", 1)[1]
    if rest.startswith("//"):
        rest = urllib.parse.urlsplit(uri).path
    return Path(urllib.parse.unquote(rest))


def is_imap(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("imap", "imaps")


def imap_login(uri: str, options: MailboxOptions, *, timeout: float = 60.0) -> Login:
    """The login of an ``imap://`` or ``imaps://`` source (its password from the plan's options)."""
    scheme = validate_uri(uri)
    parsed = urllib.parse.urlsplit(uri)
    tls = "ssl" if scheme == "imaps" else options.tls
    return Login(
        host=parsed.hostname or "",
        port=parsed.port or (993 if tls == "ssl" else 143),
        username=urllib.parse.unquote(parsed.username or ""),
        password=urllib.parse.unquote(parsed.password) if parsed.password else source_password(options),
        tls=tls,
        timeout=timeout,
    )


def open_source(uri: str, options: MailboxOptions, *, timeout: float = 60.0) -> MailSource:
    """The adapter for ``uri`` (``imap://user@host:port``, ``imaps://``, ``mbox:/path``,
    ``maildir:/path``, ``eml:/path``, ``dxl:/path/export.xml``)."""
    # Adapters are imported on use: a run over IMAP sources need not load the DXL and file readers
    # (nor a DXL run imapclient), which shortens every short run of the CLI.
    scheme = validate_uri(uri)
    if scheme in ("imap", "imaps"):
        from balf.bridge.imap import ImapSource

        return ImapSource(imap_login(uri, options, timeout=timeout))
    from balf.bridge.dxl import DxlSource, read_membership, read_names
    from balf.bridge.files import EmlTreeSource, MaildirSource, MboxSource

    path = _path(uri)
    if scheme == "mbox":
        return MboxSource(path)
    if scheme == "maildir":
        return MaildirSource(path)
    if scheme == "eml":
        return EmlTreeSource(path)
    names = read_names(Path(options.names_file)) if options.names_file else {}
    membership = read_membership(Path(options.folders_file)) if options.folders_file else {}
    return DxlSource(path, names=names, membership=membership, unfiled=options.unfiled_folder)
