"""Lightning data modules: two views + mask for MIM pretraining, one view for tokenizers.

Batches (``docs/architecture.md``):

* :class:`PretrainDataModule` -> ``{"images": [B,3,S,S], "tokenizer_images": [B,3,s,s],
  "mask": [B,gh,gw] bool}`` (BEiT's ``DataAugmentationForBEiT`` + ``MaskingGenerator`` output;
  the views uint8 from ``TwoViewTransform``, normalised on the device by the MIM task, or float
  from ``SyntheticSource``);
* :class:`ImageDataModule` -> ``{"images": [B,3,s,s]}`` plus ``"labels": [B]`` when the source
  gives labels.

Reproducibility. Map-style training data is drawn by :class:`EpochSampler` (a
``DistributedSampler``: shuffled from ``(seed, epoch)``, split across ranks, and left in place by
Lightning under DDP). It yields ``(epoch, index)`` keys, and sample ``index`` of epoch ``e`` gets
its crop, flip and mask from the seed ``(seed, e, index)`` (torch, Python ``random`` and NumPy are
all seeded from it, so timm's transforms are covered too; a transform that declares
``random_sources``, as bitrain's do (``{"torch"}``), gets only those seeded). The data a step
sees is therefore a function of ``(seed, epoch, step)`` alone: the same with 0 or 8 workers, and
the same after a resume as in an uninterrupted run. Validation is fixed: sample ``i`` gets seed
``(seed, i)`` every epoch. Iterable sources (webdataset) seed each worker from the loader's
generator (:func:`seed_worker`).

Bad samples: a map-style source returns ``None`` for a file it cannot decode (and counts it).
The wrapper then takes the next index instead (up to ``MAX_SUBSTITUTES`` tries), so batches keep
their size; anything still ``None`` is dropped by :func:`collate_drop_none`. With deferred
decoding (the source yields :class:`~bitrain.data.decode.EncodedImage` and the transform decodes
the pixels it needs) a file that fails in the transform is counted in the source's ``num_bad``,
warned about and replaced the same way.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    get_worker_info,
)
from torch.utils.data._utils.collate import default_collate

from bitrain.data.decode import BadImageError, warn_bad_once

__all__ = [
    "ClassificationDataModule",
    "EpochSampler",
    "ImageDataModule",
    "PretrainDataModule",
    "collate_drop_none",
    "default_num_workers",
    "seed_worker",
]

log = logging.getLogger(__name__)

MAX_SUBSTITUTES = 16
# Global RNGs a per-sample seed covers unless the transform declares fewer (``random_sources``).
ALL_RANDOM_SOURCES = frozenset({"torch", "random", "numpy"})
_SEED_MASK = (1 << 63) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: well mixed, platform independent)."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values])
    return int(state.generate_state(1, dtype=np.uint64)[0]) & _SEED_MASK


def collate_drop_none(samples: list[Any]) -> Any:
    """``default_collate`` after dropping ``None`` (bad) samples; an all-bad batch is an error."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise RuntimeError(
            f"every sample of a batch of {len(samples)} failed to decode: check the source's "
            "warnings (bad files are logged by name) and its num_bad counter"
        )
    return default_collate(kept)


