"""One image file of a site, read into a ``uint8`` array at the run's input size.

A hospital's folder holds raster files (PNG, JPEG, TIFF, BMP: read with Pillow) and DICOM files (read
with pydicom; often without a suffix in a PACS export, recognised by their ``DICM`` preamble).
:func:`read_image` brings either to ``(channels, size, size)`` ``uint8`` by one stated rule, or refuses the
file with :class:`ImageRefused`, whose ``reason`` names the problem and the fix; it never returns a
half-read image. The folder scan, the cache and the pool are built on top of it
(:mod:`fedal.imagefolder`).

The grey levels a person sees are the ones kept:

- DICOM grey images (MONOCHROME1/2) go through the Modality LUT (rescale slope and intercept, or the
  Modality LUT Sequence), then the VOI LUT Sequence if the file has one, else the file's first window
  (Window Center / Width, LINEAR, LINEAR_EXACT or SIGMOID) mapped to 0..255, else the image's own
  min..max mapped to 0..255; MONOCHROME1 is inverted (``255 - x``) so that a high value is bright.
- DICOM colour images (RGB; YBR_FULL and YBR_FULL_422 converted to RGB by pydicom; PALETTE COLOR through
  its lookup table) are scaled from their bit depth (``BitsStored``) to 0..255.
- Raster files of 8 bits per sample keep their values; 16-bit, 32-bit and float grey images (modes
  ``I;16``, ``I``, ``F`` ...) are mapped from the image's own min..max to 0..255.
- DICOM padding pixels (Pixel Padding Value, up to Pixel Padding Range Limit: the air outside a CT's
  field of view) are left out of the min..max and read as black.
- A constant image (min equal to max where min..max is the rule) reads as all zeros.

Nothing is downloaded and nothing is printed: pydicom's and Pillow's warnings about a file are silenced
while it is read (their text may quote a tag's value), and a file's path is only in the message of the
exception, which stays on the site.
"""
from __future__ import annotations

import hashlib
import numbers
import os
import warnings
from pathlib import Path

import numpy as np

