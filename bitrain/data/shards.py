"""WebDataset ``.tar`` shards as an iterable source of RGB ``PIL.Image`` s.

A shard is a plain tar file in which the files of one sample share a basename
(``n01440764_10026.jpg`` + ``n01440764_10026.cls``), the format of
https://github.com/webdataset/webdataset. The pipeline is built from webdataset's own stages:

1. the shard list (local paths, brace patterns such as ``shards/train-{000000..000009}.tar``, or
   ``::``-joined lists) is shuffled ONCE with ``seed`` (the same order on every rank and worker);
2. split across ranks (``wds.split_by_node``) then DataLoader workers (``wds.split_by_worker``):
   each shard is read by exactly one worker of one rank; the assignment is fixed for the run;
3. every epoch a worker reads its shards in an order drawn from its torch seed and mixes samples
   through a ``shuffle``-sized buffer (``wds.shuffle``);
4. samples are decoded like every source (``bitrain.data.decode``); bad samples and unreadable
   shards are logged by name, counted in ``num_bad`` and skipped.

How to make shards: ``scripts/make_shards.py`` (docs/data.md).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from bitrain.data.decode import (
    BadImageError,
    EncodedImage,
    SharedCounter,
    decode_image,
    warn_bad_once,
)

__all__ = ["WebDatasetSource", "expand_shard_urls"]

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "hf://", "ais://")


def expand_shard_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand brace patterns and ``::`` lists into the list of shard URLs/paths."""
    from webdataset.shardlists import expand_urls

    if isinstance(urls, str):
        items = [urls]
    else:
        items = [str(u) for u in urls]
    expanded: list[str] = []
    for item in items:
        expanded.extend(expand_urls(item))
    return expanded


def _class_names(classes: str | Sequence[str] | None, local: list[str]) -> list[str] | None:
    if classes is None:
        if not local:
            return None
        path = os.path.join(os.path.dirname(local[0].removeprefix("file:")), "classes.txt")
        if not os.path.isfile(path):
            return None
        classes = path
    if isinstance(classes, str):
        if not os.path.isfile(classes):
            raise FileNotFoundError(f"WebDatasetSource: class list '{classes}' does not exist")
        with open(classes) as f:
            return [line.strip() for line in f if line.strip()]
    return [str(c) for c in classes]


