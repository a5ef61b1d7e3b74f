"""The GPU path's own steps, run on the CPU: the two-stage pipeline, the padded small-batch
graphs (eagerly, as they run where no graph can be captured) and the tokenizer's cut."""

from __future__ import annotations

import dataclasses
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.dev.catalog import encode_input, load_catalog
from loupe.encoders.device import Acceleration
from loupe.encoders.fused import EncodeInput, FusedEncoder, ModelProfile
from loupe.encoders.graphs import BATCH_BUCKETS, SmallBatchGraphs, batch_buckets, bucket
from loupe.encoders.text_towers import CHARS_PER_TOKEN

PLAIN = Acceleration(
    amp_dtype=None, channels_last=False, pinned_copies=False, batch_jpeg_decode=False
)


@pytest.fixture(scope="module")
def encoder():
    encoder = FusedEncoder.from_profile(ModelProfile(batch_size=8))
    yield encoder
    encoder.close()


def _items() -> list[EncodeInput]:
    products = [encode_input(p) for p in load_catalog()[:14]]
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    return [
        *products[:6],
        EncodeInput(text="gold hoop earrings"),
        EncodeInput(image=products[6].image),
        EncodeInput(image=b"\xff\xd8 not a photo", text="broken"),
        EncodeInput(image=png.getvalue(), text="a red square"),
        *products[7:],
    ]


def _vectors(results) -> list[dict]:
    return [r.vectors if r.ok else r.error.reason for r in results]


@pytest.mark.parametrize("decode", [False, True])
def test_overlapped_batches_give_what_one_batch_at_a_time_gives(encoder, decode):
    items = _items()
    serial = encoder.with_options(acceleration=dataclasses.replace(PLAIN, batch_jpeg_decode=decode))
    overlapped = encoder.with_options(
        acceleration=dataclasses.replace(PLAIN, batch_jpeg_decode=decode, overlap_batches=True)
    )
    expected, got = (
        _vectors(serial.encode_queries(items)),
        _vectors(overlapped.encode_queries(items)),
    )
    serial.close()
    overlapped.close()
    assert len(got) == len(items) == len(expected)
    for a, b in zip(expected, got, strict=True):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for view in a:
                np.testing.assert_allclose(a[view], b[view], atol=1e-6)
        else:
            assert a == b


def test_a_failing_batch_in_the_pipeline_fails_only_its_culprit(encoder, monkeypatch):
    overlapped = encoder.with_options(acceleration=dataclasses.replace(PLAIN, overlap_batches=True))
    items = _items()
    culprit = items[10]
    real_forward = overlapped.runtime.forward

    def forward(prepared, towers_only):
        if any(item.image is culprit.image for item in prepared.items):  # the same photo
            raise RuntimeError("out of memory, say")
        return real_forward(prepared, towers_only)

    monkeypatch.setattr(overlapped.runtime, "forward", forward)
    results = overlapped.encode_queries(items)
    overlapped.close()
    failed = [i for i, r in enumerate(results) if not r.ok]
    assert failed == [8, 10]  # the broken photo, and the item whose forward pass raises
    assert results[10].error.reason.value == "encode_failed"


def _graphs(encoder, **options) -> SmallBatchGraphs:
    """The encoder's towers padded as graphs pad them, run eagerly (no capture on a CPU)."""
    return SmallBatchGraphs(
        encoder.model, autocast=encoder.runtime.autocast, side=224, capture=False, **options
    )


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_padded_small_batches_give_the_eager_vectors(encoder, rows):
    graphs = SmallBatchGraphs(
        encoder.model, autocast=encoder.runtime.autocast, side=224, capture=False
    )
    pixels = torch.rand((rows, 3, 224, 224), generator=torch.Generator().manual_seed(rows))
    texts = ["ring", "a long necklace of pearls and gold beads", "studs"] * 6
    tokens = encoder.text_encoder.tokenize(texts[:rows], encoder.device)
    with torch.inference_mode():
        image = encoder.image_encoder.encode(pixels)
        text = torch.nn.functional.normalize(encoder.text_encoder(**tokens).float(), dim=-1)
        padded_image = graphs.image(pixels)
        padded_text = graphs.text(tokens["input_ids"], tokens["attention_mask"])
    assert padded_image.shape == image.shape and padded_text.shape == text.shape
    torch.testing.assert_close(padded_image, image, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_text, text, atol=1e-5, rtol=0)