from fedal.config import RESIZE_POLICIES  # the run's resize-policy values: one list
from fedal.exceptions import ConfigError, DataFileError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""Suffixes (lower case) of the raster files read through Pillow."""

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
"""Suffixes (lower case) of DICOM files; a file with the ``DICM`` preamble is DICOM whatever its name."""


MIN_SIZE = 8
"""The smallest input size :func:`read_image` accepts."""

_PREAMBLE = 128  # bytes before b"DICM" in a DICOM Part 10 file
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as Pillow's RGB -> L


class ImageRefused(DataFileError):
    """An image file that :func:`read_image` cannot read faithfully.

    The message is ``"<path>: <reason>"``; it names a file of the site and stays on the site.

    Parameters
    ----------
    path : path
        The file refused.
    reason : str
        Why, in a few words, with what to do about it (e.g. what to install or how to export the file).
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across processes despite the two-argument constructor
        return type(self), (self.path, self.reason)


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with the DICOM Part 10 preamble: 128 bytes, then ``b"DICM"``.

    Reads at most 132 bytes. A file that cannot be opened, or is shorter, is not DICOM by this test
    (files written without the preamble are recognised by their ``.dcm`` / ``.dicom`` suffix instead).

    Parameters
    ----------
    path : path
        The file to look at.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(_PREAMBLE + 4)
    except OSError:
        return False
    return len(head) == _PREAMBLE + 4 and head[_PREAMBLE:] == b"DICM"


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether :func:`read_image` should be asked to read ``path``.

    True for the raster suffixes :data:`IMAGE_SUFFIXES` and the DICOM suffixes :data:`DICOM_SUFFIXES`
    (case-insensitive), and for any other file that starts with the DICOM preamble (:func:`is_dicom`:
    PACS exports often name files by their UID, without a suffix). Reads at most 132 bytes, and none
    when the suffix decides. That ``read_image`` then succeeds is not promised.

    Parameters
    ----------
    path : path
        The file to look at.
    """
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES:
        return True
    return is_dicom(path)


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of the file's bytes, in hex: the content identity of a sample (streamed, any file size).

    Parameters
    ----------
    path : path
        The file to hash.
    """
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_image(path: str | os.PathLike, size: int, channels: int, policy: str = "pad") -> np.ndarray:
    """Read one image file into a ``uint8`` array of shape ``(channels, size, size)``.

    DICOM (a ``.dcm`` / ``.dicom`` suffix or the ``DICM`` preamble) is read with pydicom, anything else
    with Pillow; the grey levels follow the rules of this module's docstring. Then:

    - frames: a multi-frame DICOM gives its middle frame (index ``frames // 2``); a multi-page TIFF (or
      animated PNG) its first page. EXIF orientation of raster files is applied.
    - alpha (RGBA, LA, a palette with transparency) is composited on black: a transparent pixel is
      black, as the padding is.
    - channels: ``1`` takes the luminance of a colour image (``0.299 R + 0.587 G + 0.114 B``); ``3``
      repeats a grey image three times.
    - size, by ``policy``: ``"pad"`` resizes so that the longer side is ``size`` (aspect kept) and pads
      with black (zeros), centred, to a square; ``"crop"`` resizes so that the shorter side is ``size``
      and keeps the centre square. Resampling is Pillow's LANCZOS (antialiased when shrinking) on
      floating-point values, then rounded and clipped to 0..255.

    Parameters
    ----------
    path : path
        The image file.
    size : int
        Side of the square output in pixels (at least :data:`MIN_SIZE`), the run's input size.
    channels : int
        ``1`` (grey) or ``3`` (RGB).
    policy : str
        ``"pad"`` or ``"crop"`` (:data:`RESIZE_POLICIES`).

    Returns
    -------
    numpy.ndarray
        ``uint8``, C-contiguous, shape ``(channels, size, size)``.

    Raises
    ------
    ImageRefused
        The file cannot be read faithfully: missing or unreadable, not an image, truncated or corrupt,
        a compressed DICOM transfer syntax that nothing installed decodes (the reason names it and what
        to install), no pixel data, an unsupported photometric interpretation.
    ConfigError
        ``size``, ``channels`` or ``policy`` is out of range.
    """
    _check_arguments(size, channels, policy)
    path = Path(path)
    if not path.is_file():
        raise ImageRefused(path, "no such file (moved or deleted?)" if not path.exists() else
                           "not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a warning's text may quote a tag value: nothing is printed
        if path.suffix.lower() in DICOM_SUFFIXES or is_dicom(path):
            image = _read_dicom(path)
        else:
            image = _read_raster(path, size)
    image = _to_channels(image, channels)
    return _to_square(image, size, policy)


def _check_arguments(size, channels, policy) -> None:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < MIN_SIZE:
        raise ConfigError(f"image size {size!r} is not an integer >= {MIN_SIZE}: give the run's input size "
                          "in pixels, e.g. 28, 64, 128 or 224")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ConfigError(f"channels {channels!r} is not 1 or 3: give 1 for grey images, 3 for RGB")
    if policy not in RESIZE_POLICIES:
        raise ConfigError(f"resize policy {policy!r} is not one of {', '.join(RESIZE_POLICIES)}: 'pad' keeps "
                          "the whole image with black borders, 'crop' keeps its centre square")


def _io_reason(exc: OSError) -> str:
    return f"cannot be read ({exc.strerror or exc}): check the file's permissions and the disk"


# --------------------------------------------------------------------------- raster files (Pillow)

def _read_raster(path: Path, size: int) -> np.ndarray:
    """Grey ``(H, W)`` or RGB ``(H, W, 3)`` float32 in 0..255."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.format == "JPEG" and img.mode in ("L", "RGB"):
                img.draft(img.mode, (size, size))  # decode a large JPEG at a reduced scale, still >= size
            return _raster_values(path, ImageOps.exif_transpose(img))
    except ImageRefused:
        raise
    except UnidentifiedImageError:
        raise ImageRefused(path, "not an image file Pillow recognises (corrupt, or another format with an "
                                 "image suffix): re-export it as PNG, JPEG or TIFF") from None
    except Image.DecompressionBombError as exc:
        raise ImageRefused(path, f"too large to decode safely ({exc}): downscale it before adding it, or "
                                 "raise PIL.Image.MAX_IMAGE_PIXELS in the site's own code") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise ImageRefused(path, _io_reason(exc)) from None
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageRefused(path, f"truncated or corrupt image ({_short(exc)}): re-export "
                                 "or copy the file again") from None


def _raster_values(path: Path, img) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        img, mode = img.convert("L"), "L"
    elif mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
    elif mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    elif mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiplied, then composited below
        mode = mode.upper()
        img = img.convert(mode)
    elif mode not in ("L", "LA", "RGB", "RGBA") and mode.startswith(("RGB", "CMYK", "YCbCr", "LAB", "HSV")):
        img, mode = img.convert("RGB"), "RGB"
    if mode in ("L", "LA", "RGB", "RGBA"):
        arr = np.asarray(img, dtype=np.float32)
        if mode in ("LA", "RGBA"):  # composite on black
            arr = arr[..., :-1] * (arr[..., -1:] / 255.0)
            if mode == "LA":
                arr = arr[..., 0]
        return arr
    arr = np.asarray(img)  # I;16*, I, F, ...: one sample per pixel, scaled by its own min..max
    if arr.ndim != 2 or arr.dtype.kind not in "uif":
        raise ImageRefused(path, f"image mode {mode} is not supported: re-export it as 8- or 16-bit grey or RGB")
    return _stretch(arr)


# --------------------------------------------------------------------------- DICOM files (pydicom)

def _read_dicom(path: Path) -> np.ndarray:
    """Grey ``(H, W)`` or RGB ``(H, W, 3)`` float32 in 0..255."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=True)
    except (PermissionError, IsADirectoryError) as exc:
        raise ImageRefused(path, _io_reason(exc)) from None
    except MemoryError:
        raise
    except InvalidDicomError as exc:
        raise ImageRefused(path, f"not a DICOM file ({exc}): remove it from the folder or re-export it") from None
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise ImageRefused(path, f"not a readable DICOM file ({_short(exc)}): re-export it "
                                 "from the PACS or copy it again") from None
    try:
        return _dicom_values(path, ds)
    except ImageRefused:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageRefused(path, _decode_reason(ds, exc)) from None


def _dicom_values(path: Path, ds) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, pixel_array
    from pydicom.uid import UID

    sop = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", {}), "MediaStorageSOPClassUID", ""))
    if sop == _DICOMDIR_SOP or "DirectoryRecordSequence" in ds:
        raise ImageRefused(path, "a DICOMDIR (an index of other files), not an image: the images are the "
                                 "files it lists")
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        what = UID(sop).name if sop else "a DICOM object"
        raise ImageRefused(path, f"no pixel data ({what}, not an image): leave it out of the image folder")
    missing = [key for key in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if not ds.get(key)]
    if missing:
        raise ImageRefused(path, f"pixel data without the image header to read it ({', '.join(missing)} "
                                 "missing): re-export the image from the PACS")
    _set_missing_transfer_syntax(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _PHOTOMETRIC:
        raise ImageRefused(path, f"photometric interpretation {photometric or '(missing)'} is not supported "
                                 f"(only {', '.join(sorted(_PHOTOMETRIC))}): export the image as MONOCHROME2 "
                                 "or RGB")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = pixel_array(ds, index=frames // 2) if frames > 1 else pixel_array(ds)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    expected = 2 if samples == 1 else 3
    if arr.ndim != expected or (samples > 1 and arr.shape[-1] != samples):
        raise ImageRefused(path, f"decoded pixel data has shape {arr.shape}, not one frame of {samples} "
                                 "sample(s) per pixel: the file's image header is inconsistent; re-export it")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return (rgb.astype(np.float32) * (255.0 / (2 ** bits - 1))).clip(0, 255)
    if samples == 3:  # RGB (pydicom has converted YBR_FULL / YBR_FULL_422; decoders give RGB for ICT / RCT)
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
        return (arr.astype(np.float32) * np.float32(255.0 / (2 ** bits - 1))).clip(0, 255)
    if samples != 1:
        raise ImageRefused(path, f"{samples} samples per pixel with {photometric}: export as MONOCHROME2 or RGB")
    padding = _padding_mask(ds, arr)
    grey = _dicom_grey(ds, arr, padding)
    if photometric == "MONOCHROME1":
        grey = 255.0 - grey
    if padding is not None:
        grey[padding] = 0.0
    return grey


_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT",
                          "YBR_RCT", "PALETTE COLOR"})


def _set_missing_transfer_syntax(ds) -> None:
    """Files written without a file meta header: the syntax pydicom read the dataset in (never compressed)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _padding_mask(ds, arr: np.ndarray):
    """The pixels outside the scanned field (Pixel Padding Value, up to its Range Limit), or None."""
    value = ds.get("PixelPaddingValue")
    if not isinstance(value, numbers.Integral):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if isinstance(limit, numbers.Integral):
        mask = (arr >= min(value, limit)) & (arr <= max(value, limit))
    else:
        mask = arr == value
    return mask if mask.any() and not mask.all() else None


def _dicom_grey(ds, arr: np.ndarray, padding=None) -> np.ndarray:
    """Modality LUT, then the VOI LUT or the first window, else min..max (padding left out): float32 in 0..255."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = apply_modality_lut(arr, ds)
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        first, entries = int(voi[0].LUTDescriptor[1]), int(voi[0].LUTDescriptor[0]) or 2 ** 16
        lut = apply_voi(np.arange(first, first + entries), ds).astype(np.float64)
        lo, hi = float(lut.min()), float(lut.max())
        mapped = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
        return _to_range(mapped, lo, hi)
    window = _window(ds)
    if window is not None:
        return _apply_window(values, *window)
    return _stretch(values if padding is None else np.where(padding, np.nan, values))


def _window(ds):
    """``(center, width, function)`` of the file's first window, or None when it has none that is valid."""
    def first(key):
        elem = ds[key] if key in ds else None
        if elem is None or elem.value in (None, ""):
            return None
        value = elem.value[0] if elem.VM > 1 else elem.value
        return float(value)

    center, width = first("WindowCenter"), first("WindowWidth")
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if (function == "LINEAR" and width < 1) or width <= 0:
        return None
    return center, width, function


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 and C.11.2.1.3 with an output range of 0..255."""
    x = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        out = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    else:
        if function == "LINEAR":
            center, width = center - 0.5, width - 1.0
        if width == 0:  # LINEAR with width 1: a threshold
            out = np.where(x > center, 255.0, 0.0)
        else:
            out = ((x - center) / width + 0.5) * 255.0
    return np.nan_to_num(out, nan=0.0).clip(0, 255).astype(np.float32)


def _decode_reason(ds, exc: Exception) -> str:
    """Why the pixel data would not decode, naming the transfer syntax and what to install."""
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed:
        what = f"compressed transfer syntax {syntax.name} ({syntax})"
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            return f"{what}: pydicom has no decoder for it; export the image uncompressed"
        missing = [dep.split(" - requires ", 1)[-1] for dep in decoder.missing_dependencies]
        tried = ", ".join(decoder.available_plugins)
        if decoder.available_plugins:
            detail = f"pydicom could not decode it with {tried} ({_short(exc)})"
        else:
            detail = "pydicom cannot decode it with what is installed"
        fix = f"install {' or '.join(missing)}" if missing else "re-export it"
        return f"{what}: {detail}; {fix}, or export uncompressed"
    return (f"pixel data cannot be decoded ({_short(exc)}): the file is truncated or its "
            "image header is inconsistent; re-export it")


def _short(exc: Exception) -> str:
    """An exception's text on one line, without pydicom's preamble about its plugins."""
    text = " ".join(str(exc).split())
    text = text.replace("Unable to decode as exceptions were raised by all available plugins: ", "")
    return f"{type(exc).__name__}: {text[:300]}"


# --------------------------------------------------------------------------- values, channels, size

def _stretch(values: np.ndarray) -> np.ndarray:
    """The image's own finite min..max mapped to 0..255 (a constant image to 0), float32."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape, dtype=np.float32)
    return _to_range(np.where(finite, x, np.nan), float(x[finite].min()), float(x[finite].max()))


def _to_range(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    out = (np.asarray(x, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.nan_to_num(out, nan=0.0).clip(0, 255).astype(np.float32)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` -> ``(channels, H, W)`` float32."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        return np.repeat(image[None], channels, axis=0)
    if channels == 1:
        return (image @ _LUMA)[None]
    return np.moveaxis(image, -1, 0)


def _to_square(image: np.ndarray, size: int, policy: str) -> np.ndarray:
    """``(C, H, W)`` float in 0..255 -> ``(C, size, size)`` uint8 by ``policy`` (see :func:`read_image`)."""
    from PIL import Image

    _, height, width = image.shape
    if policy == "crop":
        side = min(height, width)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        target, offset = (size, size), (0, 0)
    else:
        scale = size / max(height, width)
        target = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
        box = (0, 0, width, height)
        offset = ((size - target[0]) // 2, (size - target[1]) // 2)
    out = np.zeros((image.shape[0], size, size), dtype=np.uint8)
    left, top = offset
    for c, plane in enumerate(image):
        if target == (width, height) and box == (0, 0, width, height):
            resized = plane
        else:
            resized = np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(
                target, Image.Resampling.LANCZOS, box=box))
        out[c, top:top + target[1], left:left + target[0]] = np.rint(resized).clip(0, 255).astype(np.uint8)
    return out
