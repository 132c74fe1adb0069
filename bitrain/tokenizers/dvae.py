"""A trainable discrete VAE (dVAE) and the visual tokenizer built from its encoder.

Follows the dVAE of DALL-E (Ramesh et al., 2021, §2.1 and Appendix A): a conv encoder maps an image
to logits over a codebook of ``vocab_size`` codes per grid cell; training relaxes the discrete
choice with the Gumbel-softmax (soft one-hot ``softmax((logits + g) / tau)`` times a codebook
``nn.Embedding``), a conv decoder maps the mixed code vectors back to pixels, and the loss is the
negative ELBO: a reconstruction term plus ``kl_weight * KL(q(z|x) || uniform)``. BEiT §2.1.2 and
Table 8 show that such a re-implemented, self-trained tokenizer works about as well as DALL-E's
(0.0880 vs 0.0856 reconstruction error, 82.70 vs 82.86 top-1).

Choices, and why:

* **Reconstruction loss: MSE on [0, 1] pixels** (``recon_loss="l1"`` is available). DALL-E uses a
  logit-Laplace likelihood, which needs ``map_pixels`` and a 6-channel decoder; BEiT's Table 8
  reference re-implementation (lucidrains' DALLE-pytorch) trains with MSE, which is simpler and
  works on the demo's smooth grey digits. The decoder ends in a sigmoid, so pixels stay in [0, 1].
* **KL to the uniform prior, averaged over grid cells** (nats per cell, at most ``log(vocab)``):
  too weak a KL and the encoder collapses onto a few codes (demo digits: weight 1e-4 used about 12
  of 512 codes, 1e-3 27%, 3e-3 69%). The weight and the temperature schedule are training
  hyper-parameters (:class:`bitrain.tasks.tokenizer.DVAETraining`).
* **Gumbel noise as ``-log(-log U)``** from ``torch.rand``: ``Tensor.exponential_`` cost 23% of a
  CPU step in the feasibility study.

Weights file (:func:`save_dvae`, read by :class:`DVAETokenizer` with ``weights_only=True``)::

    {"format": "bitrain-dvae", "version": 1, "config": {constructor kwargs},
     "state_dict": {...}, "stats": {"codebook_usage": ..., "perplexity": ..., ...}}
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import einsum
from torch import nn

from bitrain.io import CheckpointError, atomic_save, load_torch_file
from bitrain.tokenizers.base import Tokenizer

__all__ = ["DVAETokenizer", "DiscreteVAE", "codebook_stats", "gumbel_noise", "save_dvae"]

log = logging.getLogger(__name__)

FORMAT = "bitrain-dvae"
VERSION = 1
RECON_LOSSES = ("mse", "l1")
TRAIN_HINT = (
    "Train one with `python -m bitrain.train_tokenizer` (it writes the file named by "
    "task.weights_path; the demo's is tokenizers/demo_dvae.pt), or set tokenizer.weights_path. "
    "See docs/tokenizers.md, 'Training your own dVAE'"
)


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)``, ``U ~ Uniform(0, 1)``, shaped like ``like``."""
    u = torch.rand_like(like).clamp_(min=1e-10)  # rand is in [0, 1): only 0 needs guarding
    return -torch.log(-torch.log(u))


class ResBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``: a residual block at constant width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DiscreteVAE(nn.Module):
    """dVAE: conv encoder -> logits per grid cell -> Gumbel-softmax codes -> conv decoder.

    Args:
        vocab_size: number of codes (the tokenizer's vocabulary).
        input_size: side of the (square) input images in pixels.
        num_downsamples: stride-2 convolutions; the grid is ``input_size / 2**num_downsamples``.
        hidden_dim: channels of the encoder and decoder trunks.
        num_res_blocks: residual blocks after the downsampling (and before the upsampling).
        codebook_dim: dimension of each code vector.
        recon_loss: ``"mse"`` or ``"l1"``, on pixels in [0, 1].
        straight_through: decode the hard one-hot in the forward pass and take gradients through
            the soft one (straight-through Gumbel-softmax); off as in DALL-E.
    """

    def __init__(
        self,
        vocab_size: int = 512,
        input_size: int = 32,
        num_downsamples: int = 2,
        hidden_dim: int = 64,
        num_res_blocks: int = 1,
        codebook_dim: int = 64,
        recon_loss: str = "mse",
        straight_through: bool = False,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("vocab_size", vocab_size, 2),
            ("input_size", input_size, 1),
            ("num_downsamples", num_downsamples, 1),
            ("hidden_dim", hidden_dim, 1),
            ("num_res_blocks", num_res_blocks, 0),
            ("codebook_dim", codebook_dim, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DiscreteVAE: {name} must be an int >= {low}, got {value!r}")
        if input_size % 2**num_downsamples:
            raise ValueError(
                f"DiscreteVAE: input_size={input_size} must be divisible by "
                f"2**num_downsamples={2**num_downsamples} so the token grid is whole"
            )
        if recon_loss not in RECON_LOSSES:
            raise ValueError(
                f"DiscreteVAE: recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}"
            )
        # Plain constructor kwargs: saved in the weights file and used to rebuild the model.
        self.config: dict[str, Any] = {
            "vocab_size": vocab_size,
            "input_size": input_size,
            "num_downsamples": num_downsamples,
            "hidden_dim": hidden_dim,
            "num_res_blocks": num_res_blocks,
            "codebook_dim": codebook_dim,
            "recon_loss": recon_loss,
            "straight_through": bool(straight_through),
        }
        self.vocab_size = vocab_size
        self.input_size = input_size
        grid = input_size // 2**num_downsamples
        self.grid_size = (grid, grid)
        self.recon_loss = recon_loss
        self.straight_through = bool(straight_through)

        enc: list[nn.Module] = []
        channels = 3
        for _ in range(num_downsamples):
            enc += [nn.Conv2d(channels, hidden_dim, 4, stride=2, padding=1), nn.ReLU()]
            channels = hidden_dim
        enc += [ResBlock(hidden_dim) for _ in range(num_res_blocks)]
        enc += [nn.ReLU(), nn.Conv2d(hidden_dim, vocab_size, 1)]
        self.encoder = nn.Sequential(*enc)

        self.codebook = nn.Embedding(vocab_size, codebook_dim)

        dec: list[nn.Module] = [nn.Conv2d(codebook_dim, hidden_dim, 1)]
        dec += [ResBlock(hidden_dim) for _ in range(num_res_blocks)]
        for _ in range(num_downsamples):
            dec += [nn.ReLU(), nn.ConvTranspose2d(hidden_dim, hidden_dim, 4, stride=2, padding=1)]
        dec += [nn.ReLU(), nn.Conv2d(hidden_dim, 3, 1)]
        self.decoder = nn.Sequential(*dec)

    # --- encoder / decoder ----------------------------------------------------------------------

    def _check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.input_size,) * 2:
            raise ValueError(
                f"DiscreteVAE expects images [B, 3, {self.input_size}, {self.input_size}] in "
                f"[0, 1], got {list(x.shape)}; resize them to input_size"
            )

    def encode_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab_size, gh, gw]`` of images ``[B, 3, H, W]`` with pixels in [0, 1]."""
        self._check_images(x)
        return self.encoder(x * 2.0 - 1.0)  # centred input

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, 3, H, W]`` from code vectors ``[B, codebook_dim, gh, gw]``."""
        return torch.sigmoid(self.decoder(codes))

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, 3, H, W]`` from token ids ``[B, gh, gw]`` (int64)."""
        if ids.ndim != 3 or ids.dtype != torch.long:
            raise ValueError(
                f"DiscreteVAE.decode_ids expects int64 ids [B, gh, gw], got {ids.dtype} "
                f"{list(ids.shape)}"
            )
        codes = self.codebook(ids).permute(0, 3, 1, 2)  # [B, gh, gw, D] -> [B, D, gh, gw]
        return self.decode_codes(codes)

    def forward(
        self, x: torch.Tensor, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Relaxed reconstruction.

        Args:
            x: images ``[B, 3, H, W]`` in [0, 1].
            temperature: Gumbel-softmax temperature (lower: closer to one-hot).

        Returns:
            ``(recon [B, 3, H, W] in [0, 1], logits [B, vocab_size, gh, gw])``.
        """
        logits = self.encode_logits(x)
        soft = F.softmax((logits + gumbel_noise(logits)) / temperature, dim=1)  # [B, V, gh, gw]
        if self.straight_through:
            hard = F.one_hot(soft.argmax(1), self.vocab_size).permute(0, 3, 1, 2).to(soft)
            soft = hard + soft - soft.detach()
        codes = einsum(soft, self.codebook.weight, "b v h w, v d -> b d h w")
        return self.decode_codes(codes), logits

    # --- objective ------------------------------------------------------------------------------

    def reconstruction_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mean per-pixel MSE or L1 between ``recon`` and ``x`` (both in [0, 1])."""
        if self.recon_loss == "l1":
            return F.l1_loss(recon, x)
        return F.mse_loss(recon, x)

    def kl_to_uniform(self, logits: torch.Tensor) -> torch.Tensor:
        """``KL(q(z|x) || uniform)`` in nats, averaged over images and grid cells.

        ``KL = sum_k q_k (log q_k + log K)``; it is 0 when q is uniform and ``log K`` when q is
        one-hot. Averaging over cells keeps ``kl_weight`` independent of the grid size.
        """
        log_q = F.log_softmax(logits.float(), dim=1)
        return (log_q.exp() * (log_q + math.log(self.vocab_size))).sum(1).mean()

    def loss(
        self, x: torch.Tensor, temperature: float, kl_weight: float
    ) -> dict[str, torch.Tensor]:
        """Negative ELBO of a batch ``x`` ``[B, 3, H, W]`` in [0, 1].

        Returns:
            ``{"loss", "recon_loss", "kl", "ids" [B, gh, gw] (argmax codes, no grad)}``.
        """
        recon, logits = self(x, temperature)
        recon_loss = self.reconstruction_loss(recon, x)
        kl = self.kl_to_uniform(logits)
        return {
            "loss": recon_loss + kl_weight * kl,
            "recon_loss": recon_loss,
            "kl": kl,
            "ids": logits.detach().argmax(1),
        }


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Usage and perplexity of a code histogram ``counts`` ``[vocab_size]``.

    Returns:
        ``{"codebook_usage": fraction of codes used at least once, "codes_used": how many,
        "perplexity": exp(entropy of the code distribution)}`` (perplexity = vocab_size when all
        codes are equally frequent, 1 when one code is used).
    """
    counts = counts.detach().double().cpu()
    total = counts.sum()
    if total <= 0:
        return {"codebook_usage": 0.0, "codes_used": 0, "perplexity": 0.0}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {
        "codebook_usage": used / counts.numel(),
        "codes_used": used,
        "perplexity": float(entropy.exp()),
    }