def default_num_workers(devices_per_node: int | None = None) -> int:
    """Loader workers per device when ``num_workers`` is unset.

    The CPUs this process may use, shared among the node's devices, less one for the training
    process itself (Lightning's ``suggested_max_num_workers``; at least 1). Under SLURM with
    ``--cpus-per-task`` (one task per device, its own CPUs in its affinity mask) the CPUs are
    already this device's and are not divided again.

    Args:
        devices_per_node: Training processes on this machine; ``None``: the visible CUDA devices
            (1 without CUDA).
    """
    from lightning.fabric.utilities.data import suggested_max_num_workers

    if devices_per_node is None:
        devices_per_node = torch.cuda.device_count() if torch.cuda.is_available() else 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if hasattr(os, "sched_getaffinity") and per_task and per_task.isdigit():
        if int(per_task) == len(os.sched_getaffinity(0)):
            devices_per_node = 1  # this task's CPUs only
    return suggested_max_num_workers(max(1, int(devices_per_node)))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed the worker's mask generator, numpy and ``random``.

    Workers also ignore Ctrl-C (SIGINT reaches the whole process group): the main process stops
    at the end of its step, writes a checkpoint and then shuts the workers down itself
    (``bitrain.callbacks.preemption.PreemptionCheckpoint``); a worker that died on the signal
    would fail the next fetch first.
    """
    info = get_worker_info()
    if info is not None:  # in a worker process
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = info.seed if info is not None else torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    dataset = info.dataset if info is not None else None
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)


def _source_name(source: Any) -> str:
    return repr(source) if len(repr(source)) < 200 else type(source).__name__


class _Samples:
    """What the map-style and iterable wrappers share: per-sample processing + a seeded RNG."""

    def __init__(self, source: Any, process: Callable[[Any, torch.Generator], Any]) -> None:
        self.source = source
        self.process = process  # (raw sample, generator) -> processed sample dict
        self.seed = 0
        self.per_sample_seed: int | None = None  # validation: seed (per_sample_seed, index)
        self._generator: torch.Generator | None = None

    def reseed(self, seed: int) -> None:
        """Reset the generator used for masks (called per worker and per loader)."""
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(_mix(self.seed, 0x5EED))

    def generator(self) -> torch.Generator:
        if self._generator is None:
            self.reseed(self.seed)
        return self._generator  # type: ignore[return-value]

    def count_bad(self, err: BadImageError) -> None:
        """A sample that failed in the transform (deferred decoding): count it and warn once."""
        counter = getattr(self.source, "num_bad_counter", None)
        if counter is not None:
            counter.increment()
        warn_bad_once(str(err).split(":", 1)[0], str(err))

    def apply(self, raw: Any, key: tuple[int, ...] | None) -> Any:
        if self.per_sample_seed is None or key is None:
            return self.process(raw, self.generator())
        seed = _mix(self.per_sample_seed, *key)
        # Every RNG a transform may draw from: torch's CPU generator (torchvision), Python's
        # random (timm's RandomResizedCrop, RandAugment, random erasing) and NumPy; restored
        # afterwards. Only the CPU generator: torch.manual_seed would also reseed (and, on a GPU
        # run, change) the CUDA generators, which fork_rng(devices=[]) does not restore, and
        # costs ~15% of the demo's pretraining time queueing lazy CUDA/XPU/MTIA seeds (py-spy).
        # A transform that declares ``random_sources`` (bitrain's own: {"torch"}) gets only those
        # seeded: saving and reseeding random and NumPy cost ~0.2 ms a sample (bench_data).
        sources = getattr(self.process, "random_sources", ALL_RANDOM_SOURCES)
        py_state = random.getstate() if "random" in sources else None
        np_state = np.random.get_state() if "numpy" in sources else None
        if py_state is not None:
            random.seed(seed)
        if np_state is not None:
            np.random.seed(seed % 2**32)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                return self.process(raw, torch.Generator().manual_seed(seed))
        finally:
            if py_state is not None:
                random.setstate(py_state)
            if np_state is not None:
                np.random.set_state(np_state)


class _MapDataset(_Samples, Dataset):
    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        # EpochSampler yields (epoch, index); a plain sampler yields index.
        epoch, index = key if isinstance(key, tuple) else (None, key)
        seed_key = (index,) if epoch is None else (epoch, index)
        n = len(self.source)
        for k in range(MAX_SUBSTITUTES):
            raw = self.source[(index + k) % n]
            if raw is None:
                continue
            try:
                return self.apply(raw, seed_key)
            except BadImageError as err:
                self.count_bad(err)
        return None


class _IterDataset(_Samples, IterableDataset):
    def __iter__(self) -> Iterator[Any]:
        for raw in self.source:
            if raw is None:
                continue
            try:
                yield self.apply(raw, None)
            except BadImageError as err:
                self.count_bad(err)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(epoch, index)``, so samples can seed from the epoch.

    Lightning calls :meth:`set_epoch` every epoch and, since this is a ``DistributedSampler``,
    keeps it under DDP instead of wrapping it. With ``drop_last`` the tail that does not split
    evenly over ranks is dropped, otherwise padded by repetition (as ``DistributedSampler``).

    Mid-epoch resume: :meth:`skip_once` makes the next pass over epoch ``e`` start after the
    samples this rank already trained on, so a resumed run sees exactly the rest of the epoch.
    """

    _skip: tuple[int, int] | None = None

    def skip_once(self, epoch: int, num_samples: int) -> None:
        """Leave out the first ``num_samples`` of this rank's order in epoch ``epoch``, once."""
        self._skip = (int(epoch), max(0, int(num_samples)))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.epoch)
        start = 0
        if self._skip is not None and self._skip[0] == epoch:
            start, self._skip = self._skip[1], None
        indices = list(super().__iter__())[start:]
        return ((epoch, int(i)) for i in indices)

    # __len__ stays the full epoch: Lightning counts a resumed epoch's batches from where it was.


