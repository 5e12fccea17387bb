"""docs/design.md §1 written out literally, independent of the library's implementation.

These are the slow, obvious formulations the tests check the library against and the
benchmarks use as the "published implementation" baselines:

* :func:`dense_rectify_labels` — the ConCutMix label with the B×C×D broadcast of the
  published code (‖z − c_j‖ computed directly), a sort for top-K and explicit one-hots.
* :func:`loop_balanced_supcon` — BCL's loss as a Python loop over anchors and items.
* :func:`spec_soft_cross_entropy` — the logit-adjusted soft cross-entropy, in fp64 with an
  explicit log-sum-exp (gradients by autograd through it).
* :func:`spec_balanced_supcon` — BCL's loss in the distributed form (any contrast set of
  items, any row range of anchors), in fp64, one anchor row at a time.
* :func:`spec_topk_l1` and :func:`spec_confidence` — steps 2–4 alone, from given similarities
  and area labels (a stable sort, fp64), for kernels that take similarities as input.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def dense_rectify_labels(z, centers, label_a, label_b, lam, class_counts, *, topk, omega, normalize="l1",
                         temperature=1.0):
    """Steps 1–5 of docs/design.md §1 with a materialised (B, C, D) difference tensor."""
    z = z.detach().float()
    c = centers.detach().float()
    b, num_classes = z.shape[0], c.shape[0]
    counts = torch.as_tensor(class_counts, dtype=torch.float64, device=z.device)
    # 1. s_j = 1 / ||z - c_j||, from the broadcast difference (B, C, D).
    dist = torch.norm(z.unsqueeze(1) - c.unsqueeze(0), dim=2)
    s = 1.0 / dist.clamp_min(1e-6)
    # 2. keep the K largest (ties: lower class index first, via a stable sort).
    k = min(topk, num_classes)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    kept = torch.gather(s, 1, order)
    # 3. normalise over the kept entries.
    if normalize == "l1":
        w = kept / kept.sum(1, keepdim=True)
    elif normalize == "softmax":
        w = torch.exp(kept / temperature - (kept / temperature).max(1, keepdim=True).values)
        w = w / w.sum(1, keepdim=True)
    else:
        raise ValueError(normalize)
    s_hat = torch.zeros(b, num_classes, device=z.device)
    s_hat.scatter_(1, order, w)
    # Area label from explicit one-hots.
    onehot_a = torch.nn.functional.one_hot(label_a.long(), num_classes).float()
    onehot_b = torch.nn.functional.one_hot(label_b.long(), num_classes).float()
    lam = lam.float().view(-1, 1)
    y = lam * onehot_a + (1 - lam) * onehot_b
    # 4. confidence from class counts.
    gamma = omega * torch.log((y.double() * counts).sum(1)) / torch.log(counts).sum()
    gamma = gamma.float().view(-1, 1)
    # 5. blend.
    return gamma * s_hat + (1 - gamma) * y


def spec_topk_l1(s, topk):
    """Steps 2–3 from similarities s (B, C): the K largest of each row (ties: lower class index
    first, via a stable sort), as (class indices in ascending order (B, K) int64, their l1
    weights s_j / Σ_kept s in fp64, in the same order)."""
    k = min(topk, s.shape[1])
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    kept = torch.sort(order, dim=1).values
    values = torch.gather(s.double(), 1, kept)
    return kept, values / values.sum(1, keepdim=True)


def spec_confidence(label_a, label_b, lam, class_counts, omega):
    """Step 4: γ = ω · log(Σ_j y_j N_j) / Σ_i log N_i with y = λ·onehot(a) + (1 − λ)·onehot(b),
    in fp64 (B,)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    lam = torch.as_tensor(lam, dtype=torch.float64).view(-1)
    y_counts = lam * counts[label_a.long()] + (1 - lam) * counts[label_b.long()]
    return omega * torch.log(y_counts) / torch.log(counts).sum()


def loop_balanced_supcon(centers, features, labels, temperature):
    """BCL's loss, one anchor and one contrast item at a time (docs/design.md §1, L_BalSCL)."""
    b = features.shape[0]
    items = [features[i, 0] for i in range(b)] + [features[i, 1] for i in range(b)] + list(centers)
    item_labels = [int(l) for l in labels] * 2 + list(range(centers.shape[0]))
    total = 0.0
    for i in range(2 * b):
        contrast = [k for k in range(len(items)) if k != i]
        # number of items of each class in this anchor's contrast set
        per_class = {}
        for k in contrast:
            per_class[item_labels[k]] = per_class.get(item_labels[k], 0) + 1
        logits = {k: torch.dot(items[i], items[k]) / temperature for k in contrast}
        denom = sum(torch.exp(logits[k]) / per_class[item_labels[k]] for k in contrast)
        positives = [k for k in contrast if item_labels[k] == item_labels[i]]
        anchor_loss = -sum(logits[k] - torch.log(denom) for k in positives) / len(positives)
        total = total + anchor_loss
    return total / (2 * b)



def spec_soft_cross_entropy(logits, target, bias=None):
    """−(1/B) Σ_i Σ_j t_ij (x_ij + b_j − log Σ_k exp(x_ik + b_k)), in fp64."""
    x = logits.double()
    if bias is not None:
        x = x + bias.double()
    shift = x.max(dim=1, keepdim=True).values.detach()
    log_z = shift + torch.log(torch.exp(x - shift).sum(dim=1, keepdim=True))
    return -(target.double() * (x - log_z)).sum() / x.shape[0]


def spec_balanced_supcon(items, item_labels, num_classes, temperature, anchor_start=0, num_anchors=None):
    """BCL's loss over a contrast set: items (N, D) L2-normalised, anchors items[start:start+M]
    (None: every row up to the C center rows at the end). For anchor i, over k ≠ i:
    L_i = −mean_{k: y_k = y_i} [ s_ik/T − log Σ_k exp(s_ik/T) / n_i(y_k) ], with n_i(c) the
    number of items of class c in i's contrast set; the loss is the mean of L_i (fp64)."""
    x = items.double()
    y = item_labels.long().tolist()
    n = x.shape[0]
    m = n - num_classes - anchor_start if num_anchors is None else num_anchors
    total = x.new_zeros(())
    for i in range(anchor_start, anchor_start + m):
        others = [k for k in range(n) if k != i]
        count = {}
        for k in others:
            count[y[k]] = count.get(y[k], 0) + 1
        logits = (x[others] @ x[i]) / temperature
        weights = torch.tensor([1.0 / count[y[k]] for k in others], dtype=torch.float64, device=x.device)
        log_denom = torch.logsumexp(logits + torch.log(weights), dim=0)
        positive = torch.tensor([y[k] == y[i] for k in others], device=x.device)
        total = total - (logits[positive] - log_denom).mean()
    return total / m
