"""The typed configuration of balf: one frozen dataclass per TOML section (no I/O).

Each field's type is what the loader checks; each field's ``doc`` metadata is what
``balf init`` writes as a comment above the key, so the example file and the schema
cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def key(default: Any, doc: str, choices: tuple[str, ...] = ()) -> Any:
    """A configuration key with its default, the one-line help shown in the example file
    and, for string keys that take one of a few words, those words."""
    return field(default=default, metadata={"doc": doc, "choices": choices})


TLS_MODES = ("none", "starttls", "ssl")


@dataclass(frozen=True)
class DatabaseConfig:
    """Where balf keeps its state."""

    url: str = key("", "SQLAlchemy URL. Empty: SQLite in WAL mode at <data_dir>/balf.sqlite3. "
                   "PostgreSQL: postgresql+asyncpg://user@host:5432/balf")
    auto_upgrade: bool = key(True, "Run the database migrations at `balf serve` start-up.")
    pool_size: int = key(10, "Connections kept open to PostgreSQL (ignored for SQLite).")


@dataclass(frozen=True)
class SmtpConfig:
    """The inbound SMTP and LMTP listeners."""

    enabled: bool = key(True, "Accept inbound mail over SMTP.")
    host: str = key("127.0.0.1", "Address the SMTP listener binds (0.0.0.0 or :: in production).")
    port: int = key(2525, "SMTP port (25 in production, behind the MX records).")
    lmtp_enabled: bool = key(False, "Also accept mail over LMTP, as a Postfix delivery transport.")
    lmtp_host: str = key("127.0.0.1", "Address the LMTP listener binds.")
    lmtp_port: int = key(2424, "LMTP port.")
    hostname: str = key("", "Name announced in the greeting and Received headers (empty: the machine's FQDN).")
    max_message_size: int = key(26214400, "Largest message accepted, in bytes (SIZE extension, 552 beyond).")
    max_recipients: int = key(50, "Recipients per transaction (452 beyond).")
    max_connections: int = key(200, "Concurrent SMTP sessions (421 beyond).")
    command_timeout: float = key(300.0, "Seconds a client may stay silent before the session is closed (RFC 5321 4.5.3.2).")
    data_timeout: float = key(600.0, "Seconds allowed to transfer one message's DATA.")
    tls_cert: str = key("", "PEM certificate chain for STARTTLS (empty: no STARTTLS).")
    tls_key: str = key("", "PEM private key for STARTTLS.")
    shutdown_grace: float = key(10.0, "Seconds in-flight sessions may finish when the daemon stops.")


@dataclass(frozen=True)
class ImapConfig:
    """The IMAP store (Dovecot) the services' mailboxes live in."""

    host: str = key("127.0.0.1", "IMAP server holding the BALF mailboxes.")
    port: int = key(10143, "IMAP port (993 with tls = \"ssl\").")
    tls: str = key("none", "\"none\", \"starttls\" or \"ssl\".", TLS_MODES)
    master_user: str = key("balf", "Dovecot master user: balf logs in as <mailbox>*<master_user>.")
    master_password: str = key("", "Master user's password (better set it with BALF_IMAP__MASTER_PASSWORD).")
    pool_size: int = key(2, "IMAP connections kept open per mailbox for deliveries.")
    timeout: float = key(30.0, "Seconds any one IMAP command may take.")


