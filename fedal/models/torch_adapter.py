"""A torch classifier behind the interface strategies and learners use.

``TorchClassifier`` trains a module that has ``embed`` and ``head`` (see
:mod:`fedal.models.nets`), predicts in large batches under ``torch.inference_mode``,
gives probabilities and embeddings from a single pass, MC-dropout samples, and its
weights as numpy arrays (what a federation exchanges).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedal.config import AUGMENTATIONS, OPTIMIZERS, SCHEDULES
from fedal.exceptions import ConfigError
from fedal.seeds import fit_seed


#: pixels of the random shifts
SHIFT = 2


def augment_images(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Randomly shifted (up to :data:`SHIFT` pixels, reflect padding) and, with ``kind`` ``shift-flip``,
    horizontally flipped copies of images ``x`` (n, C, H, W), drawn from the generator ``gen``; ``kind``
    ``none`` and inputs that are not images come back unchanged."""
    if kind == "none" or x.dim() != 4 or min(x.shape[-2:]) <= 2 * SHIFT:
        return x
    n = x.shape[0]
    out = _shifted(x, SHIFT, gen)
    if kind == "shift-flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)
    return out


def _shifted(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Images ``x`` (n, C, H, W), each shifted by up to ``pixels`` in each direction (reflect padding)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pixels)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


#: pixels of the strong view's shifts, side of its cut-out square, and unlabeled images per labeled one in a step
STRONG_SHIFT, CUTOUT, UNLABELED_RATIO = 4, 10, 2


