"""One image file of a site read at the run's input size (fedal.imagefiles), on real files.

DICOM: the test files that ship in pydicom's wheel (CT, MR, big endian, RLE, JPEG, JPEG 2000, colour,
multi-frame, and objects that are not images), read from the installed package's folder, never
downloaded. Raster: PNG, JPEG, TIFF and BMP files written with Pillow.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from fedal.exceptions import ConfigError, DataFileError
from fedal.imagefiles import (
    IMAGE_SUFFIXES,
    RESIZE_POLICIES,
    ImageRefused,
    file_digest,
    is_dicom,
    is_image_file,
    read_image,
)

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def dicom_file(name: str) -> Path:
    path = PYDICOM_FILES / name
    if not path.is_file():  # pragma: no cover - the wheel ships them
        pytest.skip(f"{name} is not in pydicom's wheel at {PYDICOM_FILES}")
    return path


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# --------------------------------------------------------------------------- every DICOM test file


def test_every_pydicom_test_file_reads_or_is_refused_by_name():
    files = sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file())
    assert len(files) > 100, f"pydicom's test files not found under {PYDICOM_FILES}"
    read, refused, failures = [], {}, []
    for path in files:
        name = str(path.relative_to(PYDICOM_FILES))
        try:
            image = read_image(path, 16, 3, "pad")
        except ImageRefused as exc:
            if not exc.reason.strip() or exc.path != path:
                failures.append(f"{name}: refused without a reason or with another path")
            refused[name] = exc.reason
            continue
        except Exception as exc:  # the contract: ImageRefused or an image, nothing else
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if image.shape != (3, 16, 16) or image.dtype != np.uint8 or not image.flags.c_contiguous:
            failures.append(f"{name}: shape {image.shape}, dtype {image.dtype}")
        read.append(name)
    summary = f"{len(read)} read, {len(refused)} refused of {len(files)}"
    assert not failures, f"{summary}; failures:\n" + "\n".join(failures)
    dicom_read = [name for name in read if is_dicom(PYDICOM_FILES / name) or name.endswith(".dcm")]
    assert len(dicom_read) >= 60, summary
    # the refusals name the problem
    assert "no pixel data" in refused["rtplan.dcm"], refused["rtplan.dcm"]
    assert "DICOMDIR" in refused["dicomdirtests/DICOMDIR"]
    assert "truncated" in refused["MR_truncated.dcm"]
    jpeg_ls = refused["MR_small_jpeg_ls_lossless.dcm"]  # nothing installed here decodes JPEG-LS
    assert "JPEG-LS" in jpeg_ls and "1.2.840.10008.1.2.4.80" in jpeg_ls and "install" in jpeg_ls, jpeg_ls


def test_refusal_is_a_data_file_error_and_pickles():
    with pytest.raises(DataFileError):
        read_image(dicom_file("rtplan.dcm"), 16, 1)
    exc = ImageRefused("/site/a.dcm", "no pixel data")
    again = pickle.loads(pickle.dumps(exc))
    assert (again.path, again.reason, str(again)) == (exc.path, exc.reason, str(exc))


# --------------------------------------------------------------------------- specific DICOM files


def test_ct_with_rescale_reads_and_is_not_constant():
    ct = read_image(dicom_file("CT_small.dcm"), 64, 1)
    assert ct.shape == (1, 64, 64) and ct.dtype == np.uint8
    assert ct.std() > 20 and ct.max() > 200  # min..max of Hounsfield units (no window in the file)


def test_ct_padding_is_black_and_left_out_of_the_range(tmp_path):
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    pixels = ds.pixel_array.copy()
    pixels[:, :16] = -2000  # stored values outside the field of view
    ds.PixelData = pixels.tobytes()
    ds.PixelPaddingValue = -2000
    padded = tmp_path / "padded.dcm"
    ds.save_as(padded)
    got = read_image(padded, 128, 1)[0]  # 128 x 128 file at size 128: no resampling
    assert (got[:, :16] == 0).all()
    reference = read_image(dicom_file("CT_small.dcm"), 128, 1)[0]
    assert got[:, 16:].max() >= 250 and got[:, 16:].min() <= 5  # the body's own range, not -2000..max
    assert np.corrcoef(got[:, 16:].ravel(), reference[:, 16:].ravel())[0, 1] > 0.99


def test_mr_window_is_applied():
    path = dicom_file("MR_small.dcm")  # Window Center 600, Width 1600
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(float)
    center, width = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1
    expected = (((raw - center) / width + 0.5) * 255).clip(0, 255)
    got = read_image(path, 64, 1)[0]  # 64 x 64 file at size 64: no resampling
    assert diff(got, np.rint(expected)) <= 1


def test_big_endian_and_other_encodings_equal_the_little_endian_file():
    reference = read_image(dicom_file("MR_small.dcm"), 32, 1)
    for name in ("MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm"):
        assert diff(read_image(dicom_file(name), 32, 1), reference) <= 1, name


def test_rle_equals_the_uncompressed_file():
    assert diff(read_image(dicom_file("MR_small_RLE.dcm"), 32, 1), read_image(dicom_file("MR_small.dcm"), 32, 1)) <= 1
    assert diff(read_image(dicom_file("rtdose_rle.dcm"), 16, 1), read_image(dicom_file("rtdose.dcm"), 16, 1)) <= 1


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1.dcm"
    ds.save_as(inverted)
    original = read_image(dicom_file("MR_small.dcm"), 32, 1)
    assert diff(read_image(inverted, 32, 1), 255 - original) <= 1


def test_rgb_and_ybr_files_show_the_same_colours():
    reference = read_image(dicom_file("SC_rgb_rle.dcm"), 32, 3)  # colour bars, RGB, RLE
    assert reference.shape == (3, 32, 32)
    assert (reference[0] != reference[1]).any()  # colour, not grey
    for name, tolerance in (
        ("SC_rgb_rle_16bit.dcm", 1),  # 16 bits per sample
        ("SC_rgb_rle_32bit.dcm", 1),  # 32 bits per sample
        ("SC_ybr_full_422_uncompressed.dcm", 4),  # YBR_FULL_422 -> RGB
        ("SC_rgb_dcmtk_+eb+cr.dcm", 4),  # JPEG baseline, RGB (Pillow decodes it)
    ):
        assert diff(read_image(dicom_file(name), 32, 3), reference) <= tolerance, name
    ybr_jpeg = read_image(dicom_file("SC_rgb_dcmtk_+eb+cy+n1.dcm"), 32, 3)  # JPEG of YBR_FULL: lossy chroma
    assert np.abs(ybr_jpeg.astype(int) - reference).mean() < 3


def test_rgb_to_one_channel_is_luminance():
    rgb = read_image(dicom_file("SC_rgb_rle.dcm"), 100, 3).astype(float)  # 100 x 100: no resampling
    grey = read_image(dicom_file("SC_rgb_rle.dcm"), 100, 1)
    assert diff(grey[0], np.rint(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])) <= 1


def test_multi_frame_gives_the_middle_frame():
    path = dicom_file("SC_rgb_rle_2frame.dcm")  # frame 1 is frame 0 inverted
    frames = pydicom.dcmread(path).pixel_array
    assert frames.shape[0] == 2
    got = read_image(path, 100, 3)  # 100 x 100 at size 100: no resampling
    assert np.array_equal(got, np.moveaxis(frames[1], -1, 0))
    assert diff(got, 255 - read_image(dicom_file("SC_rgb_rle.dcm"), 100, 3)) <= 1


def test_palette_colour_reads_through_its_lookup_table():
    image = read_image(dicom_file("examples_palette.dcm"), 32, 3)
    assert image.std() > 0 and (image[0] != image[2]).any()


def test_jpeg_2000_reads_or_is_refused_naming_the_transfer_syntax():
    path = dicom_file("MR_small_jp2klossless.dcm")
    try:
        image = read_image(path, 32, 1)
    except ImageRefused as exc:
        assert "JPEG 2000" in exc.reason and "1.2.840.10008.1.2.4.90" in exc.reason, exc.reason
        assert "install" in exc.reason
    else:  # lossless: the same as the uncompressed file
        assert diff(image, read_image(dicom_file("MR_small.dcm"), 32, 1)) <= 1


def test_dicom_without_suffix_is_detected_by_its_preamble(tmp_path):
    plain = tmp_path / "1.2.840.113619.2.55.3"  # a PACS export names files by UID: suffix ".3"
    shutil.copyfile(dicom_file("CT_small.dcm"), plain)
    assert is_dicom(plain) and is_image_file(plain)
    assert np.array_equal(read_image(plain, 32, 1), read_image(dicom_file("CT_small.dcm"), 32, 1))
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    assert not is_dicom(text) and not is_image_file(text)
    assert not is_image_file(tmp_path / "missing-file")
    for suffix in IMAGE_SUFFIXES + (".dcm", ".DICOM", ".PNG"):
        assert is_image_file(tmp_path / f"x{suffix}")  # by suffix alone: nothing is read


def test_text_file_named_dcm_is_refused(tmp_path):
    fake = tmp_path / "scan.dcm"
    fake.write_text("Patient list exported from the RIS\n" * 20)
    with pytest.raises(ImageRefused) as info:
        read_image(fake, 32, 1)
    assert info.value.reason and info.value.path == fake


# --------------------------------------------------------------------------- raster files


def save(tmp_path: Path, name: str, image: Image.Image, **options) -> Path:
    path = tmp_path / name
    image.save(path, **options)
    return path


def gradient(width: int, height: int) -> np.ndarray:
    """Grey levels rising left to right, 0..255."""
    return np.tile(np.linspace(0, 255, width), (height, 1)).round().astype(np.uint8)


def test_constant_image_keeps_its_value_and_pads_with_black(tmp_path):
    path = save(tmp_path, "wide.png", Image.new("L", (300, 200), 100))  # 3:2 landscape
    padded = read_image(path, 30, 1, "pad")[0]  # resized to 30 x 20, 5 black rows above and below
    assert (padded[5:25] == 100).all()
    assert (padded[:5] == 0).all() and (padded[25:] == 0).all()
    cropped = read_image(path, 30, 1, "crop")[0]
    assert (cropped == 100).all()


def test_pad_keeps_the_aspect_of_a_tall_image_and_crop_its_centre(tmp_path):
    pixels = np.zeros((91, 37), dtype=np.uint8)
    pixels[:, :] = 200
    pixels[:30] = 50  # top third dark: crop cuts into it, pad keeps all of it
    path = save(tmp_path, "tall.png", Image.fromarray(pixels))
    padded = read_image(path, 64, 1, "pad")[0]
    columns = np.flatnonzero(padded.any(axis=0))
    assert padded.shape == (64, 64)
    assert abs(len(columns) - round(37 * 64 / 91)) <= 1  # width 26 of 64: aspect kept
    assert (padded[:, : columns[0]] == 0).all() and (padded[:, columns[-1] + 1:] == 0).all()
    assert abs(int(columns[0]) - (63 - int(columns[-1]))) <= 1  # centred
    assert padded[2, 32] == 50 and padded[60, 32] == 200
    cropped = read_image(path, 64, 1, "crop")[0]
    assert (cropped > 0).all()  # no border
    # crop keeps rows 27..63 of 91: the dark band is the top 3 rows of 37 -> about 5 of 64
    dark_rows = int((cropped[:, 32] < 125).sum())
    assert 3 <= dark_rows <= 7, dark_rows


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
def test_rgb_png_keeps_its_colours_and_gives_grey_on_one_channel(tmp_path, policy):
    path = save(tmp_path, "red.png", Image.new("RGB", (300, 200), (200, 10, 30)))
    rgb = read_image(path, 24, 3, policy)
    centre = rgb[:, 12, 12]
    assert centre.tolist() == [200, 10, 30]
    grey = read_image(path, 24, 1, policy)
    assert grey[0, 12, 12] == round(0.299 * 200 + 0.587 * 10 + 0.114 * 30)


def test_grey_to_three_channels_repeats_it(tmp_path):
    path = save(tmp_path, "g.png", Image.fromarray(gradient(64, 40)))
    image = read_image(path, 32, 3, "crop")
    assert np.array_equal(image[0], image[1]) and np.array_equal(image[1], image[2])


def test_alpha_is_composited_on_black(tmp_path):
    pixels = np.zeros((20, 20, 4), dtype=np.uint8)
    pixels[..., :3] = 200
    pixels[:, :10, 3] = 255  # left half opaque, right half transparent
    pixels[:, 10:, 3] = 0
    image = read_image(save(tmp_path, "a.png", Image.fromarray(pixels, "RGBA")), 20, 3)
    assert (image[:, :, :10] == 200).all() and (image[:, :, 10:] == 0).all()
    la = Image.fromarray(pixels[..., [0, 3]], "LA")
    assert (read_image(save(tmp_path, "la.png", la), 20, 1)[0, :, 10:] == 0).all()


def test_palette_png(tmp_path):
    palette_image = Image.new("RGB", (40, 30), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    image = read_image(save(tmp_path, "p.png", palette_image), 16, 3, "crop")
    assert diff(image[:, 8, 8], np.array([0, 128, 255])) <= 2


def test_sixteen_bit_grey_is_scaled_by_its_own_min_and_max(tmp_path):
    pixels = np.full((10, 40), 1000, dtype=np.uint16)
    pixels[:, 20:] = 3000
    pixels[0, 0] = 500  # the minimum: 0
    pixels[0, 39] = 4500  # the maximum: 255
    png = save(tmp_path, "16.png", Image.fromarray(pixels))  # mode I;16
    assert Image.open(png).mode.startswith("I")
    tiff = save(tmp_path, "16.tif", Image.fromarray(pixels))
    for path in (png, tiff):
        assert read_image(path, 40, 1, "crop").shape == (1, 40, 40)
        padded = read_image(path, 40, 1, "pad")[0]  # 40 x 10 at size 40: no resampling, rows 15..24
        row = padded[20]
        assert abs(int(row[5]) - round((1000 - 500) / 4000 * 255)) <= 1, path.suffix
        assert abs(int(row[35]) - round((3000 - 500) / 4000 * 255)) <= 1, path.suffix


def test_float_tiff_and_bilevel_bmp(tmp_path):
    pixels = np.linspace(-1.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    image = read_image(save(tmp_path, "f.tif", Image.fromarray(pixels)), 32, 1)
    assert image.min() == 0 and image.max() == 255
    bilevel = Image.fromarray(gradient(32, 32) > 127)  # mode 1
    image = read_image(save(tmp_path, "b.bmp", bilevel), 32, 1)
    assert set(np.unique(image).tolist()) <= {0, 255} and image.max() == 255


def test_jpeg_and_exif_orientation(tmp_path):
    pixels = np.zeros((40, 80), dtype=np.uint8)
    pixels[:, :40] = 255  # left half white
    img = Image.fromarray(pixels)
    plain = read_image(save(tmp_path, "p.jpg", img, quality=95), 40, 1, "crop")[0]
    assert plain[:, :15].mean() > 240 and plain[:, 25:].mean() < 15
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = read_image(save(tmp_path, "r.jpg", img, quality=95, exif=exif), 40, 1, "crop")[0]
    assert rotated[:15].mean() > 240 and rotated[25:].mean() < 15  # white now on top


def test_multi_page_tiff_gives_its_first_page(tmp_path):
    pages = [Image.new("L", (20, 20), 40), Image.new("L", (20, 20), 220)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert (read_image(path, 20, 1) == 40).all()


def test_large_image_is_downscaled_with_antialiasing(tmp_path):
    checker = (np.indices((1200, 900)).sum(axis=0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    image = read_image(save(tmp_path, "big.png", Image.fromarray(checker)), 64, 1, "crop")
    assert abs(float(image.mean()) - 127.5) < 3 and image.std() < 10  # averaged to grey, no aliasing


def test_truncated_and_random_files_are_refused(tmp_path):
    good = save(tmp_path, "good.png", Image.fromarray(gradient(200, 100)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (truncated, noise, empty, tmp_path / "gone.png"):
        with pytest.raises(ImageRefused) as info:
            read_image(path, 32, 1)
        assert info.value.reason and info.value.path == path, path.name


# --------------------------------------------------------------------------- arguments, digest


@pytest.mark.parametrize(
    "size, channels, policy, fix",
    [(4, 1, "pad", "integer >= 8"), (32.0, 1, "pad", "integer"), (True, 1, "pad", "integer"),
     (32, 2, "pad", "1 or 3"), (32, 1, "stretch", "pad"), (32, 1, "PAD", "crop")],
)
def test_arguments_are_checked_with_the_fix(tmp_path, size, channels, policy, fix):
    path = save(tmp_path, "x.png", Image.new("L", (10, 10)))
    with pytest.raises(ConfigError, match=fix):
        read_image(path, size, channels, policy)


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib

    path = tmp_path / "blob.bin"
    data = np.random.default_rng(1).integers(0, 256, 3 * 2 ** 20 + 7, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    copy = tmp_path / "copy.bin"
    shutil.copyfile(path, copy)
    assert file_digest(copy) == file_digest(path)
