"""The Kafka ACLs each of Loupe's principals needs, and nothing more: one list, derived from the
configured names, that ``loupe acls`` prints for an operator, ``deploy/README.md`` shows, and the
least-privilege integration test grants on a broker that allows nothing else
(``tests/integration/test_secure_broker.py``).

Three principals:
- ``ingest``: ``loupe serve --role ingest``, which reads the catalog and writes the index (and,
  with encode-once, its vectors topics);
- ``search``: ``loupe serve --role search``, which reads requests and writes answers;
- ``operator``: ``loupe topics create`` and ``loupe reindex``, run by hand or as a job.
``loupe serve --role all`` (one principal for both consumers) needs ``ingest`` and ``search``.
"""

from __future__ import annotations

from dataclasses import dataclass

from loupe.consumers.kafka.names import ENCODE, INDEX, INGEST, REINDEX, SEARCH, KafkaNames
from loupe.consumers.kafka.reply_topics import REPLY_TOPICS_PREFIX
from loupe.consumers.settings import Settings

PRINCIPALS = ("ingest", "search", "operator")
VECTORS_OPERATIONS = ("Create", "Read", "Write", "Describe")

# Prefixed ACLs grant each principal its workers' groups and transactional ids
# (kafka.names: ``<LOUPE_GROUP_ID>.<worker>...``).


@dataclass(frozen=True)
class Acl:
    """Allow ``operations`` on one resource: a topic, a consumer group or a transactional id,
    named exactly (``literal``) or by prefix (``prefixed``)."""

    resource: str  # topic | group | transactional-id
    name: str
    pattern: str  # literal | prefixed
    operations: tuple[str, ...]  # Kafka's names: Read, Write, Create, Describe, DescribeConfigs

    def command(self, principal: str) -> str:
        """The ``kafka-acls.sh`` line that grants it to ``principal`` (``User:<name>``)."""
        options = " ".join(f"--operation {operation}" for operation in self.operations)
        pattern = " --resource-pattern-type prefixed" if self.pattern == "prefixed" else ""
        return (
            f"kafka-acls.sh --add --allow-principal {principal} {options} "
            f"--{self.resource} {self.name}{pattern}"
        )


def _topic(name: str, *operations: str, prefixed: bool = False) -> Acl:
    return Acl("topic", name, "prefixed" if prefixed else "literal", operations)


def _groups(names: KafkaNames, workers: tuple[str, ...], *operations: str) -> list[Acl]:
    return [Acl("group", names.groups_of(w), "prefixed", operations) for w in workers]


def _transactions(names: KafkaNames, workers: tuple[str, ...]) -> list[Acl]:
    return [
        Acl("transactional-id", names.transactional_ids_of(w), "prefixed", ("Write", "Describe"))
        for w in workers
    ]


def required_acls(settings: Settings, principal: str) -> list[Acl]:
    """What ``principal`` (one of ``PRINCIPALS``) needs with ``settings``' names and mode
    (encode-once or not)."""
    names = KafkaNames.of(settings)
    encode_once = settings.encode_once
    dead_letters = _topic(settings.deadletter_topic, "Write", "Describe")

    def catalog(*operations: str) -> Acl:  # per merchant: every merchant's products topic
        if settings.merchant_topics:
            return _topic(f"{settings.products_topic}.", *operations, prefixed=True)
        return _topic(settings.products_topic, *operations)

    # With encode-once, the encoders and index writers make and use the vectors topics.
    vectors = (
        [_topic(names.vectors_prefix, *VECTORS_OPERATIONS, prefixed=True)]
        if settings.encode_once
        else []
    )
    if principal == "ingest":
        workers = (ENCODE, INDEX) if settings.encode_once else (INGEST,)
        return [
            catalog("Read", "Describe", "DescribeConfigs"),
            dead_letters,
            *vectors,
            *_groups(names, workers, "Read"),
            *_transactions(names, workers),
        ]
    if principal == "search":
        return [
            _topic(settings.search_requests_topic, "Read", "Describe"),
            _topic(settings.search_responses_topic, "Write", "Describe"),
            # Reply topics a request may name (LOUPE_REPLY_TO_PATTERN's default): written, and
            # their cleanup policy read, since a compacted one is refused.
            _topic(REPLY_TOPICS_PREFIX, "Write", "Describe", "DescribeConfigs", prefixed=True),
            dead_letters,
            Acl("group", names.search_group(), "literal", ("Read",)),
            *_transactions(names, (SEARCH,)),
        ]
    if principal == "operator":
        # ``loupe collections --prune`` deletes the vectors topics and groups of dropped
        # collections (consumers/kafka/leftovers.py): Delete on both, Describe to list groups.
        return [
            catalog("Create", "Read", "Describe", "DescribeConfigs"),
            _topic(settings.search_requests_topic, "Create", "Describe"),
            _topic(settings.search_responses_topic, "Create", "Describe"),
            _topic(settings.deadletter_topic, "Create", "Write", "Describe"),
            *(
                [_topic(names.vectors_prefix, *VECTORS_OPERATIONS, "Delete", prefixed=True)]
                if encode_once
                else []
            ),
            *_groups(names, (REINDEX,), "Read", "Describe", "Delete"),
            *(_groups(names, (ENCODE, INDEX), "Describe", "Delete") if encode_once else []),
        ]
    raise ValueError(f"principal must be one of {', '.join(PRINCIPALS)}; got {principal!r}")


