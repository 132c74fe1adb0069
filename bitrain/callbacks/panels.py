"""Image panels: what the model sees and predicts, as PNG files in the run directory and in wandb.

* :class:`MIMPanels` (pretraining): every ``every_n_steps`` steps, a grid of the first
  ``num_images`` training samples of the current batch, one row each:

  1. the token view (the tokenizer's input, pixels in [0, 1]);
  2. the same image with the masked patches blanked (blue): what the encoder has to fill in;
  3. the tokenizer's reconstruction of its own ids (what a perfect prediction would give);
  4. the reconstruction with the model's *predicted* ids at the masked positions and the
     tokenizer's ids elsewhere, titled with the masked accuracy of that sample.

  Columns 3 and 4 need a tokenizer that can decode (``Tokenizer.can_decode``: the trained dVAE,
  or DALL-E with ``tokenizer.decoder_path=.../decoder.pkl``); DALL-E's encoder alone cannot, and
  then the panel has the first two columns.
* :class:`TokenizerPanels` (tokenizer training): input / hard-code reconstruction pairs and the
  histogram of code usage over the epoch so far.

Files go to ``dirpath/<kind>_step_NNNNNNN.png``; with a ``WandbLogger`` they are also logged as
images (offline by default). Only rank 0 renders. The model is put in eval mode for the panel's
forward pass (no drop path) and restored afterwards; nothing is trained by it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from bitrain.tasks.tokenizer import batch_images

__all__ = ["MIMPanels", "TokenizerPanels", "blank_masked", "save_grid", "save_histogram"]

log = logging.getLogger(__name__)

MASK_COLOUR = (0.25, 0.45, 0.85)  # a masked patch in the panel: blue, unlike any digit or photo


def blank_masked(
    images: torch.Tensor, mask: torch.Tensor, colour: tuple[float, float, float] = MASK_COLOUR
) -> torch.Tensor:
    """``images`` ``[k, 3, H, W]`` with the patches where ``mask`` ``[k, gh, gw]`` is True filled.

    The mask grid is scaled to the image by nearest neighbour: ``H`` must be a multiple of ``gh``.
    """
    if images.ndim != 4 or mask.ndim != 3 or images.shape[0] != mask.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and mask {tuple(mask.shape)} do not pair")
    h, w = images.shape[-2:]
    gh, gw = mask.shape[-2:]
    if h % gh or w % gw:
        raise ValueError(f"image size {h}x{w} is not a multiple of the mask grid {gh}x{gw}")
    big = mask.bool().repeat_interleave(h // gh, 1).repeat_interleave(w // gw, 2)
    fill = torch.tensor(colour, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return torch.where(big[:, None], fill.expand_as(images), images)


def _to_numpy(images: torch.Tensor) -> np.ndarray:
    """``[k, 3, H, W]`` in [0, 1] -> ``[k, H, W, 3]`` float32 for matplotlib."""
    return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (folders made), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_grid(
    columns: Mapping[str, torch.Tensor],
    path: str | Path,
    title: str = "",
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Write a PNG grid: one column per entry of ``columns`` (``[k, 3, H, W]`` in [0, 1]).

    Args:
        columns: column title -> images; every entry has the same ``k``.
        path: the PNG to write (parents are created).
        title: figure title.
        row_labels: optional text under each image of the last column (e.g. accuracies).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    arrays = [_to_numpy(columns[n]) for n in names]
    rows = arrays[0].shape[0]
    if any(a.shape[0] != rows for a in arrays):
        raise ValueError("every column of a panel needs the same number of images")
    fig, axes = plt.subplots(
        rows, len(names), figsize=(2.2 * len(names), 2.2 * rows + 0.6), squeeze=False
    )
    for c, (name, array) in enumerate(zip(names, arrays)):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(array[r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if row_labels is not None and c == len(names) - 1:
                ax.set_xlabel(row_labels[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def save_histogram(counts: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Write a PNG bar chart of code usage (``counts`` ``[vocab]``), codes sorted by frequency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = counts.detach().cpu().double()
    total = float(values.sum())
    freq = (values / total).sort(descending=True).values.numpy() if total else values.numpy()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.bar(np.arange(len(freq)), freq, width=1.0)
    ax.set_xlabel("code (sorted by frequency)")
    ax.set_ylabel("share of tokens")
    used = int((values > 0).sum())
    ax.set_title(title or f"{used}/{len(values)} codes used", fontsize=10)
    return _save(fig, path)


def _log_to_wandb(trainer: L.Trainer, key: str, path: Path, caption: str) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            try:
                logger.log_image(
                    key=key, images=[str(path)], step=trainer.global_step, caption=[caption]
                )
            except Exception as err:  # noqa: BLE001 - a panel must never stop training
                log.warning("could not log %s to wandb: %s", path, err)


class _EveryNSteps(L.Callback):
    """Fires :meth:`render` after the optimizer steps that are multiples of ``every_n_steps``."""

    kind = "panel"

    def __init__(self, dirpath: str, every_n_steps: int = 1000, num_images: int = 4) -> None:
        super().__init__()
        if int(every_n_steps) < 1 or int(num_images) < 1:
            raise ValueError(
                f"{type(self).__name__}: every_n_steps ({every_n_steps}) and num_images "
                f"({num_images}) must be >= 1"
            )
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.num_images = int(every_n_steps), int(num_images)
        self._last_step = -1
        self.written: list[Path] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        self._render_rank_zero(trainer, pl_module, batch)

    @rank_zero_only
    def _render_rank_zero(self, trainer, pl_module, batch) -> None:
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                paths = self.render(trainer, pl_module, batch)
        except Exception as err:  # noqa: BLE001 - a panel must never stop training
            log.warning("%s at step %d failed: %s", type(self).__name__, trainer.global_step, err)
            return
        finally:
            pl_module.train(was_training)
        for key, path, caption in paths:
            self.written.append(path)
            _log_to_wandb(trainer, key, path, caption)

    def _path(self, trainer, name: str) -> Path:
        return self.dirpath / f"{name}_step_{trainer.global_step:07d}.png"

    def render(self, trainer, pl_module, batch) -> list[tuple[str, Path, str]]:
        """Write the panel(s) for ``batch``; return ``(wandb key, path, caption)`` of each."""
        raise NotImplementedError


class MIMPanels(_EveryNSteps):
    """Masked image modeling panels for :class:`bitrain.tasks.mim.MaskedImageModeling`.

    Args:
        dirpath: where the PNG files go (``${paths.output_dir}/panels``).
        every_n_steps: optimizer steps between two panels.
        num_images: samples (rows) per panel.
    """

    def render(self, trainer, pl_module, batch: Mapping[str, Any]) -> list[tuple[str, Path, str]]:
        k = min(self.num_images, batch["images"].shape[0])
        # uint8 views (the loader's default) as the task feeds them: normalised / in [0, 1].
        images, token_view = pl_module.model_inputs(
            batch["images"][:k], batch["tokenizer_images"][:k]
        )
        token_view = token_view.float()
        mask = batch["mask"][:k].bool()
        tokenizer = pl_module.tokenizer
        columns = {"token view": token_view}
        # The token view at the tokenizer's grid: the mask grid equals it (check_compatible).
        columns["masked"] = blank_masked(token_view, mask)
        labels = None
        if tokenizer.can_decode:
            ids = tokenizer.encode(tokenizer.preprocess(token_view))  # [k, gh, gw]
            logits = pl_module(images, mask.flatten(1))  # [k, n_masked, V]
            predicted = logits.argmax(-1)
            flat_mask = mask.flatten(1)
            mixed = ids.flatten(1).clone()
            mixed[flat_mask] = predicted.flatten().to(mixed.dtype)
            targets = ids.flatten(1)[flat_mask].view_as(predicted)
            acc = (predicted == targets).float().mean(1)
            columns["tokenizer reconstruction"] = tokenizer.decode(ids).float()
            columns["predicted at masked"] = tokenizer.decode(mixed.view_as(ids)).float()
            labels = [f"masked acc {a:.2f}" for a in acc.tolist()]
        n_masked = int(mask[0].sum())
        title = f"step {trainer.global_step}: {n_masked} of {mask[0].numel()} patches masked" + (
            "" if tokenizer.can_decode else " (tokenizer cannot decode: no reconstructions)"
        )
        path = save_grid(columns, self._path(trainer, "mim"), title=title, row_labels=labels)
        return [("panels/mim", path, title)]


class TokenizerPanels(_EveryNSteps):
    """dVAE training panels for :class:`bitrain.tasks.tokenizer.DVAETraining`.

    Input images next to their reconstruction from hard codes (the argmax ids the finished
    tokenizer will give), and the code-usage histogram of the epoch so far.
    """

    def render(self, trainer, pl_module, batch: Any) -> list[tuple[str, Path, str]]:
        x = batch_images(batch)[: self.num_images].float()
        model = pl_module.model
        ids = model.encode_logits(x).argmax(1)
        recon = model.decode_ids(ids)
        mse = ((recon - x) ** 2).flatten(1).mean(1)
        title = f"step {trainer.global_step}: input / reconstruction from hard codes"
        grid = save_grid(
            {"input": x, "reconstruction": recon},
            self._path(trainer, "dvae"),
            title=title,
            row_labels=[f"mse {m:.4f}" for m in mse.tolist()],
        )
        counts = getattr(pl_module, "_epoch_counts", None)
        out = [("panels/dvae", grid, title)]
        if counts is not None and int(counts.sum()):
            used = int((counts > 0).sum())
            perplexity = _perplexity(counts)
            hist_title = (
                f"step {trainer.global_step}: {used}/{len(counts)} codes used this epoch, "
                f"perplexity {perplexity:.1f}"
            )
            hist = save_histogram(counts, self._path(trainer, "codebook"), title=hist_title)
            out.append(("panels/codebook", hist, hist_title))
        return out


def _perplexity(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))
