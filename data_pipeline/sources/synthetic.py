"""Synthetic interactions at any scale: power-law popularity with learnable latent structure.

The generative story (all seeded, generated in chunks so memory stays O(users + items + chunk)):

* ``topics`` latent topics. Every item belongs to one topic; every user has a main topic and a
  secondary one.
* Item popularity is Zipf: the item of popularity rank r has weight 1/r^zipf. User activity is
  Zipf too, with exponent zipf/2 (heavy users exist, but less extremely).
* An interaction picks a user by activity, then a topic (the user's main topic with p=0.7, the
  secondary with p=0.2, any topic with p=0.1), then an item of that topic by popularity.
  A model can therefore learn which items a user likes (topic) beyond plain popularity.
* Side features cycle through: user categorical (``user_cat_j``, correlated with the user's
  main topic), item categorical (``item_cat_j``, correlated with the item's topic), item
  multi-hot tags (``item_tags_j``, 1-3 tags, the first drawn from the topic's tag set) and
  item numeric (``item_num_j``, a noisy function of the popularity rank).
* Timestamps increase with the row number (about 10 interactions per second, with jitter), so
  temporal splits are meaningful. There is no rating; every row is a positive.

Chunk c is generated from ``default_rng([seed, c])``, so the data depend on the seed only.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from data_pipeline.sources import CATEGORICAL, NUMERIC, RawFeature, Source
from trec.config import SyntheticConfig
from trec.errors import TrecError

_START_TIME = 1_600_000_000
_SIDE_CARDINALITY = 64
_TAGS = 256


def zipf_weights(count: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """(count,) weights 1/rank^exponent with the ranks randomly permuted over the entities."""
    ranks = rng.permutation(count) + 1
    return 1.0 / ranks.astype(np.float64) ** exponent


class SyntheticSource(Source):
    kind = "synthetic"
    layout = "zipf-topics"

    def __init__(self, cfg: SyntheticConfig, seed: int, chunk_rows: int = 1 << 20) -> None:
        super().__init__()
        for name in ("users", "items", "interactions", "topics"):
            if getattr(cfg, name) < 1:
                raise TrecError(f"synthetic: {name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.zipf < 0 or cfg.side_features < 0:
            raise TrecError("synthetic: zipf and side_features must be >= 0")
        self.cfg = cfg
        self.seed = seed
        self.path = ""
        self.chunk_rows = max(1, min(chunk_rows, 1 << 20))
        topics = min(cfg.topics, cfg.items)
        rng = np.random.default_rng([seed, 1 << 40])
        # Each topic gets items (a permutation modulo topics), so no topic is empty.
        self.item_topic = rng.permutation(cfg.items) % topics
        self.item_weight = zipf_weights(cfg.items, cfg.zipf, rng)
        self.user_main = rng.integers(0, topics, cfg.users)
        self.user_second = rng.integers(0, topics, cfg.users)
        self.user_cdf = np.cumsum(zipf_weights(cfg.users, cfg.zipf / 2, rng))
        self.user_cdf /= self.user_cdf[-1]
        self.topics = topics
        # Items grouped by topic; within topic t the cumulative popularity runs over (t, t + 1].
        self.items_by_topic = np.lexsort((np.arange(cfg.items), self.item_topic))
        weights = self.item_weight[self.items_by_topic]
        topic_of = self.item_topic[self.items_by_topic]
        totals = np.bincount(topic_of, weights=weights, minlength=topics)
        within = np.cumsum(weights) - np.repeat(np.cumsum(totals) - totals, np.bincount(topic_of, minlength=topics))
        self.topic_cdf = topic_of + within / totals[topic_of]
        self.side_rng_seed = [seed, 1 << 41]
        self.features = [RawFeature(*spec) for spec in self._feature_specs()]

    def _feature_specs(self) -> list[tuple]:
        cycle = [("user_cat", "user", CATEGORICAL, False), ("item_cat", "item", CATEGORICAL, False),
                 ("item_tags", "item", CATEGORICAL, True), ("item_num", "item", NUMERIC, False)]
        specs = []
        for j in range(self.cfg.side_features):
            prefix, entity, kind, multi = cycle[j % len(cycle)]
            specs.append((f"{prefix}_{j}", entity, kind, multi))
        return specs

    def describe(self) -> dict:
        info = super().describe()
        info.update({"users": self.cfg.users, "items": self.cfg.items, "interactions": self.cfg.interactions,
                     "side_features": self.cfg.side_features, "zipf": self.cfg.zipf, "topics": self.topics})
        return info

    def interactions(self) -> Iterator[pa.RecordBatch]:
        total = self.cfg.interactions
        for chunk, start in enumerate(range(0, total, self.chunk_rows)):
            yield self._chunk(chunk, start, min(self.chunk_rows, total - start))

    def _chunk(self, chunk: int, start: int, rows: int) -> pa.RecordBatch:
        rng = np.random.default_rng([self.seed, chunk])
        users = np.minimum(_search(self.user_cdf, rng.random(rows), "right"), self.cfg.users - 1)
        choice = rng.random(rows)
        topic = np.where(choice < 0.7, self.user_main[users],
                         np.where(choice < 0.9, self.user_second[users], rng.integers(0, self.topics, rows)))
        position = _search(self.topic_cdf, topic + rng.random(rows), "left")
        items = self.items_by_topic[np.minimum(position, self.cfg.items - 1)]
        times = _START_TIME + (start + np.arange(rows)) // 10 + rng.integers(0, 5, rows)
        return pa.record_batch({"user": users.astype(np.int64), "item": items.astype(np.int64),
                                "timestamp": times.astype(np.int64)})

    def side_table(self, entity: str) -> pa.Table | None:
        rng = np.random.default_rng(self.side_rng_seed + [0 if entity == "user" else 1])
        count = self.cfg.users if entity == "user" else self.cfg.items
        topic = self.user_main if entity == "user" else self.item_topic
        columns: dict[str, pa.Array] = {"id": pa.array(np.arange(count, dtype=np.int64))}
        for j, (name, feat_entity, kind, multi) in enumerate(self._feature_specs()):
            if feat_entity != entity:
                continue
            if kind == NUMERIC:
                rank_signal = np.log1p(self.item_weight * count)
                columns[name] = pa.array(rank_signal + rng.normal(0, 0.5, count))
            elif multi:
                columns[name] = self._tags(topic, j, rng)
            else:
                columns[name] = pa.array(_correlated(topic, j, _SIDE_CARDINALITY, rng))
        if entity == "item":
            columns["title"] = pa.array([f"item {i} (topic {t})" for i, t in enumerate(self.item_topic)])
        return pa.table(columns) if len(columns) > 1 or entity == "item" else None

    def _tags(self, topic: np.ndarray, j: int, rng: np.random.Generator) -> pa.Array:
        count = len(topic)
        lengths = rng.integers(1, 4, count)
        offsets = np.zeros(count + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        tags = rng.integers(0, _TAGS, offsets[-1])
        tags[offsets[:-1]] = _correlated(topic, j, _TAGS, rng)  # the first tag follows the topic
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(tags.astype(np.int64)))


def _search(cdf: np.ndarray, needles: np.ndarray, side: str) -> np.ndarray:
    """np.searchsorted with the needles visited in sorted order: several times faster on large
    tables (sequential instead of random memory access), same result."""
    order = np.argsort(needles)
    out = np.empty(len(needles), np.int64)
    out[order] = np.searchsorted(cdf, needles[order], side=side)
    return out


def _correlated(topic: np.ndarray, j: int, cardinality: int, rng: np.random.Generator) -> np.ndarray:
    """A categorical value equal to a function of the topic with p=0.75, uniform otherwise."""
    signal = (topic * 31 + j * 17) % cardinality
    noise = rng.integers(0, cardinality, len(topic))
    return np.where(rng.random(len(topic)) < 0.75, signal, noise).astype(np.int64)
