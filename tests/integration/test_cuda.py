"""CUDA-only correctness: what the CPU tests can only emulate (run by ``scripts/gpu_check.py``).

* device-side NaN skip: with ``task.nonfinite_check=auto`` on a GPU, bf16-mixed and the fused
  AdamW, poisoned steps are skipped through the optimizer's ``found_inf`` (no host sync) and
  counted, and the weights stay untouched on them;
* static masked count: on CUDA the MIM step gathers a fixed number of masked tokens (no host sync
  per step) and equals the boolean-indexing step;
* fused optimizer with clipping: bf16-mixed + ``gradient_clip_val`` keeps AdamW fused and the
  gradients the optimizer stepped with are clipped.

Skipped without CUDA (marker ``cuda``; ``pytest -m cuda`` selects them).
"""

import lightning as L
import pytest
import torch

from bitrain.training import runner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU = [
    "trainer=gpu",
    "data.num_workers=0",
    "data.batch_size=8",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "+trainer.limit_train_batches=4",
    "trainer.check_val_every_n_epoch=100",
]


class Record(L.Callback):
    """Poisons chosen training batches; records per step weight changes, grads and the path."""

    def __init__(self, poison: set[int]) -> None:
        self.poison, self.seen = poison, 0
        self.changed: dict[int, bool] = {}
        self.grad_norms: dict[int, float] = {}
        self.on_device: list[bool] = []
        self.fused: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = [p.detach().clone() for p in pl_module.model.parameters()]
        if self.seen in self.poison:
            batch["images"].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = list(pl_module.model.parameters())
        self.changed[self.seen] = any(
            not torch.equal(a, b.detach()) for a, b in zip(self._before, params)
        )
        grads = [p.grad.float().norm() for p in params if p.grad is not None]
        if grads:  # the gradients the optimizer stepped with (cleared at the next step)
            self.grad_norms[self.seen] = float(torch.linalg.vector_norm(torch.stack(grads)))
        self.on_device.append(pl_module._skips_on_device())
        self.fused.append(bool(trainer.optimizers[0].defaults.get("fused")))
        self.seen += 1


def test_nonfinite_steps_are_skipped_on_the_device(compose_cfg, demo_tokenizer_file, tmp_path):
    overrides = [
        *GPU,
        f"tokenizer.weights_path={demo_tokenizer_file}",
        "trainer.max_steps=4",
        "task.max_nonfinite_steps=2",
        "task.nonfinite_check=auto",
    ]
    record = Record({1})
    summary = runner.train(compose_cfg("pretrain", overrides, tmp_path), callbacks=[record])
    assert summary["global_step"] == 4
    assert all(record.on_device) and all(record.fused)  # auto chose the no-sync path
    assert summary["metrics"]["train/nonfinite_steps"] == 1
    assert record.changed == {0: True, 1: False, 2: True, 3: True}


def test_static_masked_count_equals_the_boolean_step(demo_tokenizer_file):
    from bitrain.data.masking import BlockwiseMaskGenerator
    from bitrain.tasks.mim import MaskedImageModeling

    model = {
        "_target_": "bitrain.models.beit.BeitMIM", "img_size": 32, "patch_size": 8,
        "vocab_size": 512, "embed_dim": 48, "depth": 2, "num_heads": 3, "drop_path_rate": 0.0,
    }  # fmt: skip
    tokenizer = {
        "_target_": "bitrain.tokenizers.dvae.DVAETokenizer",
        "weights_path": str(demo_tokenizer_file),
    }
    task = MaskedImageModeling(model, tokenizer, {"lr": 1e-3, "warmup_steps": 0}).cuda().eval()
    masks = BlockwiseMaskGenerator((4, 4), 6, min_num_patches=2)
    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.randn(4, 3, 32, 32).cuda(),
        "tokenizer_images": torch.rand(4, 3, 32, 32).cuda(),
        "mask": torch.stack([masks(g) for _ in range(4)]).cuda(),
    }
    static = task.shared_step(batch)  # auto on CUDA: the fixed count
    assert task._num_masked == 6
    task.static_mask = False
    plain = task.shared_step(batch)
    torch.testing.assert_close(static["loss"], plain["loss"])
    assert torch.equal(static["targets"], plain["targets"])


def test_fused_adamw_with_bf16_clipping(compose_cfg, demo_tokenizer_file, tmp_path):
    overrides = [
        *GPU,
        f"tokenizer.weights_path={demo_tokenizer_file}",
        "trainer.max_steps=3",
        "trainer.gradient_clip_val=0.01",
    ]
    record = Record(set())
    runner.train(compose_cfg("pretrain", overrides, tmp_path), callbacks=[record])
    assert all(record.fused)
    assert record.grad_norms and all(n <= 0.01 * 1.01 for n in record.grad_norms.values())