class WebDatasetSource(IterableDataset):
    """Images (optionally with labels) streamed from WebDataset tar shards.

    Args:
        urls: A path/URL, a brace pattern, a ``::``-joined list, or a list of any of these.
        shuffle: Sample shuffle buffer size per worker (0 disables; shards are then read in
            order too, which makes the stream fully deterministic).
        with_labels: Yield ``(image, int(label))`` read from ``label_key``.
        image_keys: Extensions tried, in order, for the image of a sample.
        label_key: Extension holding the class index as text (webdataset's ``.cls``).
        seed: Seed of the shard order shared by all ranks and workers.
        classes: Class names in index order: a list, or the path of a text file with one name
            per line; ``None``: ``classes.txt`` next to the (local) shards if there is one
            (``scripts/make_shards.py`` writes it). Exposed as ``label_names``.
        samples_per_epoch: Make every epoch exactly this many samples over all ranks and workers
            (each worker yields ``samples_per_epoch // (world_size x workers)``, cycling over its
            shards as needed), so ranks with fewer or smaller shards cannot end an epoch early
            and leave the others waiting in a collective. ``None``: one pass over the shards.

    Raises:
        FileNotFoundError: a local shard does not exist (the message lists the missing ones).
        ValueError: the pattern expands to no shard.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        shuffle: int = 1000,
        with_labels: bool = False,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        label_key: str = "cls",
        seed: int = 0,
        samples_per_epoch: int | None = None,
        classes: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.urls = expand_shard_urls(urls)
        if not self.urls:
            raise ValueError(f"WebDatasetSource: the pattern {urls!r} expands to no shard")
        local = [u for u in self.urls if not u.startswith(REMOTE_PREFIXES)]
        missing = [u for u in local if not os.path.isfile(u.removeprefix("file:"))]
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise FileNotFoundError(
                f"WebDatasetSource: {len(missing)} of {len(self.urls)} shard file(s) not found: "
                f"{shown}. Check data.source.urls (brace pattern and directory); make shards "
                "as docs/data.md describes"
            )
        if int(shuffle) < 0:
            raise ValueError(f"shuffle is a buffer size >= 0, got {shuffle}")
        self.shuffle = int(shuffle)
        self.with_labels = bool(with_labels)
        self.image_keys = tuple(str(k).lower().lstrip(".") for k in image_keys)
        if not self.image_keys:
            raise ValueError("image_keys is empty: give at least one extension, e.g. ['jpg']")
        self.label_key = str(label_key).lstrip(".")
        self.seed = int(seed)
        if samples_per_epoch is not None and int(samples_per_epoch) < 1:
            raise ValueError(f"samples_per_epoch must be >= 1 or None, got {samples_per_epoch}")
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        self.num_bad_counter = SharedCounter()
        self.label_names = _class_names(classes, local)
        # Yield EncodedImage (decoded later by the transform); PretrainDataModule turns it on.
        self.deferred_decode = False

    @property
    def num_bad(self) -> int:
        """Bad samples and unreadable shards skipped so far, counted across workers."""
        return self.num_bad_counter.value

    def _handler(self, exn: Exception) -> bool:
        """Error handler for webdataset: warn, count and continue with the next sample/shard."""
        self.num_bad_counter.increment()
        warn_bad_once(repr(exn)[:300], "unreadable shard or sample (skipped)")
        return True

    def _shards_for_this_worker(self) -> list[str]:
        from webdataset.shardlists import split_by_node, split_by_worker

        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed).shuffle(urls)
        mine = list(split_by_worker(split_by_node(urls)))
        if self.shuffle:  # a new order each epoch: the worker's torch seed changes per epoch
            random.Random(torch.initial_seed()).shuffle(mine)
        return mine

    def _decode(self, sample: dict[str, Any]) -> Image.Image | tuple[Image.Image, int] | None:
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        key = next((k for k in self.image_keys if k in sample), None)
        try:
            if key is None:
                raise BadImageError(f"{name}: no image among keys {sorted(sample)}")
            if self.deferred_decode:
                image = EncodedImage(sample[key], name=name)
            else:
                image = decode_image(sample[key], name=name)
            if not self.with_labels:
                return image
            if self.label_key not in sample:
                raise BadImageError(f"{name}: no label '.{self.label_key}' in the sample")
            raw = sample[self.label_key]
            text = raw.decode() if isinstance(raw, (bytes, bytearray)) else str(raw)
            try:
                label = int(text.strip())
            except ValueError:
                raise BadImageError(f"{name}: label {text!r} is not an integer") from None
            return image, label
        except BadImageError as err:
            self.num_bad_counter.increment()
            warn_bad_once(name, str(err))
            return None

    def _one_pass(self, shards: list[str], cycle: int) -> Iterator[Any]:
        from webdataset.filters import _shuffle
        from webdataset.tariterators import tarfile_samples

        if self.shuffle and cycle:
            shards = list(shards)
            random.Random(torch.initial_seed() + cycle).shuffle(shards)
        samples: Iterator[dict[str, Any]] = tarfile_samples(
            ({"url": url} for url in shards), handler=self._handler
        )
        if self.shuffle:
            rng = random.Random((torch.initial_seed() ^ 0x5A5A) + cycle)
            samples = _shuffle(iter(samples), self.shuffle, min(100, self.shuffle), rng=rng)
        for sample in samples:
            yield self._decode(sample)

    def _quota(self) -> int | None:
        """Samples this worker yields per epoch (``samples_per_epoch`` split evenly), or None."""
        if self.samples_per_epoch is None:
            return None
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        return max(1, self.samples_per_epoch // (world * workers))

    def __iter__(self) -> Iterator[Image.Image | tuple[Image.Image, int] | None]:
        shards = self._shards_for_this_worker()
        quota = self._quota()
        if quota is None:
            yield from self._one_pass(shards, 0)
            return
        if not shards:
            raise ValueError(
                f"WebDatasetSource: this rank/worker got no shard of {len(self.urls)}: use at "
                "least (devices x nodes x data.num_workers) shards"
            )
        produced, cycle = 0, 0
        while produced < quota:
            good = 0
            for item in self._one_pass(shards, cycle):
                yield item
                if item is not None:
                    good += 1
                    produced += 1
                    if produced >= quota:
                        return
            if good == 0:
                raise RuntimeError(f"WebDatasetSource: no readable sample in shards {shards[:3]}")
            cycle += 1

    def __repr__(self) -> str:
        return (
            f"WebDatasetSource(shards={len(self.urls)}, shuffle={self.shuffle}, "
            f"with_labels={self.with_labels})"
        )
