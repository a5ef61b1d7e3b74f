"""One reindex per collection at a time: an exclusive lock file where the index lives (one
machine), and, for a shared index server, no other member in the reindex's consumer group (a
reindex running on another machine)."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loupe.consumers.kafka.admin import KafkaAdmin
from loupe.consumers.kafka.names import KafkaNames
from loupe.consumers.settings import Settings
from loupe.schemas.errors import LoupeError

log = logging.getLogger(__name__)


class ReindexBusy(LoupeError):
    """Another reindex of the same model version is running."""


@contextmanager
def reindex_lock(settings: Settings, collection: str) -> Iterator[None]:
    """One reindex per collection: an exclusive lock file where the index lives (one machine),
    and, for a shared index server, no other member in the reindex's consumer group."""
    where = settings.resolved_index_path() or settings.state_dir
    where.mkdir(parents=True, exist_ok=True)
    path = Path(where) / f".reindex.{collection}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ReindexBusy(
                f"a reindex of {collection} is already running ({holder}, lock {path})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            if settings.index_url is not None:
                _require_no_members(settings, KafkaNames.of(settings).reindex_group(collection))
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


REINDEX_SESSION_MS = 15_000  # the reindex consumer's session (kafka-python's default: 45 s)
# A reindex killed a moment ago stays a member of its group until its session times out; a
# reindex running elsewhere stays for good. So members are waited out this long before they
# count as a reindex that runs.
MEMBERS_EXPIRE_S = REINDEX_SESSION_MS / 1000 + 5


def _require_no_members(settings: Settings, group: str) -> None:
    deadline = time.monotonic() + MEMBERS_EXPIRE_S
    members = _members(settings, group)
    if members:
        log.warning(
            "consumer group %s has %d member(s): a reindex running elsewhere, or one killed "
            "less than a session ago; waiting up to %.0f s for them to leave",
            group,
            members,
            MEMBERS_EXPIRE_S,
        )
    while members:
        if time.monotonic() > deadline:
            raise ReindexBusy(
                f"a reindex is already running: consumer group {group} still has {members} "
                f"member(s) after {MEMBERS_EXPIRE_S:.0f} s (a killed one would have left by now)"
            )
        time.sleep(2.0)
        members = _members(settings, group)


def _members(settings: Settings, group: str) -> int:
    with KafkaAdmin(settings.kafka_client_config()) as admin:
        return admin.group_members(group)