def _split_label(raw: Any) -> tuple[Any, Any]:
    """A source yields an image or ``(image, label)``; return ``(image, label or None)``."""
    if isinstance(raw, tuple) and len(raw) == 2:
        return raw[0], raw[1]
    return raw, None


def _random_sources(transform: Callable | None) -> frozenset[str]:
    """Global RNGs a transform draws from (its ``random_sources``; unknown: all of them)."""
    if transform is None:
        return frozenset({"torch"})
    return frozenset(getattr(transform, "random_sources", ALL_RANDOM_SOURCES))


class _TwoViewSample:
    """Raw sample -> ``{"images", "tokenizer_images", "mask"}`` (picklable for workers)."""

    def __init__(self, transform: Callable | None, mask_generator: Callable) -> None:
        self.transform, self.mask_generator = transform, mask_generator
        # The mask generator draws from the generator it is handed, not from a global RNG.
        self.random_sources = _random_sources(transform)

    def __call__(self, raw: Any, generator: torch.Generator) -> dict[str, Any]:
        if isinstance(raw, dict):  # SyntheticSource: already transformed
            sample = {"images": raw["images"], "tokenizer_images": raw["tokenizer_images"]}
        else:
            image, _ = _split_label(raw)
            if self.transform is None:
                raise ValueError("PretrainDataModule got images but has no transform to apply")
            images, tokenizer_images = self.transform(image)
            sample = {"images": images, "tokenizer_images": tokenizer_images}
        sample["mask"] = self.mask_generator(generator=generator)
        return sample


class _SingleViewSample:
    """Raw sample -> ``{"images"}`` (+ ``"labels"``) (picklable for workers)."""

    def __init__(self, transform: Callable | None) -> None:
        self.transform = transform
        self.random_sources = _random_sources(transform)

    def __call__(self, raw: Any, generator: torch.Generator) -> dict[str, Any]:
        if isinstance(raw, dict):  # SyntheticSource: already transformed
            return {k: raw[k] for k in ("images", "labels") if k in raw}
        image, label = _split_label(raw)
        if self.transform is None:
            raise ValueError("ImageDataModule got images but has no transform to apply")
        sample = {"images": self.transform(image)}
        if label is not None:
            sample["labels"] = torch.as_tensor(label, dtype=torch.long)
        return sample


