"""Training a dVAE visual tokenizer as a LightningModule (DALL-E §2.1 and Appendix A.2).

Each step relaxes the encoder's discrete choice with the Gumbel-softmax at the current temperature
and minimises the negative ELBO of :meth:`bitrain.tokenizers.dvae.DiscreteVAE.loss`:
``recon_loss + kl_weight * KL(q(z|x) || uniform)``. As in DALL-E the temperature is annealed
exponentially from ``temperature_start`` (1) to ``temperature_end`` (1/16); DALL-E anneals over
its first 150k updates, here over the whole run unless ``temperature_anneal_steps`` says otherwise.

The KL weight is constant. It decides whether the codebook is used: on the demo's digits (500
steps, batch 64) a weight of 1e-3 used 27% of 512 codes (perplexity 34), 3e-3 used 69% (119) and
1e-2 used 80% (146), with hard-code reconstruction MSE 0.0035, 0.0036 and 0.0040; 1e-4 collapsed
onto a dozen codes (RECIPES, feasibility study). The default is 1e-3: more codes used is not
better for MIM. With 3e-3 the demo's tokenizer gave identical blank patches 58 different codes
(the most frequent code 5% of all), so the masked tokens were close to unpredictable (held-out
masked accuracy 0.082 after 300 pretraining steps vs 0.050 for the constant guess); with 1e-3 blank
patches got 6 codes (one of them 59% of the time) and pretraining reached 0.238 vs 0.166
(docs/tokenizers.md). ``train/codebook_usage`` and
``train/perplexity`` are logged every step (codes of the batch) and every epoch, so a collapse is
visible while it happens.

At the end of fitting, the model is measured on the training data with hard codes (the argmax ids
a :class:`~bitrain.tokenizers.dvae.DVAETokenizer` will give), and the tokenizer file is written
with :func:`~bitrain.tokenizers.dvae.save_dvae` to ``weights_path``, its stats included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from bitrain.tasks import optim as optim_lib
from bitrain.tasks.common import plain
from bitrain.tokenizers.dvae import DiscreteVAE, codebook_stats, save_dvae

__all__ = ["DVAETraining", "temperature_at"]

log = logging.getLogger(__name__)


def temperature_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Gumbel-softmax temperature at ``step``: exponential from ``start`` to ``end``, then ``end``.

    ``tau(s) = start * (end / start) ** min(s / total_steps, 1)``.
    """
    if total_steps <= 0:
        return end
    progress = min(max(step, 0) / total_steps, 1.0)
    return start * (end / start) ** progress


