"""``loupe serve`` and ``loupe topics``: running the service and provisioning its topics."""

from __future__ import annotations

import click

from loupe.cli.common import KAFKA_SETTINGS, global_options, settings, settings_epilog
from loupe.consumers.kafka.acls import PRINCIPALS
from loupe.consumers.kafka.topics import ROLES

# How long `serve` waits for the broker at start-up: long enough for a broker that starts beside
# it (compose, a test), short enough that a wrong address is reported while someone watches.
SERVE_BROKER_WAIT_S = 10.0


@click.command(
    epilog=settings_epilog(
        *KAFKA_SETTINGS,
        "group_id",
        "products_topic",
        "search_requests_topic",
        "search_responses_topic",
        "deadletter_topic",
        "index_url",
        "replica_id",
        "state_dir",
        "metrics_port",
        "device",
    )
    + "\n  (and the rest: README.md, Configuration)",
)
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default="all",
    help="Which consumers to run; scale each role with instances in the same group.",
)
@click.option(
    "--create-topics", is_flag=True, help="Create Loupe's topics if missing (development)."
)
@global_options
def serve(role: str, create_topics: bool) -> int:
    """Run the ingest and/or search consumers until SIGTERM or Ctrl-C.

    Prints the effective settings (secrets masked) at start. SIGTERM finishes the batch in
    flight, commits and exits; a second signal exits at once.
    """
    from kafka.errors import KafkaError

    from loupe.consumers.errors import BrokerRefused, WorkerDied
    from loupe.consumers.kafka.acls import refusal
    from loupe.consumers.kafka.io import require_broker
    from loupe.consumers.kafka.topics import ensure_topics
    from loupe.consumers.service.lifecycle import LoupeService, check_role

    config = settings()
    check_role(config, role)  # before the broker and the model: a wrong role fails at once
    click.echo("effective settings:")
    for name, value in sorted(config.describe().items()):
        click.echo(f"  LOUPE_{name.upper()}={value}")
    require_broker(config, wait_s=SERVE_BROKER_WAIT_S)
    if create_topics:
        ensure_topics(config)
    try:
        service = LoupeService(config, role=role).start()
    except KafkaError as exc:  # a producer's or group's first call: the role's principal's ACLs
        refused = refusal(exc, config, role)
        if refused is None:
            raise
        raise BrokerRefused(refused) from None
    service.install_signal_handlers()
    try:
        service.run()
    except WorkerDied as exc:  # its traceback is in the log above, once
        click.echo(f"loupe serve: {exc}; exiting so that a supervisor restarts it", err=True)
        return 1
    return 0


@click.group()
@global_options
def topics() -> None:
    """Create or check Loupe's Kafka topics (names from the LOUPE_*_TOPIC settings)."""


@topics.command(
    "create",
    epilog=settings_epilog(
        *KAFKA_SETTINGS,
        "products_topic",
        "search_requests_topic",
        "search_responses_topic",
        "deadletter_topic",
    ),
)
@click.option(
    "--partitions",
    type=click.IntRange(1, 10_000),
    default=3,
    help="Partitions per topic: the most consumer instances one role can use.",
)
@click.option(
    "--replication-factor", type=click.IntRange(1, 16), default=1, help="Copies of each partition."
)
@click.option(
    "--merchant",
    "merchants",
    multiple=True,
    metavar="MERCHANT_ID",
    help="With LOUPE_MERCHANT_TOPICS: create this merchant's products topic (repeatable).",
)
@global_options
def topics_create(partitions: int, replication_factor: int, merchants: tuple[str, ...]) -> int:
    """Create whichever of Loupe's topics are missing (existing ones are left as they are).

    The products topic is created compacted (cleanup.policy=compact): Kafka keeps the latest
    event of every product forever, so the whole catalog can be read again from the beginning
    (`loupe train`, a new model's ingest). Delete a product with a product.deleted event; a
    tombstone (null value under its key) deletes it too and lets compaction forget it.
    """
    from loupe.consumers.kafka.io import require_broker
    from loupe.consumers.kafka.names import KafkaNames
    from loupe.consumers.kafka.topics import ensure_topics

    config = settings()
    if merchants and not config.merchant_topics:
        raise click.UsageError(
            "--merchant creates a merchant's products topic: set LOUPE_MERCHANT_TOPICS=true"
        )
    products = config.products_topics()
    for merchant in merchants:
        try:
            products.merchant_topic(merchant)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--merchant") from None
    require_broker(config)
    created = ensure_topics(config, partitions, replication_factor, merchants)
    for topic in KafkaNames.of(config).all_topics(merchants):
        shown = "created" if topic in created else "exists"
        if products.holds(topic) and topic in created:
            shown += " (compacted)"
        click.echo(f"{topic}: {shown}")
    return 0


