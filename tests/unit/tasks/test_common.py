"""bitrain.tasks.common.topk_accuracy: the share of images, not the mean of per-class accuracies."""

import pytest
import torch
import torch.nn.functional as F

from bitrain.tasks.common import topk_accuracy


def test_top1_is_the_share_of_correct_images_on_an_unbalanced_set():
    # 9 images of class 0, all right; 1 image of class 1, wrong; class 2 absent.
    labels = torch.tensor([0] * 9 + [1])
    logits = F.one_hot(torch.tensor([0] * 9 + [2]), 3).float()
    assert float(topk_accuracy(3, 1)(logits, labels)) == pytest.approx(0.9)  # macro: 0.5


def test_topk_counts_the_label_among_the_k_highest_and_k_is_clipped():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 1, 2, 0])
    assert float(topk_accuracy(3, 2)(logits, labels)) == pytest.approx(0.5)
    assert float(topk_accuracy(3, 5)(logits, labels)) == 1.0  # top-5 of 3 classes: all
