"""bitrain.tasks.common: top-k accuracy (the share of images, not the mean of per-class
accuracies), and ImageRate, the one definition of images/s behind train/images_per_sec."""

import math

import pytest
import torch
import torch.nn.functional as F

from bitrain.tasks.common import ImageRate, NonFiniteGuard, topk_accuracy


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


def test_image_rate_counts_every_rank_over_its_window():

    now = [10.0]
    rate = ImageRate(world_size=4, clock=lambda: now[0])
    assert math.isnan(rate.rate())  # not started
    rate.start()
    rate.add(8)
    rate.add(8)
    now[0] = 12.0
    assert rate.lap() == 16 * 4 / 2  # 16 images on each of 4 ranks in 2 s
    rate.add(2)
    now[0] = 13.0
    assert rate.rate() == 2 * 4 / 1  # the window restarted at the lap
    with pytest.raises(ValueError, match="world_size"):
        ImageRate(world_size=0)


def test_tasks_log_train_images_per_sec_from_image_rate(monkeypatch):
    """train/images_per_sec is ImageRate's figure (the one definition of images/s)."""

    class Task(NonFiniteGuard):
        _trainer = None

        def __init__(self):
            self.logged = []

        def log(self, name, value, **kwargs):
            self.logged.append((name, value))

    monkeypatch.setattr(ImageRate, "rate", lambda self: 123.0)
    task = Task()
    task._log_throughput(4)  # the first step starts the clock
    assert task.logged == []
    task._log_throughput(4)
    assert task.logged == [("train/images_per_sec", 123.0)]
