"""A faithful re-creation of the published ConCutMix/BCL implementation's *costs*, as the
baseline of the train-step benchmark. It is not used for training.

What the published code does per step, and what is reproduced here:

* data: PIL decoding and torchvision augmentation in DataLoader workers, three views per
  image (``[transform_train, transform_sim, transform_sim]``) for BOTH the instance-uniform
  (background) loader and the class-balanced (foreground) loader — six views per sample, of
  which the two contrastive views of the foreground are thrown away — then CutMix done on
  the batch in Python after loading;
* label: the dense B×C×D broadcast ``1 / ‖z.unsqueeze(1) − c‖`` and separate top-K,
  normalisation and blend passes (tests/spec_formulas.py's ``dense_rectify_labels``);
* contrastive loss: BCL's ``BalSCL`` as published, whose per-instance weights are built
  with a Python list comprehension over the 2B + C targets (a host sync per element);
* the loop: both loss values read on the host every step (its meters), plain
  ``torch.optim.SGD`` (:class:`PublishedStep`);
* fp32 throughout.

The model is not re-created: the baseline step uses fastlt's BCL model, so that a comparison
with fastlt's step measures the data path, the label, the losses and the precision.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from fastlt.method.cutmix import area_lambda, sample_box
from fastlt.pipelines import IMAGENET_MEAN, IMAGENET_STD


def published_transforms(size: int):
    """The three ImageNet-recipe views of docs/design.md §1 in torchvision's classic API."""
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0.0),
                       T.RandAugment(2, 10), T.ToTensor(), normalize])
    sim = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                     T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                     T.ToTensor(), normalize])
    return [train, sim, sim]