class _BaseDataModule(L.LightningDataModule):
    """Loader construction shared by both data modules."""

    def __init__(
        self,
        source: Any,
        transform: Callable | None,
        batch_size: int = 64,
        num_workers: int | None = 2,
        val_source: Any | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__()
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_workers is not None and int(num_workers) < 0:
            raise ValueError(
                f"num_workers must be >= 0, or null for one per CPU of the device, got "
                f"{num_workers!r}"
            )
        if int(prefetch_factor) < 1:
            raise ValueError(
                f"prefetch_factor (batches per worker) must be >= 1, got {prefetch_factor!r}"
            )
        self.source, self.val_source, self.transform = source, val_source, transform
        self.batch_size = int(batch_size)
        self.num_workers = None if num_workers is None else int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.pin_memory, self.persistent_workers = bool(pin_memory), bool(persistent_workers)
        self.drop_last, self.shuffle, self.seed = bool(drop_last), bool(shuffle), int(seed)

    def _process(self) -> Callable[[Any, torch.Generator], dict[str, Any]]:
        """The picklable per-sample function: ``(raw sample, generator) -> sample dict``."""
        raise NotImplementedError

    def _process_for(self, train: bool) -> Callable[[Any, torch.Generator], dict[str, Any]]:
        """The per-sample function of the training (or validation) loader; the same by default."""
        return self._process()

    @property
    def num_bad_samples(self) -> int:
        """Bad samples skipped so far by the train and validation sources (all workers)."""
        return sum(int(getattr(s, "num_bad", 0) or 0) for s in (self.source, self.val_source))

    def _rank_and_epoch(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        return int(trainer.global_rank), int(trainer.current_epoch)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, source: Any, train: bool) -> DataLoader:
        iterable = isinstance(source, IterableDataset)
        if not iterable:
            if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
                raise TypeError(
                    f"{type(source).__name__} is neither a map-style dataset (__len__ + "
                    "__getitem__) nor an IterableDataset; see bitrain.data.sources"
                )
            if len(source) == 0:
                raise ValueError(
                    f"data source {_source_name(source)} is empty: it has no samples. Check "
                    "its path/pattern and split (docs/data.md)"
                )
        dataset = (_IterDataset if iterable else _MapDataset)(source, self._process_for(train))
        # (seed, rank, epoch at creation): ranks differ, and a resumed run does not replay epoch 0.
        rank, epoch = self._rank_and_epoch()
        generator = torch.Generator().manual_seed(_mix(self.seed, rank, epoch, int(train)))
        sampler = None
        if train:
            dataset.reseed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            if not iterable:
                dataset.per_sample_seed = _mix(self.seed, 0x7EA1)
                world, rank = self._world()
                sampler = EpochSampler(
                    dataset, num_replicas=world, rank=rank, shuffle=self.shuffle,
                    seed=self.seed, drop_last=self.drop_last,
                )  # fmt: skip
                if self._resume_position is not None:
                    epoch_done, batches_done = self._resume_position
                    sampler.skip_once(epoch_done, batches_done * self.batch_size)
                    self._resume_position = None
            elif self._resume_position is not None:
                log.warning(
                    "resuming mid-epoch with an iterable source (%s): the epoch restarts from its "
                    "beginning, so samples already seen in it are seen again",
                    _source_name(source),
                )
                self._resume_position = None
        else:
            dataset.per_sample_seed = _mix(self.seed, 0xE7A1)
        workers = self.workers()
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_drop_none,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=self.drop_last if train else False,
            persistent_workers=self.persistent_workers and workers > 0,
            worker_init_fn=seed_worker,
            generator=generator,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    def workers(self) -> int:
        """``num_workers``, or when unset :func:`default_num_workers` for the trainer's devices."""
        if self.num_workers is not None:
            return self.num_workers
        trainer = getattr(self, "trainer", None)
        devices = int(trainer.num_devices) if trainer is not None else None
        workers = default_num_workers(devices)
        log.info(
            "data.num_workers unset: %d loader workers per device (CPUs / devices - 1)", workers
        )
        return workers

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.source, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []
        return self._loader(self.val_source, train=False)

    _resume_position: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: bad samples skipped so far, and the position in the epoch.

        ``epoch`` and ``batches_done`` (training batches of that epoch already trained on, this
        rank) let :meth:`load_state_dict` resume in the middle of an epoch without seeing the
        consumed samples again.
        """
        state: dict[str, Any] = {"num_bad_samples": self.num_bad_samples}
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            progress = trainer.fit_loop.epoch_loop.batch_progress.current
            state.update(epoch=int(trainer.current_epoch), batches_done=int(progress.processed))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the epoch position (see :meth:`state_dict`) for the next training loader."""
        if "epoch" in state and int(state.get("batches_done", 0)) > 0:
            self._resume_position = (int(state["epoch"]), int(state["batches_done"]))

    def teardown(self, stage: str) -> None:
        if self.num_bad_samples:
            log.warning("%s: %d bad samples were skipped", stage, self.num_bad_samples)


class PretrainDataModule(_BaseDataModule):
    """MIM pretraining batches: two views of one crop and a blockwise mask per image.

    Args:
        source: Training source: RGB ``PIL.Image`` (or ``(image, label)``, label ignored), or
            ready sample dicts (``SyntheticSource``) for which the transform is skipped.
        transform: ``TwoViewTransform``: image -> ``(images, tokenizer_images)``.
        mask_generator: ``BlockwiseMaskGenerator``: ``(generator) -> BoolTensor [gh, gw]``.
        batch_size: Samples per batch per device.
        num_workers: DataLoader worker processes per device (0: load in the main process;
            ``None``: the CPUs available per device less one, :func:`default_num_workers`).
        val_source: Optional validation source (fixed crops and masks every epoch).
        pin_memory: Pin host memory (only when CUDA is available).
        persistent_workers: Keep workers alive between epochs (only when num_workers > 0).
        drop_last: Drop the last incomplete training batch (static shapes).
        shuffle: Shuffle map-style training sources (seeded).
        seed: Base seed of shuffling, crops and masks.
        prefetch_factor: Batches each worker prepares ahead (DataLoader's ``prefetch_factor``).
    """

    def __init__(
        self,
        source: Any,
        transform: Callable | None,
        mask_generator: Callable[..., torch.Tensor],
        batch_size: int = 64,
        num_workers: int | None = 2,
        val_source: Any | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__(
            source, transform, batch_size, num_workers, val_source, pin_memory,
            persistent_workers, drop_last, shuffle, seed, prefetch_factor,
        )  # fmt: skip
        if mask_generator is None:
            raise ValueError(
                "PretrainDataModule needs a mask_generator (the runner builds it from the "
                "'masking' config group)"
            )
        self.mask_generator = mask_generator
        if getattr(transform, "decodes_encoded_images", False):
            # The transform decodes only the pixels its crop needs (docs/data.md, "Fast two views").
            for src in (source, val_source):
                if hasattr(src, "deferred_decode"):
                    src.deferred_decode = True

    def _process(self) -> Callable[[Any, torch.Generator], dict[str, Any]]:
        return _TwoViewSample(self.transform, self.mask_generator)


class ImageDataModule(_BaseDataModule):
    """Single-view batches ``{"images": [B,3,s,s]}`` (+ ``"labels"``) for tokenizers / fine-tuning.

    Args: as :class:`PretrainDataModule`, without the mask generator; ``transform`` maps an
    image to one tensor (``SingleViewTransform``).
    """

    def _process(self) -> Callable[[Any, torch.Generator], dict[str, Any]]:
        return _SingleViewSample(self.transform)


class ClassificationDataModule(_BaseDataModule):
    """Labelled batches ``{"images": [B,3,s,s], "labels": [B]}`` for fine-tuning and evaluation.

    Args:
        source: Training source of ``(image, label)`` (image folder with class folders,
            webdataset shards with ``.cls``, the demo set), or ready sample dicts.
        transform: Training transform, image -> tensor (timm's ``create_transform``).
        val_transform: Evaluation transform (resize + centre crop); default: ``transform``.
        num_classes: Classes of the task; must match the source's ``label_names`` when it has them.
        root: The dataset folder the sources' paths are built from in the config (kept for
            reference; the sources read the data).
        Others: as :class:`PretrainDataModule`.

    Raises:
        ValueError: ``num_classes`` differs from the number of the source's classes.
    """

    def __init__(
        self,
        source: Any,
        transform: Callable | None,
        val_transform: Callable | None = None,
        num_classes: int | None = None,
        root: str | None = None,
        batch_size: int = 64,
        num_workers: int | None = 2,
        val_source: Any | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__(
            source, transform, batch_size, num_workers, val_source, pin_memory,
            persistent_workers, drop_last, shuffle, seed, prefetch_factor,
        )  # fmt: skip
        self.root = root
        self.val_transform = val_transform if val_transform is not None else transform
        names = self.label_names
        if num_classes is not None and names is not None and len(names) != int(num_classes):
            raise ValueError(
                f"data.num_classes={num_classes} but the training source has {len(names)} "
                f"classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); set "
                "data.num_classes (and model.num_classes) to match the data"
            )
        self.num_classes = (
            int(num_classes)
            if num_classes is not None
            else (len(names) if names is not None else None)
        )

    @property
    def label_names(self) -> list[str] | None:
        """Class names in label order, from the training source (None when it has none)."""
        names = getattr(self.source, "label_names", None)
        return [str(n) for n in names] if names is not None else None

    def _process(self) -> Callable[[Any, torch.Generator], dict[str, Any]]:
        return _SingleViewSample(self.transform)

    def _process_for(self, train: bool) -> Callable[[Any, torch.Generator], dict[str, Any]]:
        return _SingleViewSample(self.transform if train else self.val_transform)