def batch_images(batch: Any) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` of a batch: dict with ``"images"``, tensor, or ``(images, ...)``."""
    if isinstance(batch, Mapping):
        if "images" not in batch:
            raise KeyError(f"dVAE training: batch has keys {sorted(batch)}, expected 'images'")
        return batch["images"]
    if isinstance(batch, list | tuple):
        return batch[0]
    return batch


class DVAETraining(L.LightningModule):
    """Train a :class:`~bitrain.tokenizers.dvae.DiscreteVAE` and save it as a tokenizer file.

    Args:
        model: config of the dVAE (``_target_`` + constructor arguments; a plain dict or a
            DictConfig passed with ``_recursive_: false``).
        optim: keyword arguments of :func:`bitrain.tasks.optim.build` (lr, weight_decay, ...).
        weights_path: where the trained tokenizer file is written at the end of fitting.
        temperature_start: Gumbel-softmax temperature at step 0.
        temperature_end: temperature reached at ``temperature_anneal_steps`` (and kept after).
        temperature_anneal_steps: length of the exponential anneal; ``None``: the whole run.
        kl_weight: weight of ``KL(q(z|x) || uniform)`` (nats per grid cell) in the loss.
        stats_max_batches: batches of training data used for the final codebook statistics
            (``None``: one full pass).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        optim: Mapping[str, Any],
        weights_path: str,
        temperature_start: float = 1.0,
        temperature_end: float = 1 / 16,
        temperature_anneal_steps: int | None = None,
        kl_weight: float = 1e-3,
        stats_max_batches: int | None = 100,
    ) -> None:
        super().__init__()
        model, optim = plain(model), plain(optim)
        if not temperature_start > 0 or not temperature_end > 0:
            raise ValueError(
                f"DVAETraining: temperatures must be > 0, got temperature_start="
                f"{temperature_start}, temperature_end={temperature_end}"
            )
        if kl_weight < 0:
            raise ValueError(f"DVAETraining: kl_weight must be >= 0, got {kl_weight}")
        self.save_hyperparameters(
            {
                "model": model,
                "optim": optim,
                "weights_path": str(weights_path),
                "temperature_start": float(temperature_start),
                "temperature_end": float(temperature_end),
                "temperature_anneal_steps": temperature_anneal_steps,
                "kl_weight": float(kl_weight),
                "stats_max_batches": stats_max_batches,
            }
        )
        self.model = hydra.utils.instantiate(model)
        if not isinstance(self.model, DiscreteVAE):
            raise TypeError(
                f"DVAETraining: model config built a {type(self.model).__name__}; its _target_ "
                "must be bitrain.tokenizers.dvae.DiscreteVAE"
            )
        self.optim_cfg = dict(optim)
        self.weights_path = str(weights_path)
        # Code histogram of the current epoch (not a buffer: it is not part of the checkpoint).
        self._epoch_counts = torch.zeros(self.model.vocab_size, dtype=torch.long)
        self.final_stats: dict[str, float] = {}
        self._t_start: float | None = None

    # --- schedule --------------------------------------------------------------------------------

    def _anneal_steps(self) -> int:
        steps = self.hparams.temperature_anneal_steps
        if steps is not None:
            return int(steps)
        if self._trainer is None:
            return 0
        return int(self.trainer.estimated_stepping_batches)

    @property
    def temperature(self) -> float:
        """The Gumbel-softmax temperature of the current optimizer step."""
        return temperature_at(
            self.global_step,
            self._anneal_steps(),
            self.hparams.temperature_start,
            self.hparams.temperature_end,
        )

    # --- Lightning hooks -------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self._t_start = time.perf_counter()

    def on_train_epoch_start(self) -> None:
        self._epoch_counts = torch.zeros(self.model.vocab_size, dtype=torch.long)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch_images(batch)
        tau = self.temperature
        out = self.model.loss(x, temperature=tau, kl_weight=self.hparams.kl_weight)
        counts = torch.bincount(out["ids"].flatten(), minlength=self.model.vocab_size).cpu()
        self._epoch_counts += counts
        stats = codebook_stats(counts)
        bs = x.shape[0]
        for key in ("loss", "recon_loss", "kl"):
            self.log(f"train/{key}", out[key], prog_bar=key != "kl", batch_size=bs)
        self.log("train/temperature", tau, batch_size=bs)
        self.log("train/codebook_usage", stats["codebook_usage"], prog_bar=True, batch_size=bs)
        self.log("train/perplexity", stats["perplexity"], batch_size=bs)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=bs)
        return out["loss"]

    def on_train_epoch_end(self) -> None:
        stats = codebook_stats(self._epoch_counts)
        self.log("train/codebook_usage_epoch", stats["codebook_usage"])
        self.log("train/perplexity_epoch", stats["perplexity"])

    def configure_optimizers(self):
        return optim_lib.lightning_optimizers(self.model, self.trainer, self.optim_cfg)

    def on_fit_end(self) -> None:
        """Measure the codebook on the training data, then write the tokenizer file (rank 0)."""
        seconds = time.perf_counter() - self._t_start if self._t_start is not None else None
        stats = self.measure(self._stats_loader(), self.hparams.stats_max_batches)
        stats.update(
            steps=int(self.global_step),
            train_seconds=seconds,
            kl_weight=float(self.hparams.kl_weight),
            temperature_end=float(self.temperature),
        )
        self.final_stats = stats
        self._save_and_report(stats)

    @rank_zero_only
    def _save_and_report(self, stats: dict[str, Any]) -> None:
        path = save_dvae(self.model, self.weights_path, stats=stats)
        for logger in self.loggers:
            logger.log_metrics(
                {f"final/{k}": float(v) for k, v in stats.items() if v is not None},
                step=int(self.global_step),
            )
            logger.save()
        log.info(
            "dVAE tokenizer written to %s: %d/%d codes used (%.1f%%), perplexity %.1f, "
            "recon %s %.4f (hard codes)",
            path,
            stats["codes_used"],
            self.model.vocab_size,
            100 * stats["codebook_usage"],
            stats["perplexity"],
            self.model.recon_loss,
            stats["recon_loss"],
        )

    # --- evaluation ------------------------------------------------------------------------------

    def _stats_loader(self) -> Iterable[Any]:
        """The training data: the data module's train loader, else the loader given to ``fit``."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            return datamodule.train_dataloader()
        loader = self.trainer.train_dataloader
        return getattr(loader, "flattened", [loader])[0]

    @torch.no_grad()
    def measure(self, batches: Iterable[Any], max_batches: int | None = None) -> dict[str, float]:
        """Codebook usage, perplexity and hard-code reconstruction loss over ``batches``.

        Returns:
            :func:`~bitrain.tokenizers.dvae.codebook_stats` of the argmax ids, plus ``recon_loss``:
            the reconstruction loss of ``decode_ids(argmax ids)`` (what the tokenizer gives, no
            Gumbel noise), averaged over images, and ``images``: how many were measured.
        """
        was_training = self.model.training
        self.model.eval()
        counts = torch.zeros(self.model.vocab_size, dtype=torch.long)
        recon_sum, n = 0.0, 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = batch_images(batch).to(self.device)
            ids = self.model.encode_logits(x).argmax(1)
            counts += torch.bincount(ids.flatten(), minlength=self.model.vocab_size).cpu()
            recon = self.model.decode_ids(ids)
            recon_sum += float(self.model.reconstruction_loss(recon, x)) * x.shape[0]
            n += x.shape[0]
        self.model.train(was_training)
        stats: dict[str, Any] = codebook_stats(counts)
        stats.update(recon_loss=recon_sum / n if n else float("nan"), images=n)
        return stats
