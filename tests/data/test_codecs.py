import io

import cv2
import numpy as np
import pytest
from PIL import Image

from ray_wsss.data.codecs import (PALETTE, decode_array, decode_image, decode_mask,
                                  encode_array, encode_image, encode_mask, image_size)
from ray_wsss.errors import DataError

from ..conftest import data_dir


def _png(arr, mode=None):
    out = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(out, format="PNG")
    return out.getvalue()


def test_mask_round_trip_keeps_every_value_and_writes_the_voc_palette():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 21, (37, 53)).astype(np.uint8)
    mask[:3] = 255
    data = encode_mask(mask)
    assert np.array_equal(decode_mask(data), mask)
    with Image.open(io.BytesIO(data)) as im:  # a palette PNG with VOC colours
        assert im.mode == "P"
        pal = np.array(im.getpalette()[: 3 * 256]).reshape(256, 3)
    assert tuple(pal[15]) == (192, 128, 128)  # person
    assert tuple(pal[255]) == (224, 224, 192)  # the VOC boundary colour
    assert np.array_equal(pal, PALETTE)


def test_voc_palette_mask_decodes_to_indices():
    path = f"{data_dir('voc_sample')}/SegmentationClass/2011_000003.png"
    with open(path, "rb") as fh:
        mask = decode_mask(fh.read(), path)
    with Image.open(path) as im:
        reference = np.array(im)  # Pillow's own P-mode indices
    assert mask.shape == (338, 500)
    assert np.array_equal(mask, reference)
    assert set(np.unique(mask)) == {0, 5, 15, 255}


def test_image_round_trip_png_is_lossless_and_rgb_ordered():
    img = np.zeros((20, 30, 3), np.uint8)
    img[..., 0] = 200  # red
    img[5:10, 5:10, 2] = 90
    back = decode_image(encode_image(img))
    assert np.array_equal(back, img)
    assert image_size(encode_image(img)) == (20, 30)


def test_grayscale_alpha_and_16bit_images_decode_to_rgb8():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert np.array_equal(decode_image(_png(gray))[..., 1], gray)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    out = decode_image(_png(rgba, "RGBA"))
    assert out.shape == (4, 4, 3) and out[0, 0, 0] == 200 * 128 // 255
    deep = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)
    ok, buf = cv2.imencode(".png", deep)
    out = decode_image(buf.tobytes())
    assert out.dtype == np.uint8 and out[3, 3, 0] == 60000 // 257


def test_bad_bytes_raise_data_errors_naming_the_source():
    with pytest.raises(DataError, match="thing.jpg: empty image"):
        decode_image(b"", "thing.jpg")
    with pytest.raises(DataError, match="thing.jpg: cannot decode"):
        decode_image(b"not an image at all", "thing.jpg")
    with pytest.raises(DataError, match="m.png"):
        decode_mask(b"garbage", "m.png")
    rgb = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(DataError, match="RGB image"):
        decode_mask(_png(rgb), "m.png")


def test_array_round_trip_float16_and_no_pickle():
    a = np.random.default_rng(1).random((3, 7, 5)).astype(np.float32)
    back = decode_array(encode_array(a))
    assert back.dtype == np.float16 and back.shape == a.shape
    assert np.allclose(back, a, atol=1e-3)
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError):
        decode_array(obj.getvalue())


def test_large_image_decodes_reduced_within_max_side():
    big = np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), np.uint8)
    data = encode_image(big, ".jpg", 80)
    out = decode_image(data, "big.jpg", max_side=500)
    assert max(out.shape[:2]) == 500 and out.shape[:2] == (375, 500)


def _exif_jpeg(img, orientation):
    ex = Image.Exif()
    ex[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", exif=ex.tobytes(), quality=95)
    return out.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_shows_what_opencv_displays(orientation):
    from ray_wsss.data.codecs import apply_orientation, image_header

    img = np.random.default_rng(orientation).integers(0, 255, (24, 40, 3), np.uint8)
    data = _exif_jpeg(img, orientation)
    stored = decode_image(data)
    assert stored.shape == (24, 40, 3)  # stored pixels, the tag is not applied
    assert image_header(data) == (24, 40, "JPEG", orientation)
    shown = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                         cv2.COLOR_BGR2RGB)  # OpenCV applies the tag here
    assert np.array_equal(apply_orientation(stored, orientation), shown)


def test_the_reduced_decode_keeps_the_stored_orientation_too():
    # a rotated photo used to come back rotated from the reduced (max_side) decode only
    img = np.random.default_rng(0).integers(0, 255, (240, 400, 3), np.uint8)
    data = _exif_jpeg(img, 6)
    assert decode_image(data).shape == (240, 400, 3)
    assert decode_image(data, max_side=100).shape == (60, 100, 3)


def test_a_jpeg_without_its_end_marker_is_refused_whatever_the_opencv_build():
    data = encode_image(np.full((64, 64, 3), 100, np.uint8), ".jpg")
    assert decode_image(data).shape == (64, 64, 3)
    with pytest.raises(DataError, match=r"cut\.jpg: cannot decode image \(truncated JPEG"):
        decode_image(data[:-2], "cut.jpg")
    assert decode_image(data + b"trailing bytes after the end marker").shape == (64, 64, 3)