def strong_augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A strongly augmented view of images ``x`` (n, C, H, W) for the consistency loss, from the generator
    ``gen``: the weak view's flips (``kind``), shifts of up to :data:`STRONG_SHIFT` pixels, brightness and
    contrast scaled by up to 25 %, and a :data:`CUTOUT`-pixel square set to the image's mean (DeVries &
    Taylor, 2017). Inputs that are not images come back with Gaussian noise of 0.1 of their spread."""
    if x.dim() != 4 or min(x.shape[-2:]) <= 2 * STRONG_SHIFT:
        return x + 0.1 * x.std() * torch.randn(x.shape, generator=gen)
    n, _, h, w = x.shape
    out = _shifted(augment_images(x, "shift-flip" if kind == "shift-flip" else "none", gen), STRONG_SHIFT, gen)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + 0.25 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    brightness = 1 + 0.25 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    out = ((out - mean) * contrast + mean) * brightness
    cy = torch.randint(0, h, (n,), generator=gen).view(n, 1, 1)
    cx = torch.randint(0, w, (n,), generator=gen).view(n, 1, 1)
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    hole = ((ys - cy).abs() <= CUTOUT // 2) & ((xs - cx).abs() <= CUTOUT // 2)
    return torch.where(hole[:, None], out.mean(dim=(1, 2, 3), keepdim=True), out)


def _check_module(module: nn.Module) -> None:
    if not (hasattr(module, "embed") and isinstance(getattr(module, "head", None), nn.Linear)):
        raise ConfigError(
            f"{type(module).__name__} must define embed(x) and a final nn.Linear named head "
            "(see fedal.models.SmallCNN / MLP) so strategies can read embeddings and gradients."
        )


class TorchClassifier:
    """Train and query a torch classifier on numpy arrays.

    Parameters
    ----------
    build : callable
        ``build() -> nn.Module``; called for the first model and on :meth:`reset`.
    n_classes : int
        Number of classes.
    epochs : int
        Local epochs per :meth:`fit`.
    batch_size : int
        Training batch size.
    lr : float
        Learning rate.
    weight_decay : float
        L2 regularisation.
    predict_batch_size : int
        Batch size for inference (large: scoring a pool is one pass over it).
    min_steps : int
        Train for at least this many optimizer steps per :meth:`fit` (more epochs when
        the labeled set is small, so 10 labels are not one gradient step).
    seed : int
        Seed for initialisation, shuffling and dropout.
    optimizer : {"adam", "adamw", "sgd"}
        A fresh Adam per fit (the default), AdamW (decoupled weight decay), or SGD (Nesterov
        when ``momentum > 0``): with few steps per round, FedAvg of one SGD step per client is
        centralized gradient descent, free of the client drift local Adam keeps (Woodworth et
        al., NeurIPS 2020; Wang et al., 2021), and a server optimiser (FedAdam, FedAvgM) adds
        the adaptivity or momentum back on the server.
    momentum : float
        SGD's momentum (Nesterov); 0 = plain SGD.
    local_steps : int
        ``> 0``: every :meth:`fit` takes exactly this many optimizer steps on batches of
        ``batch_size`` drawn from the labels (epochs and ``min_steps`` are then ignored);
        one step per round with a server optimiser is pooled training of the same network
        when the network has no batch statistics.
    schedule : {"constant", "onecycle"}
        The learning rate within a fit: constant, or one-cycle (warm up to ``lr`` over the
        first 30 % of the fit's steps, then cosine down to 0): for pooled and local training.
        In a federation the server sets each round's rate (``fit(lr=...)``).
    augment : {"none", "shift", "shift-flip"}
        Training-time augmentation of images: random shifts of up to 2 pixels (reflect
        padding), and horizontal flips with ``shift-flip``.
    restricted_softmax : float
        FedRS (Li & Zhan, KDD 2021): during a fit, the logits of classes absent from the labels
        are scaled by this factor in (0, 1] (1 = off), so a client does not push them down.
    consistency : float
        Weight of FixMatch's consistency loss (Sohn et al., NeurIPS 2020) on the ``unlabeled`` inputs a fit
        is given: each step also draws :data:`UNLABELED_RATIO` unlabeled images per labeled one; those the
        network classifies with at least ``consistency_threshold`` confidence on a weak view (the
        ``augment`` view) are trained to that class on a strong view (:func:`strong_augment`). 0 = off.
    consistency_threshold : float
        Confidence a pseudo-label of the consistency loss needs.
    """

    def __init__(
        self,
        build: Callable[[], nn.Module],
        n_classes: int,
        *,
        epochs: int = 5,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        predict_batch_size: int = 1024,
        min_steps: int = 0,
        seed: int = 0,
        optimizer: str = "adam",
        restricted_softmax: float = 1.0,
        momentum: float = 0.0,
        local_steps: int = 0,
        schedule: str = "constant",
        augment: str = "none",
        consistency: float = 0.0,
        consistency_threshold: float = 0.95,
    ) -> None:
        if n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2, got {n_classes}")
        for name, value in (("epochs", epochs), ("batch_size", batch_size), ("predict_batch_size", predict_batch_size)):
            if int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
        if int(local_steps) < 0:
            raise ConfigError(f"local_steps must be >= 0 (0 = epochs), got {local_steps}")
        if not consistency >= 0 or not 0 < consistency_threshold <= 1:
            raise ConfigError(f"consistency must be >= 0 and its threshold in (0, 1], got {consistency} and "
                              f"{consistency_threshold}")
        self.consistency = float(consistency)
        self.consistency_threshold = float(consistency_threshold)
        self.momentum = float(momentum)
        self.local_steps = int(local_steps)
        self.schedule = schedule
        self.augment = augment
        if not 0 < restricted_softmax <= 1:
            raise ConfigError(f"restricted_softmax must be in (0, 1] (1 = off), got {restricted_softmax}")
        self.optimizer = optimizer
        self.restricted_softmax = float(restricted_softmax)
        self.build = build
        self.n_classes = int(n_classes)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.predict_batch_size = int(predict_batch_size)
        self.min_steps = int(min_steps)
        self.seed = int(seed)
        self._fits = 0
        self.module = self._new_module(self.seed)

    def _new_module(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        module = self.build()
        _check_module(module)
        return module

    def reset(self, seed: int | None = None) -> None:
        """Re-initialise the weights (cold restart between query rounds) from ``seed``
        (default the classifier's seed)."""
        self.module = self._new_module(self.seed if seed is None else seed)

    @property
    def uses_unlabeled(self) -> bool:
        """Whether :meth:`fit` wants the unlabeled pool (the consistency loss is on)."""
        return self.consistency > 0

    # ----------------------------------------------------------------- weights
    def get_state(self) -> "OrderedDict[str, np.ndarray]":
        """Weights as an ordered dict of numpy arrays (copies)."""
        return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in self.module.state_dict().items())

    def set_state(self, state: "dict[str, np.ndarray]") -> None:
        """Load weights from ``state`` (as :meth:`get_state` gives); raises ConfigError naming
        missing / unexpected keys or bad shapes, and then changes nothing."""
        own = self.module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")
        for key, value in state.items():
            if tuple(np.shape(value)) != tuple(own[key].shape):
                raise ConfigError(
                    f"weight {key!r} has shape {tuple(np.shape(value))}, the model expects {tuple(own[key].shape)}"
                )
        self.module.load_state_dict(OrderedDict((k, torch.as_tensor(np.asarray(v))) for k, v in state.items()))

    # ---------------------------------------------------------------- training
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int | None = None,
        proximal_mu: float = 0.0,
        class_weight: np.ndarray | None = None,
        lr: float | None = None,
        draw: int | None = None,
        unlabeled: np.ndarray | None = None,
    ) -> float:
        """Train on ``(X, y)`` for ``epochs`` epochs; return the mean training loss.

        Parameters
        ----------
        X, y : numpy.ndarray
            Inputs and integer labels ``0 .. n_classes - 1``.
        epochs : int, optional
            Epochs for this call; default the classifier's ``epochs``.
        proximal_mu : float
            ``> 0`` adds FedProx's proximal term ``mu/2 * ||w - w0||^2`` around the weights
            held when ``fit`` was called (Li et al., MLSys 2020).
        class_weight : array of float, optional
            Per-class weight of the cross-entropy (imbalanced data).
        lr : float, optional
            The learning rate of this fit (a federation's round schedule); default the classifier's ``lr``.
        draw : int, optional
            Which fit this is, for its batches, augmentation and dropout (default: how many fits this object
            made). A site that builds its model afresh for every message passes the round, or every round
            would train on the same batches.
        unlabeled : numpy.ndarray, optional
            Unlabeled inputs for the consistency loss (with ``consistency > 0``; ignored otherwise).
        """
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if len(X) != len(y):
            raise ConfigError(f"fit got {len(X)} inputs but {len(y)} labels")
        if len(y) == 0:
            return float("nan")
        if y.min() < 0 or y.max() >= self.n_classes:
            raise ConfigError(f"labels must lie in [0, {self.n_classes - 1}], got range [{y.min()}, {y.max()}]")
        epochs = self.epochs if epochs is None else int(epochs)
        batches = -(-len(y) // self.batch_size)
        epochs = max(epochs, -(-self.min_steps // batches))
        total_steps = self.local_steps or epochs * batches
        module = self.module
        module.train()
        anchor = [p.detach().clone() for p in module.parameters()] if proximal_mu > 0 else None
        opt = self._optimizer(self.lr if lr is None else float(lr))
        sched = None
        if self.schedule == "onecycle" and total_steps > 1:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"],
                                                        total_steps=total_steps, pct_start=0.3)
        scale = None
        if self.restricted_softmax < 1:  # FedRS: classes this client has no label of are damped
            scale = torch.full((self.n_classes,), self.restricted_softmax)
            scale[torch.as_tensor(np.unique(y))] = 1.0
        weight = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)
        seed = fit_seed(self.seed, self._fits if draw is None else int(draw))
        gen = torch.Generator().manual_seed(seed)
        self._fits += 1
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        if hasattr(module, "observe_inputs"):  # input standardisation from the first labels (ConvNet)
            module.observe_inputs(Xt)
        Xu = gen_u = None
        if self.consistency > 0 and unlabeled is not None and len(unlabeled):
            Xu = torch.from_numpy(np.ascontiguousarray(unlabeled, dtype=np.float32))
            gen_u = torch.Generator().manual_seed(seed + 1)  # its own stream: the labeled batches stay the same
        total, count = 0.0, 0
        # training-time dropout draws from torch's global generator: seed it for this fit only,
        # so the same seed gives the same weights whatever else used torch's RNG in between
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for idx in self._batch_indices(len(yt), epochs, gen):
                opt.zero_grad()
                logits = module(augment_images(Xt[idx], self.augment, gen))
                if scale is not None:
                    logits = logits * scale
                loss = F.cross_entropy(logits, yt[idx], weight=weight)
                if Xu is not None:
                    loss = loss + self.consistency * self._consistency_loss(Xu, UNLABELED_RATIO * len(idx), gen_u)
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(module.parameters(), anchor))
                    loss = loss + 0.5 * proximal_mu * prox
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        module.eval()
        return total / max(count, 1)

    def _consistency_loss(self, Xu: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        """FixMatch's unlabeled loss on ``n`` images drawn from ``Xu``: cross-entropy of the strong view's
        logits with the weak view's confident classes, averaged over all ``n`` (unconfident ones count 0)."""
        module = self.module
        pick = torch.randint(0, len(Xu), (n,), generator=gen)
        xu = Xu[pick]
        module.eval()
        with torch.no_grad():
            probs = F.softmax(module(augment_images(xu, self.augment, gen)), dim=1)
        module.train()
        confidence, target = probs.max(dim=1)
        mask = (confidence >= self.consistency_threshold).float()
        if not bool(mask.any()):
            return torch.zeros(())
        strong = module(strong_augment(xu, self.augment, gen))
        return (F.cross_entropy(strong, target, reduction="none") * mask).mean()

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        params = self.module.parameters()
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum, nesterov=self.momentum > 0,
                                   weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay)

    def _batch_indices(self, n: int, epochs: int, gen: torch.Generator):
        """Index batches of one fit: ``epochs`` shuffled passes, or ``local_steps`` batches from shuffled passes."""
        if not self.local_steps:
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen)
                for start in range(0, n, self.batch_size):
                    yield order[start : start + self.batch_size]
            return
        order, pos = torch.randperm(n, generator=gen), 0
        for _ in range(self.local_steps):
            if pos >= n:
                order, pos = torch.randperm(n, generator=gen), 0
            yield order[pos : pos + self.batch_size]
            pos += self.batch_size

    def buffer_keys(self) -> list[str]:
        """Names of the state's buffers (BatchNorm statistics): a federation averages them, no server
        optimiser steps on them."""
        return [name for name, _ in self.module.named_buffers()]

    # --------------------------------------------------------------- inference
    def _batches(self, X: np.ndarray):
        for start in range(0, len(X), self.predict_batch_size):  # convert per batch: no copy of the pool
            yield torch.from_numpy(np.ascontiguousarray(X[start : start + self.predict_batch_size], dtype=np.float32))

    def forward(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(n, C)`` and embeddings ``(n, d)`` of inputs ``X`` from one pass."""
        self.module.eval()
        probs, embs = [], []
        with torch.inference_mode():
            for xb in self._batches(X):
                emb = self.module.embed(xb)
                probs.append(F.softmax(self.module.head(emb), dim=1).numpy())
                embs.append(emb.numpy())
        if not probs:
            d = self.module.head.in_features
            return np.zeros((0, self.n_classes), np.float32), np.zeros((0, d), np.float32)
        return np.concatenate(probs), np.concatenate(embs)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities of inputs ``X``, shape (n, C)."""
        self.module.eval()
        with torch.inference_mode():
            out = [F.softmax(self.module(xb), dim=1).numpy() for xb in self._batches(X)]
        return np.concatenate(out) if out else np.zeros((0, self.n_classes), np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Most probable class per sample of ``X``."""
        return self.predict_proba(X).argmax(axis=1)

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """``(mean cross-entropy loss, accuracy)`` on inputs ``X`` with labels ``y``."""
        probs = self.predict_proba(X)
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if len(y) == 0:
            return float("nan"), float("nan")
        loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
        return loss, float((probs.argmax(axis=1) == y).mean())

    def sample_probs(self, X: np.ndarray, n_samples: int, seed: int | None = None) -> np.ndarray:
        """MC-dropout probabilities of inputs ``X``, shape ``(n_samples, n, C)`` (Gal &
        Ghahramani 2016); the masks are drawn from ``seed`` (default the classifier's seed).

        The embedding is computed once (dropout sits only before the head), then
        ``n_samples`` dropout masks are drawn on it: exact for these networks and
        ``n_samples`` times cheaper than full passes.
        """
        if n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
        self.module.eval()
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        rate = float(self.module.dropout.p) if isinstance(getattr(self.module, "dropout", None), nn.Dropout) else 0.0
        out = np.empty((n_samples, len(X), self.n_classes), dtype=np.float32)
        pos = 0
        with torch.inference_mode():
            for xb in self._batches(X):
                emb = self.module.embed(xb)
                for t in range(n_samples):
                    if rate > 0:
                        mask = (torch.rand(emb.shape, generator=gen) >= rate).to(emb.dtype) / (1 - rate)
                        logits = self.module.head(emb * mask)
                    else:
                        logits = self.module.head(emb)
                    out[t, pos : pos + len(xb)] = F.softmax(logits, dim=1).numpy()
                pos += len(xb)
        return out