class PublishedStyleDataset(Dataset):
    """Decodes with PIL and returns all three views of an image, as the published loaders do."""

    def __init__(self, samples, size: int):
        self.samples = samples  # a fastlt.data.LongTailedList
        self.transforms = published_transforms(size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img = Image.open(io.BytesIO(self.samples.read_bytes(i))).convert("RGB")
        return [t(img) for t in self.transforms], int(self.samples.labels[i])


class ClassBalancedSampler(Sampler):
    """Pick a class uniformly, then an image of it uniformly (the foreground stream)."""

    def __init__(self, labels, num_samples: int, seed: int = 0):
        self.by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
        self.by_class = [ix for ix in self.by_class if ix.size]
        self.num_samples = num_samples
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        for c in self.rng.integers(len(self.by_class), size=self.num_samples):
            ix = self.by_class[c]
            yield int(ix[self.rng.integers(ix.size)])


def published_loaders(samples, size: int, batch_size: int, num_workers: int, seed: int = 0):
    ds = PublishedStyleDataset(samples, size)
    g = torch.Generator().manual_seed(seed)
    common = dict(batch_size=batch_size, num_workers=num_workers, drop_last=True,
                  persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
    background = DataLoader(ds, shuffle=True, generator=g, **common)
    foreground = DataLoader(ds, sampler=ClassBalancedSampler(samples.labels, len(ds), seed), **common)
    return background, foreground


def published_cutmix(views_bg, label_bg, views_fg, label_fg, prob: float, rng: np.random.Generator):
    """CutMix after loading, per batch, as in the published training loop."""
    inputs = views_bg[0]
    lam = 1.0
    if rng.random() < prob:
        h, w = inputs.shape[-2:]
        y0, x0, y1, x1 = sample_box(h, w, 1.0, rng)
        inputs = inputs.clone()
        inputs[:, :, y0:y1, x0:x1] = views_fg[0][:, :, y0:y1, x0:x1]
        lam = area_lambda((y0, x0, y1, x1), h, w)
    return inputs, views_bg[1], views_bg[2], label_bg, label_fg, lam


class PublishedBalSCL(torch.nn.Module):
    """BCL's BalSCL loss with its published structure, per-element Python list included."""

    def __init__(self, cls_num_list, temperature: float = 0.1):
        super().__init__()
        self.cls_num_list = list(cls_num_list)
        self.temperature = temperature

    def forward(self, centers1, features, targets):
        device = features.device
        batch_size = features.shape[0]
        targets = targets.contiguous().view(-1, 1)
        targets_centers = torch.arange(len(self.cls_num_list), device=device).view(-1, 1)
        targets = torch.cat([targets.repeat(2, 1), targets_centers], dim=0)
        batch_cls_count = torch.eye(len(self.cls_num_list))[targets.cpu()].sum(dim=0).squeeze()

        mask = torch.eq(targets[: 2 * batch_size], targets.T).float().to(device)
        logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                    torch.arange(batch_size * 2).view(-1, 1).to(device), 0)
        mask = mask * logits_mask

        features = torch.cat(torch.unbind(features, dim=1), dim=0)
        features = torch.cat([features, centers1], dim=0)
        logits = features[: 2 * batch_size].mm(features.T)
        logits = torch.div(logits, self.temperature)
        logits_max, _ = torch.max(logits, dim=1, keepdim=True)
        logits = logits - logits_max.detach()

        exp_logits = torch.exp(logits) * logits_mask
        # The published code indexes the CPU count vector with each (device) target in turn: one
        # device-to-host copy per element. Current PyTorch refuses a CUDA index into a CPU tensor,
        # so the copy is written out (`i.cpu()`, a no-op on the CPU); the cost is the same.
        per_ins_weight = torch.tensor([batch_cls_count[i.cpu()] for i in targets], device=device).view(1, -1).expand(
            2 * batch_size, 2 * batch_size + len(self.cls_num_list)) - mask
        exp_logits_sum = exp_logits.div(per_ins_weight).sum(dim=1, keepdim=True)
        log_prob = logits - torch.log(exp_logits_sum)
        mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
        return (-mean_log_prob_pos).view(2, batch_size).mean()


def published_soft_ce(logits, target, log_prior):
    """Logit-adjusted soft CE as separate eager ops (softmax and label materialised)."""
    return -(target * F.log_softmax(logits + log_prior, dim=1)).sum(1).mean()


def published_to_device(views, labels, device):
    """The published loop's host-to-device copies: every view of the batch, then the labels."""
    return [v.to(device, non_blocking=True) for v in views], labels.to(device, non_blocking=True)


class PublishedStep:
    """One step of the published ConCutMix training loop, after the warm-up (epoch > l_d_warm).

    Per step: CutMix on the loaded batch (per batch, probability ``cutmix_prob``), one fp32
    forward over cat[view 0, view 1, view 2], BalSCL (:class:`PublishedBalSCL`), and for a
    mixed batch the dense rectified label (``dense_rectify_labels``) with the eager soft CE,
    for an unmixed one the logit-adjusted hard CE; the two loss values are read on the host
    every step (the published loop's ``AverageMeter.update(loss.item())``), then backward and
    ``torch.optim.SGD``. The model is the same BCL architecture as fastlt's, so the step
    differs from fastlt's in the data path, the label, the loss code and the precision only.
    """

    def __init__(self, model, class_counts, *, tau: float, temperature: float, alpha: float, beta: float,
                 topk: int, omega: float, cutmix_prob: float, lr: float, momentum: float, weight_decay: float,
                 device, seed: int = 0):
        from spec_formulas import dense_rectify_labels  # tests/ is on sys.path (bench/conftest.py)

        self.rectify = dense_rectify_labels
        self.model = model
        self.device = torch.device(device)
        counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
        self.class_counts = counts.to(self.device)
        self.log_prior = (tau * torch.log(counts / counts.sum())).float().to(self.device)
        self.scl = PublishedBalSCL(counts.tolist(), temperature)
        self.alpha, self.beta, self.topk, self.omega = alpha, beta, topk, omega
        self.cutmix_prob = cutmix_prob
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.rng = np.random.default_rng(seed)

    def __call__(self, background, foreground) -> tuple[float, float]:
        """Train on one (background, foreground) pair of loader batches; returns (ce, scl) as floats."""
        (views_bg, label_bg), (views_fg, label_fg) = background, foreground
        # Only the foreground's classification view is used, so only it is copied to the device.
        views_bg, label_bg = published_to_device(views_bg, label_bg, self.device)
        (fg0,), label_fg = published_to_device(views_fg[:1], label_fg, self.device)
        image, view1, view2, label_a, label_b, lam = published_cutmix(views_bg, label_bg, [fg0], label_fg,
                                                                     self.cutmix_prob, self.rng)
        b = label_a.shape[0]
        out = self.model(torch.cat([image, view1, view2]))
        features = torch.stack([out.z[b:2 * b], out.z[2 * b:]], dim=1)
        scl = self.scl(out.centers, features, label_a)
        logits = out.logits[:b]
        if lam < 1.0:
            target = self.rectify(out.z_raw[:b], out.centers_raw, label_a, label_b,
                                  torch.full((b,), lam, device=self.device), self.class_counts, topk=self.topk,
                                  omega=self.omega)
            ce = published_soft_ce(logits, target, self.log_prior)
        else:
            ce = F.cross_entropy(logits + self.log_prior, label_a)
        loss = self.alpha * ce + self.beta * scl
        meters = (ce.item(), scl.item())  # host syncs, as the published loop's meters
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return meters
