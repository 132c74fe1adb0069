"""Environment doctor: ``python -m bitrain.doctor [hydra overrides, e.g. +experiment=beit_base]``.

Composes ``configs/pretrain.yaml`` with the given overrides (Hydra's compose API, so nothing is
built and no run directory is made) and checks, before a long job is queued, what would otherwise
fail minutes or hours into it:

* torch version, CUDA and the GPUs (name, memory), bf16 support;
* the trainer's devices x num_nodes -> the expected world size (and GPUs present if asked for);
* the tokenizer weights file (``tokenizer.weights_path``) exists and is readable;
* data: an image folder's ``data.source.root`` exists and holds images (counted), a WebDataset's
  ``data.source.urls`` expand to shard files that exist (counted); demo / synthetic need nothing;
* the output dir (``paths.log_dir``) is writable, and its free disk space (``paths.min_free_gb``);
* the run directory (``paths.run_name`` / SLURM job): a fresh start over an earlier run there
  would be refused (:mod:`bitrain.training.rundir`);
* per-device and global batch (batch x devices x num_nodes x accumulate_grad_batches), derived
  from ``data.global_batch_size`` when set (:func:`bitrain.training.devices.apply_global_batch`);
* the data loader can feed the device: the configured transform and mask generator are timed on
  up to 32 of the source's images on one core, and ``workers x images/s per worker`` is compared
  with the images/s a device consumes (``+doctor.img_s_per_device=N``; default 2,500 on a GPU run,
  BEiT-base's per-H100 goal, docs/data.md); too slow is a warning, not a failure;
* uint8 pretraining views (``TwoViewTransform``'s default) have a ``task.normalization`` to be
  normalised with on the device (its absence fails; one other than the transform's mean/std warns).

Exit code 0 when every check passes (warnings included), 1 with the list of problems otherwise.
See docs/monitoring.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import bitrain
from bitrain.data.datamodule import default_num_workers
from bitrain.data.decode import BadImageError, EncodedImage, decode_image
from bitrain.data.shards import REMOTE_PREFIXES, expand_shard_urls
from bitrain.data.sources import IMAGE_EXTENSIONS
from bitrain.training.devices import apply_global_batch
from bitrain.training.resolvers import register_resolvers
from bitrain.training.rundir import earlier_run_files, run_dir_name

log = logging.getLogger("bitrain.doctor")

CONFIG_DIR = Path(bitrain.__file__).resolve().parents[1] / "configs"
# hydra:runtime does not exist under the compose API: give the run dir a concrete place.
OUTPUT_DIR_OVERRIDE = "paths.output_dir=${paths.log_dir}/doctor"


@dataclass
class Check:
    """One line of the doctor's list: ``ok`` False marks a problem that will stop the run."""

    name: str
    ok: bool
    detail: str
    warn: bool = False  # passes, but worth a look (printed as "warn")


def compose_config(overrides: list[str], config_name: str = "pretrain") -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides (user overrides win)."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=[OUTPUT_DIR_OVERRIDE, *overrides])


def _get(cfg: DictConfig, key: str, default=None):
    """``cfg.<key>`` (dotted), or ``default`` when absent or ``???``."""
    try:
        value = OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
    except Exception:  # MissingMandatoryValue or a failed interpolation
        return default
    return value


def check_torch() -> list[Check]:
    """The torch version, CUDA devices with memory, bf16 support (information, never a problem)."""
    import torch

    checks = [Check("torch", True, f"{torch.__version__}")]
    if torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(f"cuda:{i} {props.name} {props.total_memory / 2**30:.1f} GiB")
        checks.append(Check("cuda", True, f"{len(gpus)} GPU(s): " + "; ".join(gpus)))
        checks.append(Check("bf16", True, f"supported: {torch.cuda.is_bf16_supported()}"))
    else:
        checks.append(Check("cuda", True, "not available (CPU only)"))
        checks.append(Check("bf16", True, "CPU autocast only (no CUDA)"))
    return checks


def _devices_count(devices, accelerator: str) -> int | None:
    """Number of devices per node the trainer will use, or None if it cannot tell."""
    import torch

    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    if devices in ("auto", -1, "-1"):
        if accelerator in ("cpu",):
            return 1
        return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1
    return None