@dataclass(frozen=True)
class GatewayConfig:
    """Routing of inbound mail into threads."""

    domain: str = key("balf.localhost", "Mail domain of the BALF and thread reply addresses.")
    secret: str = key("", "Key for reply tokens and Message-ID hashes (32+ random bytes; BALF_GATEWAY__SECRET). "
                      "`balf init` generates one.")
    workers: int = key(4, "Mailboxes one delivery batch appends to at the same time.")
    batch: int = key(64, "Spool entries claimed and delivered together: one claim, one MULTIAPPEND per mailbox, "
                     "one record transaction.")
    delivery_process: bool = key(True, "Index, deliver and notify in a second process, so that accepting and "
                                 "delivering use two cores (false: all in the listener's process).")
    retry_max_age: float = key(432000.0, "Seconds a message may wait for delivery before it is dead-lettered (5 days, like Postfix).")
    retry_delay: float = key(5.0, "First retry delay in seconds after a temporary failure; doubles per attempt.")
    retry_max_delay: float = key(600.0, "Longest delay between two delivery attempts, in seconds.")
    claim_lease: float = key(300.0, "Seconds a claimed spool entry stays reserved to one instance (re-claimed after a crash).")
    instance: str = key("", "Name of this gateway instance in claims (empty: <hostname>:<spool dir>); stable across restarts.")
    directory_refresh: float = key(30.0, "Seconds between reloads of the BALF address directory from the database.")
    acknowledge: bool = key(True, "Send citizens an automatic acknowledgement with the thread reference.")
    acknowledgements_per_day: int = key(3, "At most this many acknowledgements to one sender per day (RFC 3834 5).")
    portal_url: str = key("https://www.impots.gouv.fr/", "Secure-messaging portal that acknowledgements and notices point to.")


@dataclass(frozen=True)
class SpoolConfig:
    """The durable spool written before the 250 reply."""

    dir: str = key("", "Spool directory (empty: <data_dir>/spool).")
    group_commit_ms: float = key(2.0, "How long a flush waits to share its fsync with concurrent sessions.")
    min_free_bytes: int = key(104857600, "Refuse mail (451 4.3.0) when the spool's disk has less free space than this.")


@dataclass(frozen=True)
class RelayConfig:
    """Outgoing mail: replies, acknowledgements and notices."""

    host: str = key("127.0.0.1", "Smarthost that relays balf's outgoing mail.")
    port: int = key(25, "Smarthost port.")
    tls: str = key("none", "\"none\", \"starttls\" or \"ssl\".", TLS_MODES)
    username: str = key("", "Smarthost login, if any.")
    password: str = key("", "Smarthost password (BALF_RELAY__PASSWORD).")


@dataclass(frozen=True)
class BasculeConfig:
    """The migration of Lotus-style BALF into IMAP."""

    mailboxes_in_parallel: int = key(2, "Mailboxes migrated at the same time.")
    connections_per_mailbox: int = key(4, "IMAP connections per mailbox to the target.")
    max_message_size: int = key(52428800, "Messages larger than this are reported, not copied.")
    batch_messages: int = key(200, "Messages read from the source and appended per batch (and per checkpoint).")
    batch_bytes: int = key(8388608, "Bytes per batch at most (a bigger message travels alone): with the batch read "
                           "ahead, bounds memory whatever the mailbox size.")
    lease_seconds: int = key(
        600,
        "A worker's hold on a mailbox (at least 3), renewed every third of it while the worker "
        "runs; after a crash another run may take it over once it expires.",
    )
    report_dir: str = key("", "Where `balf bascule verify` and `report` write their files (empty: <data_dir>/bascule).")


@dataclass(frozen=True)
class LogConfig:
    """Logging."""

    level: str = key("INFO", "DEBUG, INFO, WARNING or ERROR.", ("DEBUG", "INFO", "WARNING", "ERROR"))
    format: str = key("text", "\"text\" (key=value, one event per line) or \"json\".", ("text", "json"))


@dataclass(frozen=True)
class Config:
    """The whole configuration, as loaded and validated once at start-up."""

    data_dir: str = key("/var/lib/balf", "Where balf keeps its database, spool and state.")
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    imap: ImapConfig = field(default_factory=ImapConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    bascule: BasculeConfig = field(default_factory=BasculeConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def database_url(self) -> str:
        """The effective SQLAlchemy URL (SQLite under data_dir when none is set)."""
        return self.database.url or f"sqlite+aiosqlite:///{self.data_dir}/balf.sqlite3"

    @property
    def spool_dir(self) -> str:
        """The effective spool directory."""
        return self.spool.dir or f"{self.data_dir}/spool"
