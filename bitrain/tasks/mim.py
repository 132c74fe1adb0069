"""BEiT masked image modeling as a LightningModule (BEiT §2.3, ``engine_for_pretraining.py``).

One step: the frozen tokenizer turns the token view into ids ``[B, gh, gw]``; the encoder sees the
patch view with the masked patches replaced by the mask token and predicts, at the masked positions
only, a distribution over the visual vocabulary; the loss is the cross entropy against the
tokenizer's ids, averaged over all masked tokens of the batch (the official
``nn.CrossEntropyLoss()`` on the flattened masked logits). Masked accuracy is the fraction of
masked tokens whose argmax is right.

Batches: ``images`` and ``tokenizer_images`` come from the loader either as uint8 pixels (the
default of :class:`bitrain.data.transforms.TwoViewTransform`: a quarter of float32's bytes through
the workers' shared memory and the host-to-device copy) or as float (synthetic data, callers that
normalise themselves). uint8 views are made float here, on the batch's device: the patch view
normalised with ``normalization`` (the transform's mean/std), the token view scaled to [0, 1]
before the tokenizer's own ``preprocess`` (:meth:`MaskedImageModeling.model_inputs`). Float views
are used as they are.

Hyper-parameters are saved as plain containers, so every ``.ckpt`` loads with
``torch.load(weights_only=True)``. The tokenizer is *not* part of the checkpoint: it is frozen, its
weights live in their own file, and keeping it out saves DALL-E's 54M parameters per checkpoint.

Non-finite losses: a step whose loss is NaN or inf is skipped (``training_step`` returns ``None``,
so Lightning runs no backward; the optimizer sees no gradients and leaves weights and AdamW moments
untouched), counted (``train/nonfinite_steps``, kept in checkpoints) and reported with the batch's
statistics; more than ``max_nonfinite_steps`` such steps raise :class:`FloatingPointError`. On a
GPU with a fused optimizer the step is skipped on the device instead (no host sync per step;
``nonfinite_check``, :class:`bitrain.tasks.common.NonFiniteGuard`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F

from bitrain.checkpoints import normalization_record
from bitrain.tasks import optim as optim_lib
from bitrain.tasks.common import NonFiniteGuard, check_nonfinite_mode, plain
from bitrain.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)


class MaskedImageModeling(NonFiniteGuard, L.LightningModule):
    """Pretrain a :class:`bitrain.models.beit.BeitMIM` against a frozen visual tokenizer.

    Args:
        model: config of the MIM model (``_target_`` + constructor arguments).
        tokenizer: config of the tokenizer (``_target_`` + arguments), built and frozen here.
        optim: keyword arguments of :func:`bitrain.tasks.optim.build` (lr, weight_decay, ...).
        compile: wrap the encoder in ``torch.compile`` (static shapes: the mask count is fixed).
        max_nonfinite_steps: how many training steps with a NaN/inf loss are skipped (with a
            warning) before the run stops with :class:`FloatingPointError`; 0 stops at the first.
        nonfinite_check: ``auto`` | ``sync`` | ``device``: how a NaN/inf step is skipped
            (:class:`bitrain.tasks.common.NonFiniteGuard`).
        normalization: ``{"mean", "std"}`` of the patch view (``${data.transform.mean}`` ...),
            kept in the checkpoint so that fine-tuning normalises as pretraining did, and applied
            here to uint8 patch views (needed for them).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        tokenizer: Mapping[str, Any],
        optim: Mapping[str, Any],
        compile: bool = False,
        max_nonfinite_steps: int = 10,
        nonfinite_check: str = "auto",
        normalization: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int):
            raise TypeError(f"task.max_nonfinite_steps must be an int, got {max_nonfinite_steps!r}")
        if max_nonfinite_steps < 0:
            raise ValueError(
                f"task.max_nonfinite_steps={max_nonfinite_steps} must be >= 0 "
                "(0: stop at the first NaN/inf loss)"
            )
        check_nonfinite_mode(nonfinite_check)
        model, tokenizer, optim = plain(model), plain(tokenizer), plain(optim)
        normalization = plain(normalization)
        if normalization and normalization.get("mean") is not None:
            normalization = normalization_record(normalization["mean"], normalization["std"])
        else:
            normalization = None
        self.save_hyperparameters(
            {
                "model": model,
                "tokenizer": tokenizer,
                "optim": optim,
                "compile": compile,
                "max_nonfinite_steps": max_nonfinite_steps,
                "nonfinite_check": nonfinite_check,
                "normalization": normalization,
            }
        )
        self.model = hydra.utils.instantiate(model)
        built = hydra.utils.instantiate(tokenizer)
        if not isinstance(built, Tokenizer):
            raise TypeError(
                f"tokenizer config built a {type(built).__name__}, not a bitrain Tokenizer"
            )
        # Kept outside the module tree: not trained, not saved, not counted as a parameter.
        self.__dict__["tokenizer"] = built.freeze()
        check_compatible(self.model, built)
        self.optim_cfg = dict(optim)
        self.compile = compile
        # Plain attribute (not a submodule) so the compiled wrapper never appears in state_dict.
        self.__dict__["_forward"] = torch.compile(self.model) if compile else self.model
        self._t_last: float | None = None
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_check = nonfinite_check
        self.nonfinite_steps = 0

    # --- Lightning hooks -------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.tokenizer.to(self.device)

    def on_validation_start(self) -> None:
        self.tokenizer.to(self.device)

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, num_masked: int | None = None
    ) -> torch.Tensor:
        """Masked logits ``[B, n_masked, vocab]``."""
        return self._forward(images, mask, num_masked)

    def _static_masked_count(self, mask: torch.Tensor) -> int | None:
        """The masked count per image, learnt once (one sync), on CUDA; ``None`` on a CPU.

        The masking generator masks exactly ``num_masking_patches`` per image, so the count is
        fixed for a run; with it, targets and logits are gathered with no host sync per step
        (``BeitMIM.forward(num_masked=...)`` checks the count asynchronously). ``static_mask``
        (``auto`` | ``true`` | ``false``) forces either way.
        """
        mode = getattr(self, "static_mask", "auto")
        if mode is False or (mode == "auto" and mask.device.type != "cuda"):
            return None
        if "_num_masked" not in self.__dict__:
            self.__dict__["_num_masked"] = int(mask[0].sum())
        return self.__dict__["_num_masked"]

    def _pixel_affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`pixel_affine` of ``task.normalization`` on ``device``, made once per device."""
        cache = self.__dict__.setdefault("_affine", {})
        if device not in cache:
            cache[device] = pixel_affine(self.hparams["normalization"], device)
        return cache[device]

    def model_inputs(
        self, images: torch.Tensor, tokenizer_images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch view as the encoder takes it and the token view as pixels in [0, 1].

        uint8 views (the loader's default) become float on their device: ``images`` normalised
        with ``task.normalization`` (then in the module's float dtype, as Lightning casts a float
        batch), ``tokenizer_images`` divided by 255 (float32). Float views are returned as they
        are. Raises ``ValueError`` for uint8 images without ``task.normalization`` and
        ``TypeError`` for views of another dtype.
        """
        if images.dtype == torch.uint8:
            if self.hparams.get("normalization") is None:
                raise ValueError(
                    "MIM batch: 'images' are uint8 pixels but task.normalization is not set, so "
                    "they cannot be normalised: set task.normalization.mean/std to the data "
                    "transform's (configs/pretrain.yaml takes ${data.transform.mean}/std), or "
                    "hand normalised float images (TwoViewTransform(output_dtype='float32'))"
                )
            scale, shift = self._pixel_affine(images.device)
            images = torch.addcmul(shift, images.to(torch.float32), scale)
            if self.dtype.is_floating_point and self.dtype != torch.float32:
                images = images.to(self.dtype)
        elif not images.is_floating_point():
            raise TypeError(
                f"MIM batch: 'images' must be uint8 pixels or float, got {images.dtype}"
            )
        if tokenizer_images.dtype == torch.uint8:
            tokenizer_images = tokenizer_images.to(torch.float32).mul_(1.0 / 255.0)
        elif not tokenizer_images.is_floating_point():
            raise TypeError(
                "MIM batch: 'tokenizer_images' must be uint8 pixels or float in [0, 1], got "
                f"{tokenizer_images.dtype}"
            )
        return images, tokenizer_images

    def shared_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss and masked accuracy of one batch ``{"images", "tokenizer_images", "mask"}``."""
        images, token_view = self.model_inputs(batch["images"], batch["tokenizer_images"])
        mask = batch["mask"].flatten(1).bool()
        with torch.no_grad():
            tok_in = self.tokenizer.preprocess(token_view)
            ids = self.tokenizer.encode(tok_in).flatten(1)  # [B, N]
        k = self._static_masked_count(mask)
        if k is None:
            targets = ids[mask].view(mask.shape[0], -1)  # [B, n_masked], raster order as logits
        else:
            targets = ids.gather(1, self.model.masked_index(mask, k))
        logits = self(images, mask, k)  # [B, n_masked, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        acc = (logits.detach().argmax(-1) == targets).float().mean()
        return {"loss": loss, "mim_acc": acc, "targets": targets}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._drain_nonfinite(block=True)  # steps flagged on the device count too
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))

    def training_step(
        self, batch: Mapping[str, torch.Tensor], batch_idx: int
    ) -> torch.Tensor | None:
        out = self.shared_step(batch)
        bs = batch["images"].shape[0]
        # Logged before the check, so a skipped step shows its NaN/inf loss and its lr rather than
        # the previous step's values (Lightning repeats the last logged value otherwise).
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        self.log("train/mim_acc", out["mim_acc"], prog_bar=True, batch_size=bs)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=bs)
        self._log_throughput(bs)
        return self._check_loss(out["loss"], batch, bs)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        out = self.shared_step(batch)
        bs = batch["images"].shape[0]
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("val/mim_acc", out["mim_acc"], prog_bar=True, sync_dist=True, batch_size=bs)
        # Baseline: always predicting the batch's most frequent target token (what a model that
        # only learnt the token marginal would score, slightly optimistic).
        targets = out["targets"].flatten()
        const_acc = (targets == torch.mode(targets).values).float().mean()
        self.log("val/const_acc", const_acc, sync_dist=True, batch_size=bs)

    def configure_optimizers(self):
        return optim_lib.lightning_optimizers(self.model, self.trainer, self.optim_cfg)


def pixel_affine(
    normalization: Mapping[str, Any], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` float32 ``[C, 1, 1]`` that normalise uint8 pixels in one multiply-add.

    ``pixels * scale + shift = (pixels / 255 - mean) / std`` for ``normalization = {"mean",
    "std"}`` (1 or 3 values each).
    """
    mean = torch.tensor(normalization["mean"], dtype=torch.float64)
    std = torch.tensor(normalization["std"], dtype=torch.float64)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    return tuple(t.to(device=device, dtype=torch.float32).view(-1, 1, 1) for t in (scale, shift))


def normalise_pixels(images: torch.Tensor, normalization: Mapping[str, Any]) -> torch.Tensor:
    """uint8 pixels ``[..., C, H, W]`` as the MIM task feeds them to the encoder (float32)."""
    scale, shift = pixel_affine(normalization, images.device)
    return torch.addcmul(shift, images.to(torch.float32), scale)


def check_compatible(model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    """Refuse a model/tokenizer pair that cannot train together, naming the config keys."""
    grid = tuple(getattr(model, "grid_size", ()) or ())
    if grid and tuple(tokenizer.grid_size) != grid:
        raise ValueError(
            f"tokenizer grid {tuple(tokenizer.grid_size)} != model patch grid {grid}: "
            "the tokenizer's grid (DALL-E: tokenizer.input_size / 8; dVAE: input_size / "
            "2**num_downsamples of the file) must equal model.img_size / model.patch_size"
        )
    vocab = getattr(model, "vocab_size", None)
    if vocab is not None and vocab != tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab} != tokenizer.vocab_size={tokenizer.vocab_size}: "
            "the LM head must predict the tokenizer's vocabulary"
        )