def check_trainer(cfg: DictConfig) -> tuple[list[Check], int]:
    """World size from devices x num_nodes; GPUs present when the accelerator asks for them."""
    import torch

    accelerator = str(_get(cfg, "trainer.accelerator", "auto"))
    devices = _get(cfg, "trainer.devices", "auto")
    num_nodes = int(_get(cfg, "trainer.num_nodes", 1) or 1)
    count = _devices_count(devices, accelerator)
    checks = []
    if count is None:
        checks.append(Check("devices", False, f"trainer.devices={devices!r} is not understood"))
        count = 1
    world = count * num_nodes
    checks.append(
        Check(
            "world size",
            True,
            f"{world} = {count} device(s) x {num_nodes} node(s) "
            f"(accelerator={accelerator}, precision={_get(cfg, 'trainer.precision', '?')})",
        )
    )
    if accelerator in ("gpu", "cuda"):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < count:
            checks.append(
                Check(
                    "gpus",
                    False,
                    f"trainer.accelerator={accelerator} with {count} device(s) per node, but "
                    f"{have} CUDA device(s) are visible here (trainer=cpu, or run on a GPU node)",
                )
            )
    return checks, world


def check_tokenizer(cfg: DictConfig) -> list[Check]:
    """The tokenizer weights file (and DALL-E's optional decoder file) exist and can be read."""
    path = _get(cfg, "tokenizer.weights_path")
    if path is None:
        return [Check("tokenizer", True, "no weights_path in the tokenizer config")]
    checks = [_check_file("tokenizer", "weights_path", path)]
    decoder = _get(cfg, "tokenizer.decoder_path")
    if decoder is not None:
        checks.append(_check_file("tokenizer decoder", "decoder_path", decoder))
    return checks


