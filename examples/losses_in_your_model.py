"""fastlt's losses and labels in a model and a data path of your own: no fastlt model, pipeline
or config, only ``fastlt.method``.

    python examples/losses_in_your_model.py                  # 60 steps on random long-tailed data
    python examples/losses_in_your_model.py --steps 3

Your model needs, for a batch, class logits and an embedding z (unnormalised, the label step
uses its raw geometry) and, per class, a center in the same space as z: here a small CNN with
a projection head for z and a second head that maps each class's classifier weights to its
center, as BCL does. What fastlt provides:

* ``make_sampler("balanced", labels, seed)``: the class-balanced index stream CutMix draws its
  foreground images from (``"uniform"`` for the background ones); ``epoch_indices(epoch)``;
* ``sample_box`` / ``area_lambda``: a CutMix box and the background's share λ of the image;
* ``area_label(a, b, λ, C)``: the CutMix label λ·onehot(a) + (1−λ)·onehot(b);
  ``rectify_labels(z, centers, a, b, λ, counts, topk=, omega=)``: the ConCutMix label, which
  moves that label toward the classes whose centers are nearest to the sample's embedding;
* ``LogitAdjustedCrossEntropy(counts, tau)``: CE on logits + τ·log(class prior), for hard or
  soft labels; ``BalancedSupConLoss(counts, temperature)``: BCL's class-averaged contrastive
  loss over two views (B, 2, D) and the class centers.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastlt.method.cutmix import area_lambda, sample_box
from fastlt.method.labels import area_label, rectify_labels
from fastlt.method.losses import BalancedSupConLoss, LogitAdjustedCrossEntropy
from fastlt.method.sampling import make_sampler


class MyModel(nn.Module):
    """A small CNN: logits, the embedding z (unnormalised) and one center per class."""

    def __init__(self, num_classes: int, width: int = 32, dim: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))
        self.center_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))

    def forward(self, x):
        h = self.features(x)
        return self.fc(h), self.head(h), self.center_head(self.fc.weight)


def long_tailed_data(rng: np.random.Generator, num_classes: int, size: int):
    """Images whose mean colour depends on the class (a learnable signal) and a long tail of counts."""
    counts = np.maximum((100 * 0.1 ** (np.arange(num_classes) / (num_classes - 1))).astype(int), 2)
    labels = np.repeat(np.arange(num_classes), counts)
    colours = rng.uniform(-1, 1, size=(num_classes, 3, 1, 1))
    images = colours[labels] + 0.8 * rng.standard_normal((labels.size, 3, size, size))
    return torch.tensor(images, dtype=torch.float32), torch.tensor(labels), counts


def view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A contrastive view: random flips and a random brightness shift per image (your augmentation)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, generator=g) < 0.5
    x = torch.where(flip, x.flip(3), x)
    return x + 0.3 * torch.randn(x.shape[0], 1, 1, 1, generator=g)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--l-d-warm", type=int, default=None,
                   help="area labels for steps < this, ConCutMix labels after (default: half of --steps)")
    args = p.parse_args(argv)
    warm = args.steps // 2 if args.l_d_warm is None else args.l_d_warm
    torch.manual_seed(0)
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)

    num_classes, size, b = 8, 16, args.batch_size
    images, labels, counts = long_tailed_data(rng, num_classes, size)
    class_counts = torch.tensor(counts, dtype=torch.float64)
    background = make_sampler("uniform", labels.numpy(), seed=0)
    foreground = make_sampler("balanced", labels.numpy(), seed=0)

    model = MyModel(num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ce = LogitAdjustedCrossEntropy(class_counts, tau=1.0)
    scl = BalancedSupConLoss(class_counts, temperature=0.1)
    alpha, beta = 2.0, 0.6  # L = α·CE + β·SCL, the ConCutMix CIFAR weights

    steps_per_epoch = len(background) // b
    for step in range(args.steps):
        epoch, i = divmod(step, steps_per_epoch)
        a_idx = background.epoch_indices(epoch)[i * b:(i + 1) * b]
        b_idx = foreground.epoch_indices(epoch)[i * b:(i + 1) * b]
        x, label_a, label_b = images[a_idx].clone(), labels[a_idx], labels[b_idx]
        # One CutMix box for the batch: the foreground images' box pasted into the background ones.
        y0, x0, y1, x1 = sample_box(size, size, alpha=1.0, generator=rng)
        x[:, :, y0:y1, x0:x1] = images[b_idx][:, :, y0:y1, x0:x1]
        lam = torch.full((b,), area_lambda((y0, x0, y1, x1), size, size))

        # One forward pass over view 0 (mixed) and two contrastive views of the background images.
        logits, z_raw, centers_raw = model(torch.cat([x, view(images[a_idx], g), view(images[a_idx], g)]))
        if step < warm:
            target = area_label(label_a, label_b, lam, num_classes)
        else:  # the ConCutMix label, from the detached raw embedding and centers
            target = rectify_labels(z_raw[:b].detach(), centers_raw.detach(), label_a, label_b, lam,
                                    class_counts, topk=3, omega=20 / 255)
        z = F.normalize(z_raw[b:], dim=1)
        features = torch.stack([z[:b], z[b:]], dim=1)  # (B, 2, D): the two views of each image
        loss = alpha * ce(logits[:b], target) + beta * scl(F.normalize(centers_raw, dim=1), features, label_a)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step} ({'area' if step < warm else 'ConCutMix'} label): loss {loss.item():.4f}", flush=True)

    model.eval()
    with torch.no_grad():
        acc = (model(images)[0].argmax(1) == labels).float().mean().item() * 100
    print(f"training-set accuracy {acc:.2f}% (chance {100 / num_classes:.2f}%)")
    return acc


if __name__ == "__main__":
    main()