def save_dvae(
    model: DiscreteVAE, path: str | os.PathLike, stats: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` as a bitrain dVAE weights file, atomically; return the path.

    Args:
        model: the trained :class:`DiscreteVAE`.
        path: where to write (parent folders are created).
        stats: plain numbers to keep with the weights (codebook usage, perplexity, recon loss).
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": dict(model.config),
        "state_dict": state,
        "stats": {k: v for k, v in (stats or {}).items()},
    }
    return atomic_save(payload, path)


def load_dvae(path: str | os.PathLike) -> tuple[DiscreteVAE, dict[str, Any]]:
    """Rebuild a :class:`DiscreteVAE` from a file written by :func:`save_dvae`.

    Returns:
        ``(model in eval mode, stats)``.

    Raises:
        FileNotFoundError: no file at ``path`` (the message says how to train one).
        CheckpointError: the file is not a bitrain dVAE file, is corrupt, or does not fit.
    """
    path = Path(path).expanduser()
    blob = load_torch_file(path, what="dVAE tokenizer weights", hint=TRAIN_HINT)
    if not isinstance(blob, Mapping) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, Mapping) else type(blob).__name__
        raise CheckpointError(
            f"'{path}' is not a bitrain dVAE tokenizer file (expected format '{FORMAT}', found "
            f"{found!r}). Pass a file written by `python -m bitrain.train_tokenizer`; DALL-E's "
            "encoder.pkl goes with tokenizer=dall_e"
        )
    if blob.get("version") != VERSION:
        raise CheckpointError(
            f"dVAE file '{path}' has version {blob.get('version')!r}; this bitrain reads version "
            f"{VERSION}. Retrain it with this version or upgrade bitrain"
        )
    config, state = blob.get("config"), blob.get("state_dict")
    if not isinstance(config, Mapping) or not isinstance(state, Mapping):
        raise CheckpointError(f"dVAE file '{path}' lacks its 'config' or 'state_dict' mapping")
    try:
        model = DiscreteVAE(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"dVAE file '{path}' has an unusable config {dict(config)}: {err}"
        ) from err
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"dVAE file '{path}': weights do not fit its config {dict(config)}: {err}"
        ) from err
    return model.eval(), dict(blob.get("stats") or {})


class DVAETokenizer(Tokenizer):
    """A bitrain-trained dVAE as a frozen visual tokenizer: ids = argmax of the encoder logits.

    Args:
        weights_path: a file written by :func:`save_dvae` (``python -m bitrain.train_tokenizer``).
        vocab_size: expected codebook size (the pretraining config interpolates it into the
            model's head); ``None`` takes the file's. A mismatch is a ``ValueError``.
        input_size: expected token-view side in pixels; ``None`` takes the file's.

    ``preprocess`` is the identity: the dVAE is trained on pixels in [0, 1]. ``decode`` maps ids
    back to pixels in [0, 1] through the dVAE's decoder.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike,
        vocab_size: int | None = None,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        self.dvae, self.stats = load_dvae(weights_path)
        expected = {"vocab_size": vocab_size, "input_size": input_size}
        wrong = [
            f"{k}={v} in the config but {self.dvae.config[k]} in the file"
            for k, v in expected.items()
            if v is not None and v != self.dvae.config[k]
        ]
        if wrong:
            raise ValueError(
                f"dVAE tokenizer '{weights_path}' does not match the tokenizer config: "
                f"{'; '.join(wrong)}. Set the tokenizer's keys to the file's values or point "
                "tokenizer.weights_path at a matching file"
            )
        self.weights_path = str(weights_path)
        self.vocab_size = self.dvae.vocab_size
        self.input_size = self.dvae.input_size
        self.grid_size = self.dvae.grid_size
        self.freeze()
        log.info("dVAE tokenizer from %s: %s", weights_path, self.dvae.config)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder logits ``[B, vocab_size, gh, gw]`` of images ``[B, 3, H, W]`` in [0, 1]."""
        return self.dvae.encode_logits(x.float())

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, gh, gw]`` (int64) of images ``[B, 3, H, W]`` in [0, 1]; no grad."""
        ids = self.logits(x).argmax(dim=1)
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                ids = ids.clone()  # usable as a loss target outside inference mode
        return ids

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, 3, H, W]`` from ids ``[B, gh, gw]``."""
        return self.dvae.decode_ids(ids)
