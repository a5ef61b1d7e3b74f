"""``loupe reindex`` and ``loupe collections``: moving the live index to another model."""

from __future__ import annotations

import time

import click

from loupe.cli.common import KAFKA_SETTINGS, global_options, settings, settings_epilog
from loupe.cli.model_cmds import MODEL_SETTINGS

REINDEX_METRICS_PORT = 9401  # beside a service's 9400 on the same machine


def _when(unix_s: float | None) -> str:
    if unix_s is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_s))


@click.command(
    epilog=settings_epilog(
        *KAFKA_SETTINGS,
        "products_topic",
        "group_id",
        "index_url",
        "index_engine",
        "state_dir",
        "reindex_grace_s",
        *MODEL_SETTINGS,
    )
)
@click.option(
    "--rollback",
    is_flag=True,
    help="Point the alias back at the collection the last switch replaced (within its grace).",
)
@click.option(
    "--grace-s",
    type=click.IntRange(0, None),
    default=None,
    help="Keep the replaced collection this long for --rollback [default: LOUPE_REINDEX_GRACE_S].",
)
@click.option(
    "--allow-count-difference",
    type=click.IntRange(0, None),
    default=0,
    help="Switch even if the point counts differ by this many beyond what events explain.",
)
@click.option(
    "--count-wait-s",
    type=click.FloatRange(0, None),
    default=60.0,
    help="How long counts may disagree once caught up before giving up (nothing switched).",
)
@click.option(
    "--from-vectors/--encode",
    "from_vectors",
    default=None,
    help="With LOUPE_ENCODE_ONCE: build from the new collection's vectors topic, which another "
    "instance's reindex published (a replica's), or encode the products topic. Default: from "
    "the vectors topic when it holds records and this index's own reindex did not begin.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=REINDEX_METRICS_PORT,
    help="Serve progress metrics here (0: a free port).",
)
@global_options
def reindex(
    rollback: bool,
    grace_s: int | None,
    allow_count_difference: int,
    count_wait_s: float,
    from_vectors: bool | None,
    metrics_port: int,
) -> int:
    """Build the index for the configured model from the products topic, then switch to it.

    Reads the (compacted) products topic from the beginning with its own consumer group,
    through the same ingest pipeline as `loupe serve`, into a new collection, while running
    services keep answering from the live one and indexing new events into it. Once caught up
    (no lag, point counts agree), the alias moves to the new collection in one step; running
    services load the new model and follow without a restart. The old collection is kept for
    the grace period (`--rollback` returns to it), then a running service drops it.

    With LOUPE_ENCODE_ONCE it publishes what it encodes to the new collection's vectors topic.
    A replica (LOUPE_REPLICA_ID) whose reindex runs after another's builds its index from that
    topic and encodes nothing (see --from-vectors).

    Interrupted or killed, it resumes from where it committed when run again. Configure the new
    model as for `loupe serve` (e.g. LOUPE_FUSION_CHECKPOINT=new.pt loupe reindex).
    """
    from loupe.consumers.kafka.io import require_broker
    from loupe.consumers.service.reindex import CountsDisagree, Reindex
    from loupe.consumers.service.reindex import rollback as roll_back

    config = settings()
    grace = float(config.reindex_grace_s if grace_s is None else grace_s)
    if rollback:
        target, replaced = roll_back(config, grace)
        click.echo(f"rolled back: {config.index_prefix} -> {target} (was {replaced})")
        click.echo(
            f"{replaced} is kept until {_when(time.time() + grace)}; running services follow now"
        )
        return 0
    require_broker(config, wait_s=5.0)
    job = Reindex(
        config,
        report=lambda line: click.echo(line),
        grace_s=grace,
        allow_count_difference=allow_count_difference,
        count_wait_s=count_wait_s,
        from_vectors=from_vectors,
    ).start(metrics_port)
    click.echo(f"progress metrics on http://{config.metrics_host}:{job.health.port}/metrics")
    job.install_signal_handlers()
    try:
        outcome = job.run()
    except CountsDisagree as exc:
        click.echo(f"loupe reindex: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("interrupted: run `loupe reindex` again to resume where it stopped", err=True)
        return 130
    if not outcome.switched:
        click.echo(f"nothing to do: {outcome.detail}")
        return 0
    click.echo(
        f"switched: {config.index_prefix} -> {outcome.collection} (was {outcome.previous}) "
        f"after {outcome.events} events in {outcome.seconds:.1f} s; {outcome.detail}"
    )
    if outcome.previous is not None:
        click.echo(
            f"{outcome.previous} is kept until {_when(time.time() + grace)} for "
            "`loupe reindex --rollback`; a running service drops it after that"
        )
    return 0


@click.command(
    epilog=settings_epilog(
        "index_url", "index_engine", "state_dir", "index_prefix", "vectors_topic", "group_id"
    )
)
@click.option(
    "--prune",
    is_flag=True,
    help="Delete what Kafka keeps of collections the index no longer holds: their vectors "
    "topics and their encoders', index writers' and reindexes' groups (the operator's ACLs).",
)
@click.option("--dry-run", is_flag=True, help="With --prune: say what it would delete, only.")
@global_options
def collections(prune: bool, dry_run: bool) -> int:
    """List the index's collections: which is live, their models, states and sizes.

    A running service drops a retired collection from its index once its grace is over; the
    collection's vectors topic (LOUPE_ENCODE_ONCE) and consumer groups stay in Kafka until
    `--prune` removes them. A group with members (another replica still on that model) is
    kept, with its topic, and named."""
    from loupe.consumers.service.reindex import describe_collections, kafka_leftovers

    config = settings()
    if dry_run and not prune:
        raise click.UsageError("--dry-run goes with --prune")
    if prune:
        from loupe.consumers.kafka.io import require_broker

        require_broker(config, wait_s=5.0)
        found = kafka_leftovers(config, delete=not dry_run)
        verb = "would delete" if dry_run else "deleted"
        for kind, names in (("topic", found.topics), ("group", found.groups)):
            for name in names:
                click.echo(f"{verb} {kind} {name}")
        for name in found.busy:
            click.echo(f"kept {name}: a consumer still reads it (another index on that model)")
        if not found and not found.busy:
            click.echo("nothing to prune: Kafka keeps nothing of dropped collections")
        return 0
    rows = describe_collections(config)
    if not rows:
        click.echo("no collections yet")
        return 0
    for row in rows:
        mark = "*" if row["live"] else " "
        points = row["points"] if row["points"] is not None else "?"
        click.echo(f"{mark} {row['collection']}")
        click.echo(f"    state {row['state']}, {points} points, model {row['model_version']}")
        if row["drop_after"]:
            click.echo(f"    dropped after {_when(row['drop_after'])}")  # type: ignore[arg-type]
    return 0


COMMANDS = [reindex, collections]
