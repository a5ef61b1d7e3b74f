"""Fit the fusion model's heads and attention to a catalog, on cached tower vectors.

Per step, a batch of training products: a few simulated shopper photos with a short query text
each (drawn from their cached views) against the products' catalog photo and text. Loss (see
``objective.py``): InfoNCE for the ``image`` view (photo -> product) and, at a lower weight, the
``fused`` view (photo + text -> product: the fused view also gains through the image head, and
at full weight its instance term pulled photo + text queries away from their category), plus
neighbourhood KL terms against the frozen (untrained) model, for catalog-to-catalog and
query-to-catalog similarities: the ``fused`` view keeps its own neighbourhoods, a photo + text
query's with its words given more say (``query_words_share``), and the ``image`` view takes the
frozen ``fused`` view's (a cross-modal teacher: the products' words say which photos are of the
same kind). The ``text`` view stays the frozen tower's (``train_text_head``: training it gained
nothing for text-only queries and cost photo + text recall).

A share of the products (``holdout``) never takes part: they stand for the products a merchant
adds after training, and the metrics on them are reported apart. Which products are held out
depends only on their key, so the split is stable as the catalog grows.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from loupe.encoders.fusion import FusionModel, with_image_whitening
from loupe.train.config import TrainConfig
from loupe.train.evaluate import RetrievalScores, evaluate
from loupe.train.features import CatalogFeatures
from loupe.train.objective import info_nce, neighbourhood_kl
from loupe.train.whitening import fit_whitening

log = logging.getLogger(__name__)


Scores = dict[str, dict[str, RetrievalScores]]  # split ("seen", "held_out") -> kind -> scores


@dataclass
class TrainResult:
    model: FusionModel
    before: Scores
    after: Scores
    history: list[dict] = field(default_factory=list)  # per evaluation: step, loss, held-out
    seconds: float = 0.0
    products: int = 0
    held_out: int = 0

    def record(self, config: TrainConfig) -> dict:
        """What the checkpoint's metadata keeps about this training."""

        def plain(scores: Scores) -> dict:
            return {s: {k: v.as_dict() for k, v in kinds.items()} for s, kinds in scores.items()}

        return {
            "config": asdict(config),
            "products": self.products,
            "held_out": self.held_out,
            "seconds": round(self.seconds, 1),
            "before": plain(self.before),
            "after": plain(self.after),
            "losses": [record["loss"] for record in self.history],
        }


def progress_line(record: dict) -> str:
    """One evaluation record (``train``'s ``on_evaluation``) as a progress line: the held-out
    numbers (the seen ones when nothing is held out). Photo + text R@1 is photo R@1 (its answer
    starts with the photo's best match), so the line shows what the fusion moves instead: the
    share of a photo + text answer in the product's category."""
    split = record["held_out"] or record["seen"]

    def p10(kind: str) -> str:
        value = split[kind]["category_p10"]
        return "-" if value is None else f"{value:.3f}"

    return (
        f"    step {record['step']:>6}  loss {record['loss']:.4f}  held-out: photo R@1 "
        f"{split['photo']['recall_at_1']:.3f}  photo+text P@10 {p10('photo+text')}  "
        f"text P@10 {p10('text')}  ({record['seconds']:.0f} s)"
    )


def held_out_mask(keys: list[str], share: float, seed: int) -> np.ndarray:
    """True for the products kept out of training: a hash of (seed, key) below ``share``."""

    def unit(key: str) -> float:
        value = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
        return value / 2**64

    return np.array([unit(k) < share for k in keys], dtype=bool)


class _Tensors:
    """The features on the training device, in float16 as cached (half the memory: 100k
    products at 12 views take ~4.7 GB); batches are cast to float32 as they are drawn."""

    def __init__(self, features: CatalogFeatures, device: torch.device) -> None:
        self.device = device
        t = self._on_device
        self.catalog_image = t(features.catalog_image)  # (N, Di)
        self.catalog_text = t(features.catalog_text)  # (N, Dt)
        self.view_image = t(features.view_image)  # (N, K, Di)
        self.view_text = t(features.view_text)  # (N, K, Dt)
        self.eval_image = t(features.eval_image)  # (N, Di)
        self.eval_text = t(features.eval_text)  # (N, Dt)
        self.eval_regions: torch.Tensor | None = None  # (N, k, Di): the photos' parts

    def _on_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float16)).to(self.device)

    def use_queries(
        self, photo: np.ndarray, text: np.ndarray, regions: np.ndarray | None = None
    ) -> None:
        """Evaluate with these query vectors, ``(N, Di)`` and ``(N, Dt)``, instead, and the
        photos' parts ``(N, k, Di)`` where given."""
        if regions is not None and (regions.ndim != 3 or regions.shape[::2] != photo.shape):
            raise ValueError(f"regions {regions.shape} do not fit the photos {photo.shape}")
        self.eval_regions = None if regions is None else self._on_device(regions)
        if photo.shape != self.eval_image.shape or text.shape != self.eval_text.shape:
            raise ValueError(
                f"queries {photo.shape}, {text.shape} do not fit the catalog's "
                f"{tuple(self.eval_image.shape)}, {tuple(self.eval_text.shape)}"
            )
        self.eval_image, self.eval_text = self._on_device(photo), self._on_device(text)