def _check_file(name: str, key: str, path: Any) -> Check:
    path = Path(str(path)).expanduser()
    if not path.is_file():
        return Check(
            name,
            False,
            f"{key.split('_')[0]} file '{path}' not found (set paths.tokenizers_dir or "
            f"tokenizer.{key}; how to get or train one: docs/tokenizers.md)",
        )
    try:
        with open(path, "rb") as f:
            f.read(64)
    except OSError as err:
        return Check(name, False, f"{key.split('_')[0]} file '{path}' is not readable: {err}")
    return Check(name, True, f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")


def _count_images(root: Path) -> int:

    count = 0
    for _, _, files in os.walk(root, followlinks=True):
        count += sum(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for name in files)
    return count


def _check_source(cfg: DictConfig, key: str) -> list[Check]:
    """One data source (``data.source`` or ``data.val_source``)."""
    if _get(cfg, key) is None:
        return []
    target = str(_get(cfg, f"{key}._target_", ""))
    kind = target.rsplit(".", 1)[-1]
    if kind == "ImageFolderSource":
        root = _get(cfg, f"{key}.root")
        if root is None:
            return [Check(key, False, f"{key}.root is not set: {key}.root=/path/to/images")]
        root = Path(str(root)).expanduser()
        if not root.is_dir():
            return [Check(key, False, f"image folder '{root}' does not exist ({key}.root)")]
        n = _count_images(root)
        if n == 0:
            return [Check(key, False, f"no image files under '{root}' ({key}.root)")]
        return [Check(key, True, f"{n} images under {root}")]
    if kind == "WebDatasetSource":
        urls = _get(cfg, f"{key}.urls")
        if urls is None:
            return [Check(key, False, f"{key}.urls is not set: {key}.urls='/data/s-{{0..9}}.tar'")]
        urls = OmegaConf.to_object(urls) if OmegaConf.is_config(urls) else urls
        try:
            shards = expand_shard_urls(urls)
        except Exception as err:  # a malformed brace pattern
            return [Check(key, False, f"{key}.urls={urls!r} cannot be expanded: {err}")]
        remote = [u for u in shards if u.startswith(REMOTE_PREFIXES)]
        local = [u for u in shards if not u.startswith(REMOTE_PREFIXES)]
        missing = [u for u in local if not Path(u).is_file()]
        if not shards or missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            return [
                Check(
                    key,
                    False,
                    f"{len(missing)} of {len(shards)} shard file(s) missing ({key}.urls): {shown}"
                    if shards
                    else f"{key}.urls={urls!r} expands to no shard",
                )
            ]
        extra = f", {len(remote)} remote (not checked)" if remote else ""
        return [Check(key, True, f"{len(local)} shard file(s) found{extra}")]
    return [Check(key, True, f"{kind or 'source'}: nothing to check on disk")]


def check_data(cfg: DictConfig) -> list[Check]:
    """Training and validation sources."""
    return _check_source(cfg, "data.source") + _check_source(cfg, "data.val_source")


def check_output(cfg: DictConfig) -> list[Check]:
    """``paths.log_dir`` (or its nearest existing parent) is writable; free disk space."""
    log_dir = Path(str(_get(cfg, "paths.log_dir", "outputs"))).expanduser()
    existing = log_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == log_dir else f" (its existing parent '{existing}')"
        return [
            Check(
                "output dir",
                False,
                f"'{log_dir}'{where} is not writable: set paths.root_dir or paths.log_dir to a "
                "directory you can write",
            )
        ]
    free_gb = shutil.disk_usage(existing).free / 2**30
    min_free = float(_get(cfg, "paths.min_free_gb", 0.0) or 0.0)
    ok = free_gb >= min_free
    need = f", need paths.min_free_gb={min_free}" if min_free else ""
    return [Check("output dir", ok, f"{log_dir} writable, {free_gb:.1f} GiB free{need}")]


def check_run_dir(cfg: DictConfig) -> list[Check]:
    """A fresh start in a named run directory that holds an earlier run would be refused."""
    try:
        name = run_dir_name(_get(cfg, "paths.run_name"))
    except ValueError as err:
        return [Check("run dir", False, str(err))]
    log_dir = Path(str(_get(cfg, "paths.log_dir", "outputs"))).expanduser()
    run_dir = log_dir / str(_get(cfg, "task_name", "pretrain")) / name
    found = earlier_run_files(run_dir, run_dir / "checkpoints")
    ckpt_path = _get(cfg, "ckpt_path")
    if not found:
        return [Check("run dir", True, f"{run_dir} (a new run)")]
    shown = ", ".join(str(p.relative_to(run_dir)) for p in found[:3])
    if ckpt_path in (None, ""):
        return [
            Check(
                "run dir",
                False,
                f"{run_dir} already holds a run ({shown}): a fresh start there is refused; add "
                "ckpt_path=auto to continue it, or give another paths.run_name",
            )
        ]
    return [Check("run dir", True, f"{run_dir} holds a run ({shown}); ckpt_path={ckpt_path}")]


def check_batch(cfg: DictConfig, world_size: int) -> list[Check]:
    """Per-device and global batch size (derived from ``data.global_batch_size`` when set)."""
    if _get(cfg, "data.global_batch_size") is not None:
        cfg = cfg.copy()
        try:
            apply_global_batch(cfg)
        except ValueError as err:
            return [Check("batch", False, str(err))]
    batch = _get(cfg, "data.batch_size")
    accumulate = int(_get(cfg, "trainer.accumulate_grad_batches", 1) or 1)
    if not isinstance(batch, int) or batch < 1:
        return [Check("batch", False, f"data.batch_size={batch!r} must be a positive int")]
    total = batch * world_size * accumulate
    return [
        Check(
            "batch",
            True,
            f"{batch} per device; global {total} = {batch} x {world_size} (world) x {accumulate} "
            "(accumulate_grad_batches)",
        )
    ]


# Images/s one device consumes in BEiT-base pretraining: the step goal per H100 (issue 17).
GPU_IMG_S_PER_DEVICE = 2500.0
SAMPLE_IMAGES = 32


def _sample_images(cfg: DictConfig) -> list[tuple[str, bytes]]:
    """Up to ``SAMPLE_IMAGES`` encoded images of ``data.source`` (image folder or local shards)."""
    kind = str(_get(cfg, "data.source._target_", "")).rsplit(".", 1)[-1]
    found: list[tuple[str, bytes]] = []
    if kind == "ImageFolderSource":
        root = Path(str(_get(cfg, "data.source.root", ""))).expanduser()
        for dirpath, dirnames, files in os.walk(root, followlinks=True):
            dirnames.sort()
            for name in sorted(files):
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    path = Path(dirpath) / name
                    found.append((str(path), path.read_bytes()))
                    if len(found) >= SAMPLE_IMAGES:
                        return found
    elif kind == "WebDatasetSource":
        import tarfile

        urls = _get(cfg, "data.source.urls")
        urls = OmegaConf.to_object(urls) if OmegaConf.is_config(urls) else urls
        local = [u for u in expand_shard_urls(urls) if not u.startswith(REMOTE_PREFIXES)]
        keys = tuple(f".{k}" for k in _get(cfg, "data.source.image_keys", ["jpg", "jpeg", "png"]))
        for url in local[:4]:
            with tarfile.open(url.removeprefix("file:")) as tar:
                for member in tar:
                    if member.isfile() and member.name.lower().endswith(keys):
                        found.append((f"{url}:{member.name}", tar.extractfile(member).read()))
                        if len(found) >= SAMPLE_IMAGES:
                            return found
    return found


def measure_worker_rate(cfg: DictConfig, images: list[tuple[str, bytes]]) -> float:
    """Images/s of one loader worker on this CPU: decode + ``data.transform`` + the mask.

    Runs in this process on one torch thread (as a DataLoader worker does), two passes over
    ``images``, the first untimed.
    """
    import time

    import hydra
    import torch

    transform = hydra.utils.instantiate(cfg.data.transform)
    masks = hydra.utils.instantiate(cfg.masking) if _get(cfg, "masking") is not None else None
    deferred = getattr(transform, "decodes_encoded_images", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _pass in range(2):  # the first pass warms up, the second is timed
            start, done = time.perf_counter(), 0
            for name, data in images:
                try:
                    image = EncodedImage(data, name) if deferred else decode_image(data, name)
                    transform(image)
                except BadImageError:
                    continue
                if masks is not None:
                    masks()
                done += 1
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return done / seconds if seconds > 0 and done else 0.0


def check_loader(cfg: DictConfig) -> list[Check]:
    """Whether ``workers x images/s per worker`` can feed the images/s one device consumes."""
    kind = str(_get(cfg, "data.source._target_", "")).rsplit(".", 1)[-1]
    if kind not in ("ImageFolderSource", "WebDatasetSource") or _get(cfg, "data.transform") is None:
        return []
    import torch

    need = _get(cfg, "doctor.img_s_per_device")
    accelerator = str(_get(cfg, "trainer.accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if need is None and not on_gpu:
        return [
            Check(
                "loader",
                True,
                "CPU run: loader speed not checked (+doctor.img_s_per_device=N to check)",
            )
        ]
    need = float(need if need is not None else GPU_IMG_S_PER_DEVICE)
    try:
        images = _sample_images(cfg)
    except (OSError, ValueError) as err:
        return [Check("loader", True, f"could not read sample images to time: {err}", warn=True)]
    if not images:
        return []  # check_data reports the missing data
    try:
        rate = measure_worker_rate(cfg, images)
    except Exception as err:  # a transform that cannot be built is reported by the run itself
        return [Check("loader", True, f"could not time the transform: {err}", warn=True)]
    workers = _get(cfg, "data.num_workers")
    devices = _devices_count(_get(cfg, "trainer.devices", "auto"), accelerator) or 1
    workers = default_num_workers(devices) if workers is None else int(workers)
    feed = max(1, workers) * rate
    detail = (
        f"{workers} worker(s) x {rate:.0f} images/s (measured here on {len(images)} images, one "
        f"core) = {feed:.0f} images/s per device; the device needs {need:.0f}"
    )
    if feed >= need:
        return [Check("loader", True, detail)]
    return [
        Check(
            "loader",
            True,
            f"{detail}: the loader would set the pace. More CPU cores per device and "
            "data.num_workers, or pre-resized shards (scripts/make_shards.py --max-side, "
            "docs/data.md)",
            warn=True,
        )
    ]


def _floats(value: Any) -> list[float]:
    """A config number or list of numbers as a list of floats (one number: three channels)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    values = value if isinstance(value, list | tuple) else [value] * 3
    return [float(v) for v in values] * (3 if len(values) == 1 else 1)


def check_views(cfg: DictConfig) -> list[Check]:
    """uint8 pretraining views need ``task.normalization`` (on the device).

    A ``task.normalization`` other than the transform's mean/std normalises the patch view
    otherwise than the data config says: a warning.
    """
    if not str(_get(cfg, "data.transform._target_", "")).endswith("TwoViewTransform"):
        return []
    dtype = str(_get(cfg, "data.transform.output_dtype", "uint8"))
    if dtype != "uint8":
        return [Check("views", True, f"{dtype} views, normalised in the loader's workers")]
    norm = {k: _get(cfg, f"task.normalization.{k}") for k in ("mean", "std")}
    if norm["mean"] is None or norm["std"] is None:
        return [
            Check(
                "views",
                False,
                "data.transform hands uint8 views but task.normalization has no mean/std, so the "
                "first step would stop: set data.transform.mean/std (task.normalization takes "
                "them) or task.normalization.mean=[...] task.normalization.std=[...]",
            )
        ]
    norm = {k: _floats(v) for k, v in norm.items()}
    detail = (
        f"uint8 views, normalised on the device with mean {norm['mean']} std {norm['std']} "
        "(task.normalization)"
    )
    transform = {k: _get(cfg, f"data.transform.{k}") for k in ("mean", "std")}
    if all(v is not None for v in transform.values()):
        transform = {k: _floats(v) for k, v in transform.items()}
        if transform != norm:
            return [
                Check(
                    "views",
                    True,
                    f"{detail}, not the data.transform's mean {transform['mean']} std "
                    f"{transform['std']}: the encoder sees the patch view normalised otherwise "
                    "than the data config says",
                    warn=True,
                )
            ]
    return [Check("views", True, detail)]


def run_checks(cfg: DictConfig) -> list[Check]:
    """Every check on a composed config, in the order they are printed."""
    checks = check_torch()
    trainer_checks, world = check_trainer(cfg)
    checks += trainer_checks
    checks += check_tokenizer(cfg)
    checks += check_data(cfg)
    checks += check_output(cfg)
    checks += check_run_dir(cfg)
    checks += check_batch(cfg, world)
    checks += check_views(cfg)
    checks += check_loader(cfg)
    return checks


def _one_line(err: BaseException) -> str:
    """Hydra's composition error (and the OmegaConf error under it) on one line."""
    parts = []
    for e in (err, err.__cause__):
        if e is None or (e is not err and not isinstance(e, OmegaConfBaseException)):
            continue
        for line in str(e).splitlines():
            if line.startswith(("Config search path", "    full_key", "    object_type")):
                break
            if not line.strip():
                continue
            if line[0] in " \t" and parts:  # an item of a list ("Available options in ...:")
                parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
            else:
                parts.append(line.strip().rstrip("."))
    return ". ".join(dict.fromkeys(parts))  # in order, without repeats


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: arguments are Hydra overrides; returns 0 if all checks pass, else 1."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        log.error("bitrain doctor: the overrides do not compose: %s", _one_line(err))
        return 1
    checks = run_checks(cfg)
    width = max(len(c.name) for c in checks)
    log.info("bitrain doctor: configs/pretrain.yaml %s", " ".join(overrides))
    for c in checks:
        mark = "!!" if not c.ok else "warn" if c.warn else "ok"
        log.info("  [%s] %s  %s", mark, c.name.ljust(width), c.detail)
    problems = [c for c in checks if not c.ok]
    if problems:
        log.info("%d problem(s):", len(problems))
        for c in problems:
            log.info("  - %s: %s", c.name, c.detail)
        return 1
    warned = [c for c in checks if c.warn]
    log.info("all checks passed" + (f", {len(warned)} warning(s)" if warned else ""))
    return 0
