"""A sample as a PNG for the people who label it (stdlib zlib; no image library).

Inputs come as the models see them: images ``(C, H, W)`` or ``(H, W)`` floats in
[0, 1] (1 or 3 channels). The PNG is upscaled by pixel repetition so a 28x28 scan is
readable without the browser smoothing it.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from fedal.exceptions import ConfigError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def to_png(image: np.ndarray, *, scale: int = 4) -> bytes:
    """PNG bytes of one image.

    Parameters
    ----------
    image : array
        ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)``; floats in [0, 1] or uint8.
    scale : int
        Upscaling factor (nearest neighbour), 1..16.
    """
    if not 1 <= scale <= 16:
        raise ConfigError(f"PNG scale must be in 1..16, got {scale}")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a.transpose(1, 2, 0)
    elif a.ndim == 2:
        a = a[:, :, None]
    else:
        raise ConfigError(f"cannot draw an array of shape {a.shape} as an image; expected (H, W) or (C, H, W) with C in 1, 3")
    if a.dtype != np.uint8:
        a = np.clip(np.nan_to_num(a.astype(np.float64)), 0.0, 1.0)
        a = np.rint(a * 255).astype(np.uint8)
    if scale > 1:
        a = a.repeat(scale, axis=0).repeat(scale, axis=1)
    height, width, channels = a.shape
    color_type = 0 if channels == 1 else 2  # greyscale or RGB, 8 bits each
    rows = np.concatenate([np.zeros((height, 1), np.uint8), a.reshape(height, width * channels)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


def sample_png(data, sample_id: int) -> bytes:
    """PNG of pool sample ``sample_id`` of a site's ``data`` (:class:`fedal.data.LocalData`) for people: a folder
    site's own file at a size a person reads (``data.view``), else the model's input enlarged 4 times."""
    if getattr(data, "view", None) is not None:
        return to_png(data.view(int(sample_id)), scale=1)
    return to_png(data.X_pool[int(sample_id)], scale=4)