def train(
    features: CatalogFeatures,
    model: FusionModel,
    config: TrainConfig,
    *,
    device: torch.device | None = None,
    on_evaluation: Callable[[dict], None] | None = None,
    baseline: CatalogFeatures | None = None,
) -> TrainResult:
    """Train a copy of ``model`` (its untrained state is the frozen reference); return it with
    the scores before and after. ``on_evaluation`` gets each progress record. ``baseline``: the
    features the scores before are measured on, when ``features`` are a tuned tower's (the
    frozen towers' vectors: what the service answered with before training)."""
    device = device or torch.device("cpu")
    started = time.perf_counter()
    held = held_out_mask(features.keys, config.holdout, config.seed)
    train_rows = np.flatnonzero(~held)
    if len(train_rows) < 2:
        raise ValueError(
            f"training needs at least 2 products outside the held-out share, got "
            f"{len(train_rows)} of {len(features)} (holdout {config.holdout})"
        )
    data = _Tensors(features, device)
    frozen = copy.deepcopy(model).to(device).eval()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    if config.whitening_shrinkage:  # a new model with the whitening, the rest model's weights
        fitted = fit_whitening(
            features.catalog_image,
            features.view_image,
            train_rows,
            config.whitening_shrinkage,
            device,
        )
        trained = with_image_whitening(model, *fitted)
    else:
        trained = copy.deepcopy(model)
    trained = trained.to(device).train()
    if not config.train_text_head:
        trained.text_head.requires_grad_(False)
    if not config.train_image_head:
        trained.image_head.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    optimiser = torch.optim.AdamW(
        [p for p in trained.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.steps)

    def scores(m: FusionModel) -> Scores:
        return _scores(m, data, features.categories, held, config.eval_queries)

    before_data = data if baseline is None else _Tensors(baseline, device)
    before = _scores(frozen, before_data, features.categories, held, config.eval_queries)
    result = TrainResult(
        model=trained,
        before=before,
        after={},
        products=len(features),
        held_out=int(held.sum()),
    )
    batch = min(config.batch_size, len(train_rows))
    order: list[int] = []
    running = 0.0
    for step in range(1, config.steps + 1):
        if len(order) < batch:  # a new epoch, after the last one's leftovers, none twice
            fresh = train_rows[torch.randperm(len(train_rows), generator=generator)].tolist()
            leftover = set(order)
            order += [row for row in fresh if row not in leftover]
        rows = torch.tensor(order[:batch], device=device)
        del order[:batch]
        loss = _loss(trained, frozen, data, rows, config, generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        running += float(loss.detach())
        if step % config.eval_every == 0 or step == config.steps:
            trained.eval()
            now = scores(trained)
            trained.train()
            done = step % config.eval_every or config.eval_every
            record = {
                "step": step,
                "loss": round(running / done, 4),
                "seconds": round(time.perf_counter() - started, 1),
                "held_out": {k: v.as_dict() for k, v in now.get("held_out", {}).items()},
                "seen": {k: v.as_dict() for k, v in now["seen"].items()},
            }
            running = 0.0
            result.history.append(record)
            if on_evaluation is not None:
                on_evaluation(record)
    trained.eval()
    result.after = scores(trained)
    result.seconds = time.perf_counter() - started
    return result


def _loss(
    model: FusionModel,
    frozen: FusionModel,
    data: _Tensors,
    rows: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    batch, views = len(rows), data.view_image.shape[1]
    asked = rows.repeat(config.photos_per_product)  # (Q,) the product each query is about
    own = torch.arange(batch, device=rows.device).repeat(config.photos_per_product)  # (Q,)
    pick = torch.randint(0, views, (len(asked),), generator=generator).to(rows.device)
    pick_text = torch.randint(0, views, (len(asked),), generator=generator).to(rows.device)
    photo = data.view_image[asked, pick].float()  # (Q, Di) shopper photos
    words = data.view_text[asked, pick_text].float()  # (Q, Dt) a short query text each
    image, text = data.catalog_image[rows].float(), data.catalog_text[rows].float()  # (B, .)

    query_fused, index_fused = model(photo, words), model(image, text)  # (Q, D), (B, D)
    t = config.temperature
    loss = config.fused_weight * info_nce(query_fused, index_fused, t, own)
    if config.train_image_head:  # else the image view has nothing to learn: leave it out
        query_image, index_image = model.image(photo), model.image(image)  # (Q, Di), (B, Di)
        loss = loss + info_nce(query_image, index_image, t, own)
    if config.neighbourhood_weight:
        with torch.no_grad():
            f_index_fused, f_query_fused = frozen(image, text), frozen(photo, words)
            f_index_text, f_query_text = frozen.text(text), frozen.text(words)
            f_catalog = f_index_fused @ f_index_fused.T  # (B, B) the frozen fused neighbourhoods
        tn = config.neighbourhood_temperature
        share = config.query_words_share
        keep = (
            # catalog to catalog: the index's own neighbourhoods.
            neighbourhood_kl(f_catalog, index_fused @ index_fused.T, tn)
            # query to catalog, own product left out: what a query finds besides its product.
            # A photo + text query's: products that look like it and match its words.
            + neighbourhood_kl(
                (1 - share) * (f_query_fused @ f_index_fused.T)
                + share * (f_query_text @ f_index_text.T),
                query_fused @ index_fused.T,
                tn,
                own=own,
            )
        )
        if config.train_image_head:
            # The image view learns its neighbourhoods from the frozen fused view (image +
            # text), whose neighbours share a category far more often than the image view's
            # alone: a photo-only query then finds the photographed product first and products
            # of its kind after it.
            keep = (
                keep
                + neighbourhood_kl(f_catalog, index_image @ index_image.T, tn)
                + neighbourhood_kl(f_catalog[own], query_image @ index_image.T, tn, own=own)
            )
        if config.train_text_head:  # else the text view is the frozen one: nothing to keep
            query_text, index_text = model.text(words), model.text(text)  # (Q, Dt), (B, Dt)
            keep = keep + neighbourhood_kl(
                f_index_text @ f_index_text.T, index_text @ index_text.T, tn
            )
            # a text names a kind of product: its whole distribution is kept
            keep = keep + neighbourhood_kl(
                f_query_text @ f_index_text.T, query_text @ index_text.T, tn, mask_own=False
            )
        loss = loss + config.neighbourhood_weight * keep
    return loss


def _sample(rows: np.ndarray, most: int) -> np.ndarray:
    """The same ``most`` rows at every evaluation, so that the numbers compare over time."""
    if len(rows) <= most:
        return rows
    return np.sort(np.random.default_rng(0).choice(rows, size=most, replace=False))


def evaluate_splits(
    model: FusionModel,
    features: CatalogFeatures,
    config: TrainConfig,
    *,
    anchor: bool = True,
    device: torch.device | None = None,
    queries: tuple[np.ndarray, ...] | None = None,
    photo_kind_weight: float = 0.0,
) -> Scores:
    """``model``'s scores on the seen and held-out products of ``config``'s split, as training
    reports them (``anchor`` False: photo + text ranked by the fused view alone). ``queries``:
    other query photos and texts to ask with, row ``i`` about product ``i`` (the tower vectors
    of another simulator's photos: ``loupe.evaluation``), and optionally their parts (a photo
    then answered by the whole or a part, as the service does); default the held-back view.
    ``photo_kind_weight``: photos ranked as with ``LOUPE_PHOTO_KIND_WEIGHT``."""
    held = held_out_mask(features.keys, config.holdout, config.seed)
    data = _Tensors(features, device or torch.device("cpu"))
    if queries is not None:
        data.use_queries(*queries)
    return _scores(
        model.eval(), data, features.categories, held, config.eval_queries, anchor,
        photo_kind_weight,
    )  # fmt: skip


def _scores(
    model: FusionModel,
    data: _Tensors,
    categories: np.ndarray | None,
    held: np.ndarray,
    max_queries: int,
    anchor: bool = True,
    photo_kind_weight: float = 0.0,
) -> Scores:
    splits = {
        "seen": _sample(np.flatnonzero(~held), max_queries),
        "held_out": _sample(np.flatnonzero(held), max_queries),
    }
    return {
        split: evaluate(
            model,
            data.catalog_image,
            data.catalog_text,
            data.eval_image,
            data.eval_text,
            categories,
            rows,
            anchor=anchor,
            photo_kind_weight=photo_kind_weight,
            regions=data.eval_regions,
        )
        for split, rows in splits.items()
        if len(rows)
    }
