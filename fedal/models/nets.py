"""Small networks that expose what active learning needs.

Each network is ``head(dropout(embed(x)))``: ``embed`` gives the penultimate-layer
embedding (core-set, BADGE, density), ``head`` is the final linear layer (expected
gradient length and BADGE use its gradient), and the dropout before the head gives
MC-dropout samples (BALD, query-by-committee).
"""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a dense layer for 28x28 images with 1 or 3 channels.

    Parameters
    ----------
    in_channels : int
        1 (grey) or 3 (RGB).
    n_classes : int
        Number of output classes.
    embedding_dim : int
        Size of the penultimate layer.
    dropout : float
        Dropout rate before the head (also used for MC dropout).
    """

    def __init__(self, in_channels: int, n_classes: int, embedding_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"SmallCNN takes 1 or 3 input channels, got {in_channels}")
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, embedding_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embedding_dim, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding of images ``x`` (n, C, 28, 28), shape (n, embedding_dim)."""
        if x.shape[-3:] != (self.in_channels, 28, 28):
            raise ValueError(
                f"SmallCNN expects inputs of shape (n, {self.in_channels}, 28, 28), got "
                f"{tuple(x.shape)}; load images with fedal.data (NCHW, scaled to [0, 1])."
            )
        return self.fc(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of images ``x`` (n, C, 28, 28), shape (n, n_classes)."""
        return self.head(self.dropout(self.embed(x)))


class MLP(nn.Module):
    """A multi-layer perceptron for tabular features.

    Parameters
    ----------
    in_features : int
        Number of input features.
    n_classes : int
        Number of output classes.
    hidden : tuple of int
        Sizes of the hidden layers; the last one is the embedding size.
    dropout : float
        Dropout rate before the head.
    """

    def __init__(self, in_features: int, n_classes: int, hidden: tuple[int, ...] = (128, 64), dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.in_features = in_features
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding of inputs ``x`` (n, ...; flattened), shape (n, hidden[-1])."""
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} features per sample, got {x.shape[1]}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of inputs ``x`` (n, in_features), shape (n, n_classes)."""
        return self.head(self.dropout(self.embed(x)))
