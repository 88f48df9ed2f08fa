"""Match an inbound mail to an e-contacts thread (no I/O).

Rules, in order (issue 3, 4):
1. a valid reply token in the recipient address joins its thread;
2. a reference tag such as ``[EC-2026-000123]`` in the Subject joins that thread;
3. an In-Reply-To/References Message-ID known for the service (or one of balf's own keyed
   Message-IDs) joins its thread;
otherwise a new thread is opened. Rules 2 and 3 join only when the sender is the thread's usager
and the thread belongs to the service: anyone can type a reference or copy a References header.
When they do not, the new thread records the reference it mentioned (``related_reference``).
"""

from __future__ import annotations

import re

from balf.gateway.model import (
    Candidates,
    InboundMail,
    JoinThread,
    OpenThread,
    Rule,
    ServiceRef,
    ThreadDecision,
    ThreadFacts,
)

_TAG = re.compile(r"\[\s*(EC-\d{4}-\d{4,9})\s*\]", re.IGNORECASE)


def subject_references(subject: str) -> tuple[str, ...]:
    """The thread references tagged in a Subject, in order, upper-cased, without repeats."""
    seen: dict[str, None] = {}
    for m in _TAG.finditer(subject):
        seen.setdefault(m.group(1).upper(), None)
    return tuple(seen)


def format_reference(year: int, number: int) -> str:
    return f"EC-{year}-{number:06d}"


def cited_message_ids(mail: InboundMail) -> tuple[str, ...]:
    """In-Reply-To first, then References from the most recent back (RFC 5322 3.6.4)."""
    ids: dict[str, None] = {}
    for mid in (*mail.in_reply_to, *reversed(mail.references)):
        ids.setdefault(mid, None)
    return tuple(ids)


def match_thread(mail: InboundMail, service: ServiceRef, candidates: Candidates) -> ThreadDecision:
    if candidates.by_token is not None:
        return JoinThread(candidates.by_token, Rule.TOKEN)
    related: str | None = None
    reason = ""
    for rule, facts in ((Rule.SUBJECT_TAG, candidates.by_reference),
                        (Rule.REFERENCES, candidates.by_message_id)):
        for thread in facts:
            if _may_join(mail, service, thread):
                return JoinThread(thread, rule)
            if related is None:
                related = thread.reference
                reason = (f"{rule.value} names {thread.reference}, "
                          + ("of another service" if thread.service_id != service.id
                             else "whose usager is not the sender"))
    return OpenThread(Rule.NEW, related, reason)


def _may_join(mail: InboundMail, service: ServiceRef, thread: ThreadFacts) -> bool:
    return (thread.service_id == service.id and thread.usager_key is not None
            and thread.usager_key == mail.sender_key)