def test_batches_beyond_the_buckets_run_eagerly(encoder):
    graphs = SmallBatchGraphs(
        encoder.model, autocast=encoder.runtime.autocast, side=224, capture=False
    )
    assert bucket(3, BATCH_BUCKETS) == 4 and bucket(BATCH_BUCKETS[-1] + 1, BATCH_BUCKETS) is None
    assert graphs.image(torch.zeros((BATCH_BUCKETS[-1] + 1, 3, 224, 224))) is None
    ids = torch.zeros((1, 129), dtype=torch.long)
    assert graphs.text(ids, torch.ones_like(ids)) is None


def test_larger_graph_buckets_pad_a_big_batch_and_give_the_eager_vectors(encoder):
    """``graph_max_batch`` above 16 (bulk ingest on a GPU): a batch of 20 is padded to the
    32-row bucket, and its rows are the unpadded vectors."""
    assert batch_buckets(16) == BATCH_BUCKETS and batch_buckets(64)[-2:] == (32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32)
    graphs = SmallBatchGraphs(
        encoder.model, autocast=encoder.runtime.autocast, side=224, capture=False, max_batch=32
    )
    pixels = torch.rand((20, 3, 224, 224), generator=torch.Generator().manual_seed(20))
    with torch.inference_mode():
        image = encoder.image_encoder.encode(pixels)
        padded = graphs.image(pixels)
    assert padded.shape == image.shape
    torch.testing.assert_close(padded, image, atol=1e-5, rtol=0)
    assert graphs.image(torch.zeros((33, 3, 224, 224))) is None  # beyond: eager, unpadded


def test_graph_max_batch_must_be_a_power_of_two(encoder):
    with pytest.raises(ValueError, match="graph_max_batch must be a power of two, got 24"):
        encoder.with_options(acceleration=dataclasses.replace(PLAIN, graph_max_batch=24))


def test_graphs_and_pinned_copies_need_cuda(encoder):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        encoder.with_options(acceleration=dataclasses.replace(PLAIN, cuda_graphs=True))
    with pytest.raises(ValueError, match="host_decode_share"):
        encoder.with_options(acceleration=dataclasses.replace(PLAIN, host_decode_share=1.5))


def test_long_texts_are_cut_before_tokenizing_without_changing_the_tokens(encoder):
    text_encoder = encoder.text_encoder
    limit = text_encoder.max_tokens * CHARS_PER_TOKEN
    words = load_catalog()[0].description.split() or ["gold"]
    long = " ".join(words[i % len(words)] for i in range(3000))  # far past the window
    giant_words = " ".join(["supercalifragilisticexpialidocious" * 4] * 100)  # [UNK] each
    no_space = "x" * (limit + 50)
    texts = [long, giant_words, no_space, "short"]
    calls = []
    real = text_encoder._tokenize

    def spy(batch):
        calls.append([len(t) for t in batch])
        return real(batch)

    text_encoder._tokenize = spy
    try:
        got = text_encoder.tokenize(texts, torch.device("cpu"))
    finally:
        del text_encoder._tokenize
    whole = text_encoder._tokenize(texts)
    assert torch.equal(got["input_ids"], whole["input_ids"])
    assert torch.equal(got["attention_mask"], whole["attention_mask"])
    assert calls[0][0] <= limit < len(long)  # the long description was cut first
    assert calls[0][2] == len(no_space)  # nowhere to cut between words: left whole
    assert len(calls) == 2 and calls[1][1] == len(giant_words)  # too few tokens: whole again


