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
    """Two conv blocks and a dense layer for 28x28 images (or larger, pooled to 28x28's maps) with 1 or 3 channels.

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
        # larger inputs are pooled to the 7 x 7 maps of a 28 x 28 input (at 28 x 28 the pooling changes nothing;
        # it holds no weight, so the model's keys are those of the 28 x 28 network)
        self.features.append(nn.AdaptiveAvgPool2d((7, 7)))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, embedding_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embedding_dim, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding of images ``x`` (n, C, 28, 28), shape (n, embedding_dim)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < 28:
            raise ValueError(
                f"SmallCNN expects inputs of shape (n, {self.in_channels}, S, S) with S >= 28, got "
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


class ScaledWSConv2d(nn.Conv2d):
    """A convolution with scaled weight standardisation (Brock et al., ICLR 2021, NF-ResNets).

    Each filter is standardised to zero mean and variance ``1 / fan_in`` and scaled by a
    learned gain and the ReLU's gain, so activations keep unit scale through the layers
    without any statistic of the batch: what a federation of one-class batches needs.

    Parameters
    ----------
    in_channels, out_channels, kernel_size : int
        As :class:`torch.nn.Conv2d`; further keyword arguments go to it too (a bias by default).
    """

    #: ``sqrt(2 / (1 - 1/pi))``: keeps unit variance through a ReLU
    RELU_GAIN = 1.7128585504496627

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs):
        kwargs.setdefault("bias", True)
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))

    def standardized_weight(self) -> torch.Tensor:
        """The filters the convolution applies: standardised, scaled by the gain and the ReLU's gain."""
        w = self.weight
        fan_in = w[0].numel()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) * torch.rsqrt(var * fan_in + 1e-4) * self.gain * self.RELU_GAIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of ``x`` (n, C, H, W) with the standardised filters."""
        return nn.functional.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding)


#: ``ConvNet``'s normalisations (:data:`fedal.config.NORMS`): name -> what it is
NORMS = {
    "batch": "BatchNorm after each convolution (trains best on mixed batches; its batch statistics suffer "
             "when a client's batch holds one or two classes)",
    "group": "GroupNorm (8 groups) on weight-standardised convolutions, the last one plain: no batch statistic",
    "none": "no normalisation layer: scaled weight-standardised convolutions (NF-nets), no batch statistic",
}


class ConvNet(nn.Module):
    """Five 3x3 convolutions (32-32-64-64-128), global average pooling and a linear head, for small images.

    A network that learns well from few labels on 28x28 images when trained with
    augmentation and SGD or Adam with a schedule (see :class:`~fedal.models.TorchClassifier`);
    ``norm`` chooses how its activations are normalised (:data:`NORMS`).

    Parameters
    ----------
    in_channels : int
        Input channels (1 or 3).
    n_classes : int
        Number of output classes.
    norm : {"batch", "group", "none"}
        The normalisation (:data:`NORMS`).
    widths : tuple of int
        Channels of the five convolutions; max-pooling follows the 2nd and 4th.
    dropout : float
        Dropout before the head (also used for MC dropout).
    input_size : int
        The side of the input images: above 28 the first convolution strides by ``input_size // 28``.
    """

    def __init__(self, in_channels: int, n_classes: int, norm: str = "batch",
                 widths: tuple[int, ...] = (32, 32, 64, 64, 128), dropout: float = 0.1, input_size: int = 28):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        if in_channels < 1:
            raise ValueError(f"ConvNet takes at least 1 input channel, got {in_channels}")
        self.in_channels = in_channels
        self.norm = norm
        layers: list[nn.Module] = []
        width = in_channels
        # larger inputs: the first convolution strides by size / 28 (its kernel 2 x stride + 1 wide, so no pixel is
        # skipped), and the rest of the network sees maps of about 28 x 28's size (28 x 28: a 3 x 3 convolution)
        stride = max(1, int(input_size) // 28)
        for i, out in enumerate(widths):
            last = i == len(widths) - 1
            conv = dict(kernel_size=3, padding=1) if i or stride == 1 else dict(
                kernel_size=2 * stride + 1, stride=stride, padding=stride)
            if norm == "batch":
                layers += [nn.Conv2d(width, out, bias=False, **conv), nn.BatchNorm2d(out)]
            elif norm == "group" and not last:  # GroupNorm just before the pooling would remove each map's mean
                layers += [WSConv2d(width, out, bias=False, **conv), nn.GroupNorm(min(8, out), out)]
            else:
                layers.append(ScaledWSConv2d(width, out, **conv))
            layers.append(nn.ReLU())
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
            width = out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, n_classes)
        # per-channel mean and spread of the inputs, set from the first labels it trains on (buffers: a federation
        # averages them over its sites, like any statistic); until then the inputs pass as they are
        self.register_buffer("input_mean", torch.zeros(in_channels))
        self.register_buffer("input_std", torch.ones(in_channels))
        self.register_buffer("input_ready", torch.zeros(()))

    @torch.no_grad()
    def observe_inputs(self, x: torch.Tensor) -> None:
        """Take the per-channel mean and standard deviation of images ``x`` as the input standardisation,
        once (later calls keep the first, or the federation's mean of them)."""
        if float(self.input_ready) > 0 or len(x) == 0:
            return
        self.input_mean.copy_(x.mean(dim=(0, 2, 3)))
        self.input_std.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-3) if x[:, 0].numel() > 1 else torch.ones_like(self.input_std))
        self.input_ready.fill_(1.0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features of images ``x`` (n, C, H, W), shape (n, widths[-1])."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ConvNet expects inputs of shape (n, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                             "load images with fedal.data (NCHW, scaled to [0, 1]).")
        x = (x - self.input_mean.view(1, -1, 1, 1)) / self.input_std.view(1, -1, 1, 1)
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of images ``x``, shape (n, n_classes)."""
        return self.head(self.dropout(self.embed(x)))


class WSConv2d(nn.Conv2d):
    """A convolution with weight standardisation (Qiao et al., 2019), for use before GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of ``x`` (n, C, H, W) with each filter standardised to zero mean and unit variance."""
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (self.weight - mean) * torch.rsqrt(var + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)