@topics.command("check", epilog=settings_epilog(*KAFKA_SETTINGS))
@click.option("--role", type=click.Choice(ROLES), default="all", help="Whose topics to check.")
@global_options
def topics_check(role: str) -> int:
    """Check that the topics a role needs exist (what `serve` checks at start)."""
    from loupe.consumers.kafka.io import require_broker
    from loupe.consumers.kafka.names import KafkaNames
    from loupe.consumers.kafka.topics import check_topics, cleanup_policy

    config = settings()
    require_broker(config)
    check_topics(config, role)  # logs a warning if the products topic is not compacted
    click.echo(f"all present: {', '.join(KafkaNames.of(config).required(role))}")
    if role in ("ingest", "all") and not config.merchant_topics:
        policy = cleanup_policy(config, config.products_topic)
        click.echo(f"{config.products_topic}: cleanup.policy={policy}")
    return 0


@click.command(
    "acls",
    epilog=settings_epilog(
        "group_id",
        "products_topic",
        "merchant_topics",
        "search_requests_topic",
        "search_responses_topic",
        "deadletter_topic",
        "vectors_topic",
        "encode_once",
    ),
)
@click.argument("principals", nargs=-1, type=click.Choice(PRINCIPALS))
@click.option(
    "--merchant",
    "merchants",
    multiple=True,
    metavar="MERCHANT_ID",
    help="With LOUPE_MERCHANT_TOPICS: also what this merchant's system needs (repeatable; its "
    "user: --user MERCHANT_ID=USER).",
)
@click.option(
    "--user",
    "users",
    multiple=True,
    metavar="PRINCIPAL=USER",
    help="The Kafka user of a principal (default: the principal's name), e.g. ingest=loupe-ingest.",
)
@global_options
def acls(principals: tuple[str, ...], merchants: tuple[str, ...], users: tuple[str, ...]) -> int:
    """Print the Kafka ACLs each of Loupe's principals needs, as kafka-acls.sh commands.

    ingest runs `serve --role ingest` (encode-once included), search `serve --role search`,
    operator `topics create` and `reindex`; `serve --role all` needs ingest's and search's. The
    names come from the LOUPE_* settings below. Add your --bootstrap-server and
    --command-config to each line. Nothing else is needed where the broker denies by default.
    """
    from loupe.consumers.kafka.acls import merchant_acls, required_acls

    config = settings()
    if merchants and not config.merchant_topics:
        raise click.UsageError("--merchant: set LOUPE_MERCHANT_TOPICS=true (docs/security.md)")
    named = dict(user.split("=", 1) for user in users if "=" in user)
    unknown = set(named) - {*PRINCIPALS, *merchants} or {u for u in users if "=" not in u}
    if unknown:
        raise click.BadParameter(
            f"{', '.join(sorted(unknown))}: expected PRINCIPAL=USER with PRINCIPAL one of "
            f"{', '.join(PRINCIPALS)}",
            param_hint="--user",
        )
    modes = [
        name
        for name, on in (
            ("LOUPE_MERCHANT_TOPICS", config.merchant_topics),
            ("LOUPE_ENCODE_ONCE", config.encode_once),
        )
        if on
    ]
    shown = f" ({', '.join(f'{name}=true' for name in modes)})" if modes else ""
    for principal in principals or (() if merchants else PRINCIPALS):
        click.echo(f"# {principal}{shown}")
        for acl in required_acls(config, principal):
            click.echo(acl.command(f"User:{named.get(principal, principal)}"))
    for merchant in merchants:
        try:
            found = merchant_acls(config, merchant)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--merchant") from None
        click.echo(f"# merchant {merchant}: its own products topic only")
        for acl in found:
            click.echo(acl.command(f"User:{named.get(merchant, merchant)}"))
    return 0


COMMANDS = [serve, topics, acls]
