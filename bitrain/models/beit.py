"""BEiT encoder for masked image modeling: timm's ``Beit`` plus a mask token and an LM head.

Follows the BEiT paper (Bao et al., 2021) §2.2-2.5 and the official pretraining model,
``unilm/beit/modeling_pretrain.py`` (``VisionTransformerForMaskedImageModeling``):

* the patch embeddings of masked patches are replaced by a learned ``mask_token``
  (``x * (1 - w) + mask_token * w``), the sequence gets a [CLS] token, then the Transformer blocks
  run with one relative position bias shared by all layers (BEiT+ setting, Appendix A);
* after the final LayerNorm only the masked positions are projected by ``lm_head`` onto the
  visual vocabulary, so a step never pays for the 60% of logits that carry no loss.

The blocks are timm's, unchanged: parameter names equal the official checkpoint's
(``blocks.i.attn.qkv.weight``, ``q_bias``/``v_bias``, ``gamma_1``/``gamma_2``,
``rel_pos_bias.relative_position_bias_table``, ...). On GPUs attention runs through timm's fused
``scaled_dot_product_attention`` with the relative position bias passed as ``attn_mask``; on the
CPU through timm's explicit path (``softmax(q k^T * scale + bias) v``), the same arithmetic but
faster there: with a bias that needs a gradient, CPU SDPA falls back to its math backend, which
adds a guard against fully masked rows and scales q and k separately (see ``_select_attention``).

Initialisation is the official one: truncated normal with std ``init_std`` *truncated at one
standard deviation* (``trunc_normal_(std=0.02, a=-0.02, b=0.02)``, the paper's "small range
[-0.02, 0.02]") for every linear / conv weight, the [CLS] and mask tokens and the LM head; zero
biases; the output projections of layer ``l`` (``attn.proj``, ``mlp.fc2``) divided by
``sqrt(2 l)`` (timm's ``fix_init_weight``).

Unlike the official model, every image must have the same number of masked patches (bitrain's
mask generator guarantees it), so the masked logits have the static shape ``[B, n_masked, V]``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from timm.layers import LayerNorm, trunc_normal_
from timm.models.beit import Beit
from torch import nn

__all__ = ["BeitMIM"]


class BeitMIM(Beit):
    """BEiT masked-image-modeling model (encoder + mask token + LM head over the visual vocab).

    Args:
        img_size: input resolution in pixels (square).
        patch_size: patch side in pixels; the grid is ``img_size // patch_size`` per side.
        in_chans: input channels.
        vocab_size: size of the visual vocabulary (the tokenizer's ``vocab_size``).
        embed_dim: width D of the Transformer.
        depth: number of blocks.
        num_heads: attention heads (must divide ``embed_dim``).
        mlp_ratio: MLP hidden width over ``embed_dim``.
        qkv_bias: learnable q and v biases (k has none, as in the official code).
        drop_path_rate: stochastic depth rate of the last block (linear from 0).
        init_values: LayerScale init (0.1 base, 1e-5 large); ``0`` or ``None`` = no LayerScale.
        use_abs_pos_emb: learned absolute position embeddings.
        use_rel_pos_bias: one relative position bias table per block.
        use_shared_rel_pos_bias: one relative position bias table shared by every block.
        layer_norm_eps: LayerNorm epsilon (official 1e-6; Hugging Face configs default to 1e-12).
        init_std: standard deviation (and truncation bound) of the initialisation.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        vocab_size: int = 8192,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        init_values: float | None = 0.1,
        use_abs_pos_emb: bool = False,
        use_rel_pos_bias: bool = False,
        use_shared_rel_pos_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        init_std: float = 0.02,
    ) -> None:
        _check_args(img_size, patch_size, vocab_size, embed_dim, num_heads, depth)
        # Plain constructor arguments, so a checkpoint can rebuild the model (see checkpoints.py).
        model_kwargs = {
            "img_size": int(img_size),
            "patch_size": int(patch_size),
            "in_chans": int(in_chans),
            "vocab_size": int(vocab_size),
            "embed_dim": int(embed_dim),
            "depth": int(depth),
            "num_heads": int(num_heads),
            "mlp_ratio": float(mlp_ratio),
            "qkv_bias": bool(qkv_bias),
            "drop_path_rate": float(drop_path_rate),
            "init_values": float(init_values) if init_values else None,
            "use_abs_pos_emb": bool(use_abs_pos_emb),
            "use_rel_pos_bias": bool(use_rel_pos_bias),
            "use_shared_rel_pos_bias": bool(use_shared_rel_pos_bias),
            "layer_norm_eps": float(layer_norm_eps),
            "init_std": float(init_std),
        }
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(LayerNorm, eps=layer_norm_eps),
            init_values=init_values or None,
            use_abs_pos_emb=use_abs_pos_emb,
            use_rel_pos_bias=use_rel_pos_bias,
            use_shared_rel_pos_bias=use_shared_rel_pos_bias,
            use_fc_norm=False,  # the final `norm` is a real LayerNorm over every token
        )
        self.model_kwargs = model_kwargs
        self.vocab_size = int(vocab_size)
        self.init_std = float(init_std)
        self.mask_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self.init_weights()
        # timm's own choice (False with TIMM_FUSED_ATTN=0 or when exporting), kept off the CPU.
        self._timm_fused_attn = all(blk.attn.fused_attn for blk in self.blocks)
        self._select_attention()

    # --- attention kernel per device --------------------------------------------------------------

    def _select_attention(self) -> None:
        """Fused SDPA attention off the CPU, timm's explicit attention on it.

        On the CPU, SDPA with a float ``attn_mask`` that requires grad (the learned relative
        position bias) runs its math backend, which costs more than timm's explicit path (a
        ``-inf`` row guard per softmax, q and k each scaled): about 4% of a tiny-model training
        step on 1-2 cores. GPUs keep flash / memory-efficient kernels. Numerically the two paths
        agree to float32 rounding.
        """
        if "_timm_fused_attn" not in self.__dict__:  # during Beit.__init__
            return
        on_cpu = self.cls_token.device.type == "cpu"
        for blk in self.blocks:
            blk.attn.fused_attn = self._timm_fused_attn and not on_cpu

    def _apply(self, fn: Any, recurse: bool = True) -> BeitMIM:
        """``Module._apply`` (``to``, ``cuda``, ...), then the attention kernel for the device."""
        out = super()._apply(fn, recurse)
        self._select_attention()
        return out

    # --- initialisation ---------------------------------------------------------------------------

    def init_weights(self, needs_reset: bool = True) -> None:
        """Official BEiT pretraining init (see the module docstring).

        ``Beit.__init__`` calls this before the mask token and LM head exist; that call is skipped
        and the constructor calls it again once the model is complete.
        """
        if "lm_head" not in self._modules:
            return
        std = self.init_std
        # timm's inverse-CDF sampler: torch's rejection sampler takes ~30 s on BEiT-base.
        init = partial(trunc_normal_, mean=0.0, std=std, a=-std, b=std)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear | nn.Conv2d):
                    init(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif m is not self and hasattr(m, "reset_parameters"):
                    # timm's Attention (q/v bias, rel-pos table -> 0, index buffer), Block (gamma),
                    # RelativePositionBias (table -> 0, index buffer).
                    m.reset_parameters()
            for token in (self.cls_token, self.mask_token, self.pos_embed):
                if token is not None:
                    init(token)
        self.fix_init_weight()  # attn.proj / mlp.fc2 of layer l divided by sqrt(2 l)

    # --- shapes and optimizer helpers -------------------------------------------------------------

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(gh, gw)``."""
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        """Number of patches ``N = gh * gw``."""
        return int(self.patch_embed.num_patches)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The official model's no-decay names (``modeling_pretrain.py``): pos_embed, cls_token.

        Unlike timm's ``Beit.no_weight_decay`` the relative position bias tables are not listed,
        and neither is the mask token: the official pretraining decays both.
        """
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups (timm's), with the mask token in the stem and the LM head after the norm."""
        return {
            "stem": r"^cls_token|^mask_token|^pos_embed|^patch_embed|^rel_pos_bias",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm|^lm_head", (99999,))],
        }

    # --- forward -------------------------------------------------------------------------------

    def flat_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Validate a patch mask and flatten it to ``[B, N]`` bool (raster order).

        Args:
            mask: ``[B, gh, gw]`` or ``[B, N]``, bool (or 0/1 integers); True = masked.

        Raises:
            ValueError: the mask's shape does not match the patch grid.
            TypeError: the mask is floating point.
        """
        if mask.is_floating_point():
            raise TypeError(
                f"BeitMIM: mask must be bool (True = masked patch), got {mask.dtype}; "
                "pass mask.bool() if it holds 0/1 values"
            )
        gh, gw = self.grid_size
        shape_ok = (mask.ndim == 3 and tuple(mask.shape[1:]) == (gh, gw)) or (
            mask.ndim == 2 and mask.shape[1] == gh * gw
        )
        if not shape_ok:
            raise ValueError(
                f"BeitMIM: mask of shape {tuple(mask.shape)} does not fit the {gh}x{gw} patch "
                f"grid; expected [B, {gh}, {gw}] or [B, {gh * gw}] (model.img_size / "
                "model.patch_size must match the masking generator's input_size)"
            )
        return mask.flatten(1).bool()

    def forward_features(
        self, images: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode images, masked patches replaced by the mask token.

        Args:
            images: ``[B, C, H, W]`` normalized pixels.
            mask: optional ``[B, gh, gw]`` or ``[B, N]`` bool, True = masked.

        Returns:
            ``[B, 1 + N, D]`` tokens ([CLS] first) after the final LayerNorm.
        """
        x = self.patch_embed(images)  # [B, N, D]
        if mask is not None:
            w = self.flat_mask(mask).unsqueeze(-1).to(x.dtype)  # [B, N, 1]
            x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        # [heads, 1+N, 1+N], added to the attention logits of every block (SDPA attn_mask).
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(
                    blk, x, shared_rel_pos_bias=rel_pos_bias, use_reentrant=False
                )
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        return self.norm(x)

    @staticmethod
    def masked_index(flat: torch.Tensor, num_masked: int) -> torch.Tensor:
        """Positions ``[B, num_masked]`` of the masked patches, raster order, without a host sync.

        ``flat`` is a ``[B, N]`` bool mask with exactly ``num_masked`` True per row; the result
        indexes what ``x[flat]`` selects, in the same order (a stable sort instead of ``nonzero``,
        whose output size the host must know).
        """
        order = torch.argsort(flat.to(torch.uint8), dim=1, descending=True, stable=True)
        return order[:, :num_masked].sort(dim=1).values

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, num_masked: int | None = None
    ) -> torch.Tensor:
        """Logits over the visual vocabulary at the masked positions only.

        Args:
            images: ``[B, C, H, W]`` normalized pixels.
            mask: ``[B, gh, gw]`` or ``[B, N]`` bool, True = masked; the same count per image.
            num_masked: that count, when the caller knows it: the masked tokens are then gathered
                by :meth:`masked_index` with no device-to-host sync (static shapes for
                ``torch.compile`` too); the count is checked on the CPU and, asynchronously, on
                CUDA. ``None``: boolean indexing (one sync) after checking the counts.

        Returns:
            ``[B, n_masked, vocab_size]``, positions in raster order within each image (the order of
            ``ids.flatten(1)[mask.flatten(1)]``).

        Raises:
            ValueError: the images have different numbers of masked patches.
        """
        flat = self.flat_mask(mask)  # [B, N]
        batch = flat.shape[0]
        if num_masked is not None:
            _check_count_async(flat, num_masked)
            index = self.masked_index(flat, num_masked)
            x = self.forward_features(images, flat)[:, 1:]  # [B, N, D]
            x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            return self.lm_head(x)
        if not torch.compiler.is_compiling():
            counts = flat.sum(dim=1)
            if batch and bool((counts != counts[0]).any()):
                raise ValueError(
                    "BeitMIM: every image must have the same number of masked patches, got "
                    f"counts {counts.tolist()}; use bitrain.data.masking.BlockwiseMaskGenerator, "
                    "which masks exactly num_masking_patches per image"
                )
        x = self.forward_features(images, flat)[:, 1:]  # [B, N, D]
        x = x[flat].reshape(batch, -1, x.shape[-1])  # [B, n_masked, D], raster order
        return self.lm_head(x)


def _check_count_async(flat: torch.Tensor, num_masked: int) -> None:
    """Each row of ``flat`` has ``num_masked`` True: checked now on a CPU, async on CUDA."""
    if torch.compiler.is_compiling():
        return
    ok = (flat.sum(dim=1) == num_masked).all()
    if flat.device.type == "cpu":
        if not bool(ok):
            raise ValueError(
                f"BeitMIM: every image must have exactly {num_masked} masked patches, got counts "
                f"{flat.sum(dim=1).tolist()}"
            )
    elif flat.device.type == "cuda":
        torch._assert_async(ok, f"BeitMIM: an image has not exactly {num_masked} masked patches")


def _check_args(
    img_size: Any, patch_size: Any, vocab_size: int, embed_dim: int, num_heads: int, depth: int
) -> None:
    """Refuse inconsistent sizes with a message naming the config keys."""
    if not isinstance(img_size, int) or not isinstance(patch_size, int):
        raise TypeError(
            f"BeitMIM: img_size and patch_size must be ints (square images and patches), got "
            f"img_size={img_size!r}, patch_size={patch_size!r}"
        )
    if patch_size <= 0 or img_size % patch_size:
        raise ValueError(
            f"BeitMIM: img_size={img_size} is not a multiple of patch_size={patch_size}; "
            "set model.img_size to a multiple of model.patch_size"
        )
    if num_heads <= 0 or embed_dim % num_heads:
        raise ValueError(
            f"BeitMIM: embed_dim={embed_dim} is not divisible by num_heads={num_heads}"
        )
    if vocab_size <= 0 or depth <= 0:
        raise ValueError(
            f"BeitMIM: vocab_size ({vocab_size}) and depth ({depth}) must be positive; "
            "model.vocab_size normally comes from ${tokenizer.vocab_size}"
        )
