"""How the bascule logs in to IMAP servers: a source or target login, and the target access
(master user) of the configuration (no I/O).

Apart from the connections themselves so that the quick rerun (``balf.bridge.quickrun``) can
build the same logins as a full run without importing imapclient or the database layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Login:
    host: str
    port: int
    username: str
    password: str = field(repr=False)  # never in a traceback or a log line
    tls: str = "none"  # none | starttls | ssl
    timeout: float = 60.0


@dataclass(frozen=True)
class TargetAccess:
    """How to log in to target accounts: as ``<account>*<master_user>`` with the master password
    (Dovecot master user), or as the account itself when no master user is configured."""

    host: str
    port: int
    tls: str
    master_user: str
    master_password: str = field(repr=False)  # never in a traceback or a log line
    timeout: float = 60.0
    account_passwords: dict[str, str] = field(default_factory=dict, repr=False)

    def login(self, account: str) -> Login:
        if account in self.account_passwords:
            return Login(self.host, self.port, account, self.account_passwords[account], self.tls, self.timeout)
        user = f"{account}*{self.master_user}" if self.master_user else account
        return Login(self.host, self.port, user, self.master_password, self.tls, self.timeout)
