"""Kafka's names, written once (consumers/kafka/names.py): every group and transactional id a
worker takes is one that its principal's ACLs grant, in every mode; the topics are where the
workers and ``loupe topics create`` look for them."""

from __future__ import annotations

import pytest

from loupe.consumers.kafka.acls import Acl, required_acls
from loupe.consumers.kafka.names import ENCODE, INDEX, INGEST, REINDEX, SEARCH, KafkaNames
from loupe.consumers.settings import Settings

COLLECTION = "loupe__m_0123456789ab"


def _granted(acls: list[Acl], resource: str, name: str) -> bool:
    return any(
        acl.resource == resource
        and (name == acl.name if acl.pattern == "literal" else name.startswith(acl.name))
        for acl in acls
    )


@pytest.mark.parametrize("replica_id", [None, "r1"])
@pytest.mark.parametrize("encode_once", [False, True])
def test_every_name_a_worker_takes_is_granted_to_its_principal(encode_once, replica_id):
    settings = Settings(group_id="shop", encode_once=encode_once, replica_id=replica_id)
    names = KafkaNames.of(settings)
    ingest, search, operator = (
        required_acls(settings, p) for p in ("ingest", "search", "operator")
    )

    if encode_once:
        workers = {ENCODE: names.encode_group(COLLECTION), INDEX: names.index_group(COLLECTION)}
        assert _granted(ingest, "topic", names.vectors_topic(COLLECTION))
        assert _granted(operator, "topic", names.vectors_topic(COLLECTION))
    else:
        workers = {INGEST: names.ingest_group()}
        assert not _granted(ingest, "topic", names.vectors_topic(COLLECTION))
    for worker, group in workers.items():
        assert _granted(ingest, "group", group), group
        assert _granted(ingest, "transactional-id", names.transactional_id(worker))
    assert _granted(search, "group", names.search_group())
    assert _granted(search, "transactional-id", names.transactional_id(SEARCH))
    assert _granted(operator, "group", names.reindex_group(COLLECTION))
    # and nobody else's
    assert not _granted(search, "group", names.reindex_group(COLLECTION))
    assert not _granted(ingest, "group", names.search_group())
    assert not _granted(operator, "transactional-id", names.transactional_id(REINDEX))


def test_a_replica_writes_under_groups_of_its_own_and_shares_the_search_and_encoders():
    shared, a = (KafkaNames.of(Settings(group_id="g", replica_id=r)) for r in (None, "a"))
    assert (shared.ingest_group(), a.ingest_group()) == ("g.ingest", "g.ingest.a")
    assert a.index_group("c") == "g.index.c.a" and a.reindex_group("c") == "g.reindex.c.a"
    assert a.search_group() == shared.search_group() == "g.search"
    assert a.encode_group("c") == shared.encode_group("c") == "g.encode.c"


def test_a_transactional_id_is_this_process_s_and_unique_per_worker():
    names = KafkaNames.of(Settings(group_id="g"))
    ids = {names.transactional_id(w) for w in (INGEST, SEARCH, ENCODE, INDEX)}
    assert len(ids) == 4
    assert all(i.startswith("g.") for i in ids)
    assert names.transactional_id(SEARCH) == names.transactional_id(SEARCH), "stable in a process"


def test_the_topics_a_role_needs_and_those_loupe_creates():
    names = KafkaNames.of(Settings())
    assert names.required("search") == [
        names.dead_letters,
        names.search_requests,
        names.search_responses,
    ]
    assert names.products.base in names.required("ingest")
    assert set(names.all_topics()) == set(names.required("all"))
    per_merchant = KafkaNames.of(Settings(merchant_topics=True))
    assert per_merchant.products.base not in per_merchant.required("all")
    assert per_merchant.catalog_topics(["m1", "m2"]) == [
        f"{per_merchant.products.base}.m1",
        f"{per_merchant.products.base}.m2",
    ]
    with pytest.raises(ValueError, match="cannot name a topic"):
        per_merchant.all_topics(["no spaces"])