def merchant_acls(settings: Settings, merchant_id: str) -> list[Acl]:
    """A merchant system's, with per-merchant topics: write its own products topic, no other.
    (ValueError if the merchant id cannot name a topic.)"""
    topic = settings.products_topics().merchant_topic(merchant_id)
    return [_topic(topic, "Write", "Describe")]


# Which principals' ACLs each worker (``BatchWorker.role``), command and ``serve --role`` needs.
PRINCIPALS_OF_ROLE = {
    "ingest": ("ingest",),
    "encode": ("ingest",),
    "index": ("ingest",),
    "search": ("search",),
    "all": ("ingest", "search"),
    "reindex": ("operator",),
    "topics": ("operator",),
    "collections": ("operator",),
}

_REFUSED = {
    "GroupAuthorizationFailedError": "group",
    "TopicAuthorizationFailedError": "topic",
    "TransactionalIdAuthorizationFailedError": "transactional-id",
    "ClusterAuthorizationFailedError": "cluster",
}


def refusal(exc: BaseException, settings: Settings, role: str) -> str | None:
    """One line saying which ACL the broker found missing when it refused ``role``'s principal
    (``exc``: a Kafka authorization error, however wrapped), or None if ``exc`` is not one.
    ``role``: a worker's, a command's (``topics``, ``reindex``), or a ``serve --role``."""
    from kafka.errors import AuthorizationError

    from loupe.consumers.kafka.failures import root_cause

    cause = root_cause(exc)
    if not isinstance(cause, AuthorizationError):
        return None
    principals = PRINCIPALS_OF_ROLE.get(role, ())
    user = settings.sasl_plain_username or "this client"
    resource = _REFUSED.get(type(cause).__name__, "")
    named = str(cause).split(": ", 1)[1] if ": " in str(cause) else ""
    names = {name.strip(" '{}") for name in named.split(",")} - {""}
    wanted = [
        acl
        for principal in principals
        for acl in required_acls(settings, principal)
        if acl.resource == resource
        and (
            not names
            or any(
                name == acl.name or (acl.pattern == "prefixed" and name.startswith(acl.name))
                for name in names
            )
        )
    ]
    missing = "; ".join(
        f"{'/'.join(acl.operations)} on {acl.resource} {acl.name}"
        + (" (prefixed)" if acl.pattern == "prefixed" else "")
        for acl in dict.fromkeys(wanted)
    )
    if not names and len(wanted) > 1:  # the broker did not say which: do not list them all
        missing = f"its {resource} ACLs"
    who = " and ".join(principals)
    return (
        f"the broker refused {user!r} ({type(cause).__name__}"
        + (f": {named}" if named else "")
        + ")"
        + (f"; the {who} principal needs {missing}" if missing and who else "")
        + f"; `loupe acls{' ' + ' '.join(principals) if principals else ''}` prints what "
        "Loupe's principals need (deploy/README.md, Secure)"
    )
