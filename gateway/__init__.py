"""The gateway: inbound SMTP/LMTP into the services' IMAP mailboxes and e-contacts threads.

Pure modules (model, errors, replies, tokens, parse, services, threads, received,
acknowledgement, routing) hold the mail logic; edges (smtp, spool, store, ledger, worker,
notify, daemon) do the I/O. See docs/gateway.md.
"""