@pytest.mark.parametrize("overlap", [False, True])
def test_a_stream_returns_each_batch_once_in_order_with_its_tag(encoder, overlap):
    """``FusedEncoder.stream``: what ingest feeds as photos arrive. With overlap a batch's
    results come back on the next ``put`` (or ``flush``), without it on its own ``put``."""
    streaming = encoder.with_options(
        acceleration=dataclasses.replace(PLAIN, overlap_batches=overlap)
    )
    products = [encode_input(p) for p in load_catalog()[:9]]
    stream = streaming.stream(products=True)
    finished = []
    for tag, start in (("a", 0), ("b", 4), ("c", 8)):
        returned = stream.put(products[start : start + 4], tag=tag)
        assert [t for t, _ in returned] == (
            [tag] if not overlap else {"a": [], "b": ["a"], "c": ["b"]}[tag]
        )
        finished.extend(returned)
    finished.extend(stream.flush())
    assert stream.flush() == []
    assert [t for t, _ in finished] == ["a", "b", "c"]
    got = [r.vectors["fused"] for _, results in finished for r in results]
    expected = [r.vectors["fused"] for r in encoder.encode_products(products)]
    np.testing.assert_allclose(np.stack(got), np.stack(expected), atol=1e-6)
    with pytest.raises(ValueError, match="needs both an image and text"):
        stream.put([EncodeInput(text="no photo")])
    streaming.close()


def test_the_batch_tokenizer_gives_what_transformers_gives(encoder):
    """The Rust tokenizer read straight into arrays, against transformers' own call."""
    text_encoder = encoder.text_encoder
    assert text_encoder._batch_tokenizer is not None
    texts = [encode_input(p).text for p in load_catalog()[:40]]
    texts += ["", "a", "x" * 5000, "é ñ 中文 😀 ring", "  spaced   out  ", "[SEP] [CLS]"]
    ours = text_encoder._tokenize(texts)
    theirs = text_encoder.tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=text_encoder.max_tokens,
        return_tensors="pt",
    )
    assert ours.keys() == dict(theirs).keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_the_next_batch_is_prepared_while_the_current_one_runs_forward(encoder, monkeypatch):
    """The point of the stream: batch k+1's preparation has begun before batch k's forward
    pass ends (a stream that ran them one after the other passed every other test)."""
    overlapped = encoder.with_options(acceleration=dataclasses.replace(PLAIN, overlap_batches=True))
    products = [encode_input(p) for p in load_catalog()[:6]]
    batches = [products[:2], products[2:4], products[4:]]
    began: list[EncodeInput] = []
    next_began = {id(b[0]): threading.Event() for b in batches}
    real_prepare, real_forward = overlapped.runtime.prepare, overlapped.runtime.forward
    overlapping = []

    def prepare(batch, on_stage=True):
        began.append(batch[0])
        next_began[id(batch[0])].set()
        return real_prepare(batch, on_stage)

    def forward(prepared, towers_only):
        k = next(i for i, b in enumerate(batches) if b[0] is prepared.items[0])
        if k + 1 < len(batches):
            overlapping.append(next_began[id(batches[k + 1][0])].wait(10))
        return real_forward(prepared, towers_only)

    monkeypatch.setattr(overlapped.runtime, "prepare", prepare)
    monkeypatch.setattr(overlapped.runtime, "forward", forward)
    stream = overlapped.stream(products=True)
    finished = [r for b in batches for r in stream.put(b)] + stream.flush()
    overlapped.close()
    assert overlapping == [True, True]
    assert [len(results) for _, results in finished] == [2, 2, 2]


@pytest.mark.parametrize("rows", [1, 3])
def test_the_multilingual_tower_padded_as_graphs_pad_gives_the_eager_vectors(rows):
    """XLM-RoBERTa numbers positions from the token ids (its padding id is 1, the graphs pad
    with 0): the padded rows and columns must still leave each text's vector as it is."""
    from loupe.encoders.text_towers import TextEncoder

    tower = TextEncoder("multilingual-e5-small")
    towers = type(
        "Towers",
        (),
        {
            "image_encoder": None,
            "text_encoder": tower,
            "device": torch.device("cpu"),
        },
    )()
    graphs = SmallBatchGraphs(
        towers,
        autocast=lambda graph_safe=False: torch.autocast("cpu", enabled=False),
        side=288,
        capture=False,
    )
    texts = ["金戒指", "18k gold diamond ring with a pearl", "珍珠耳环"][:rows]
    tokens = tower.tokenize(texts, torch.device("cpu"), queries=[True] * rows)
    with torch.inference_mode():
        eager = torch.nn.functional.normalize(tower(**tokens).float(), dim=-1)
        padded = graphs.text(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(padded, eager, atol=1e-5, rtol=0)
