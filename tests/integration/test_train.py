"""``loupe train`` as a merchant runs it: from the real products topic, to a checkpoint that
``loupe embed`` (and so ``serve``) loads as a new model version, and that other towers refuse."""

from __future__ import annotations

import base64
import json

import pytest
from kafka import KafkaProducer

from loupe.cli import main
from loupe.dev.catalog import load_catalog, upserted_event
from loupe.dev.cdn import StandInCdn
from loupe.encoders.fusion import load_fusion

pytestmark = pytest.mark.integration


def test_train_from_the_products_topic_then_serve_the_checkpoint(
    bootstrap_servers, make_topic, tmp_path, monkeypatch, capsys
):
    catalog = load_catalog()[::8]  # 30 products, every category
    topic = make_topic("products", partitions=3)
    photos = catalog[0].image_path.parent.parent
    with StandInCdn(photos) as cdn:
        producer = KafkaProducer(bootstrap_servers=bootstrap_servers)

        def send(key: str, event: dict | bytes) -> None:
            value = event if isinstance(event, bytes) else json.dumps(event).encode()
            producer.send(topic, key=key.encode(), value=value)

        for n, product in enumerate(catalog):
            if n % 3:
                data = base64.b64encode(product.image_path.read_bytes()).decode()
                image = {"data": data, "media_type": "image/jpeg"}
            else:  # by URL, fetched under the same policy as ingest
                image = {"url": f"{cdn.url}/{product.image_path.relative_to(photos).as_posix()}"}
            send(f"giva/{product.product_id}", upserted_event(product, image, version=1))
        gone = catalog[1]
        send(f"giva/{gone.product_id}", {**_deleted(gone.product_id)})
        missing = upserted_event(catalog[2], {"url": f"{cdn.url}/no-such.jpg"}, product_id="x1")
        send("giva/x1", missing)
        send("giva/bad", b'{"type": "product.upserted"}')
        producer.flush()
        producer.close()

        out = tmp_path / "fusion.safetensors"
        monkeypatch.setenv("LOUPE_BOOTSTRAP_SERVERS", bootstrap_servers)
        monkeypatch.setenv("LOUPE_PRODUCTS_TOPIC", topic)
        monkeypatch.setenv("LOUPE_STATE_DIR", str(tmp_path / "state"))
        monkeypatch.setenv("LOUPE_FETCH_ALLOW_LOOPBACK", "true")
        args = ["train", "--views", "3", "--steps", "150", "--tower-steps", "20"]
        code = main([*args, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "33 events: 30 products, 1 deleted, 0 superseded, 1 invalid" in printed
    assert "1 products left out: their image could not be read" in printed
    assert "held-out photo" in printed or "held-out:" in printed
    assert "photo+text" in printed and "R@10" in printed
    assert "20 steps tuning the image tower" in printed and "tower step    20" in printed
    assert "the image view whitened" in printed

    checkpoint = load_fusion(out)
    assert checkpoint.training["products"] == 29
    assert "_conv_head.weight" in checkpoint.image_tower, "the tuned tower travels with the heads"
    assert checkpoint.model.config.image_whitening, "the whitening travels with the heads"
    losses = checkpoint.training["losses"]
    assert losses[-1] < losses[0], "training lowers the loss"
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["checkpoint"] == str(out)

    # Served: a new model version (so a new collection), named after the checkpoint.
    assert main(["embed", "--text", "gold ring", "--json"]) == 0
    untrained = json.loads(capsys.readouterr().out.splitlines()[0])["model_version"]
    monkeypatch.setenv("LOUPE_FUSION_CHECKPOINT", str(out))
    assert main(["embed", "--text", "gold ring", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out.splitlines()[0])["model_version"]
    assert trained == summary["model_version"] != untrained
    # The served tower is the tuned one: its weights' identity (so the version) says so.
    tower = untrained.split(".")[0]  # efficientnet-lite0-<weights>
    assert trained.startswith(tower + "t") and not checkpoint.base.startswith(tower + "t")
    assert main(["models"]) == 0
    assert (
        f"fusion: {out} (base {checkpoint.base}; trained on 29 products, the image tower's last "
        "block tuned, the image view whitened" in capsys.readouterr().out
    )

    # Heads trained on one preprocessing are refused on another, with a way out.
    monkeypatch.setenv("LOUPE_IMAGE_FIT", "center_crop")
    assert main(["embed", "--text", "gold ring"]) == 2
    error = capsys.readouterr().err
    assert "was trained for the model base" in error and "center_crop288" in error


def test_train_a_chinese_catalog_on_the_multilingual_tower(tmp_path, monkeypatch, capsys):
    """`loupe train --events` on a catalog listed in Chinese, with multilingual-e5-small: the
    heads fit on top of that tower too, and the checkpoint serves as its own model version."""
    from loupe.dev.catalog import training_products
    from loupe.evaluation.chinese import chinese_product

    events = tmp_path / "products.jsonl"
    with events.open("w") as out:
        for product in training_products(load_catalog()[::12]):  # 20 products
            listed = chinese_product(product)
            merchant, product_id = listed.key.split("/", 1)
            image = {"data": base64.b64encode(listed.image).decode(), "media_type": "image/jpeg"}
            event = {
                "type": "product.upserted",
                "event_id": f"e-{product_id}",
                "occurred_at": "2026-12-01T00:00:00+00:00",
                "merchant_id": merchant,
                "product_id": product_id,
                "title": listed.title,
                "attributes": dict(listed.attributes),
                "image": image,
            }
            out.write(json.dumps(event, ensure_ascii=False) + "\n")
    monkeypatch.setenv("LOUPE_TEXT_BACKBONE", "multilingual-e5-small")
    monkeypatch.setenv("LOUPE_STATE_DIR", str(tmp_path / "state"))
    checkpoint_path = tmp_path / "fusion-zh.safetensors"
    args = ["train", "--events", str(events), "--views", "2", "--steps", "60"]
    assert main([*args, "--out", str(checkpoint_path)]) == 0, capsys.readouterr().out
    printed = capsys.readouterr().out
    assert "20 products" in printed
    checkpoint = load_fusion(checkpoint_path)
    assert ".multilingual-e5-small-" in checkpoint.base
    monkeypatch.setenv("LOUPE_FUSION_CHECKPOINT", str(checkpoint_path))
    assert main(["embed", "--text", "钻石戒指", "--json"]) == 0
    embedded = json.loads(capsys.readouterr().out.splitlines()[0])
    assert embedded["model_version"].startswith(checkpoint.base)
    assert len(embedded["vectors"]["text"]) == 384


def _deleted(product_id: str) -> dict:
    return {
        "type": "product.deleted",
        "event_id": f"delete-{product_id}",
        "occurred_at": "2026-11-28T00:00:00+00:00",
        "merchant_id": "giva",
        "product_id": product_id,
    }
