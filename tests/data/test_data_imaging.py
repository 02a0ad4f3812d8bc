"""Image helpers: storage encoding, RGB conversion, crops and reduced-scale decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from osfed_hpc.data.imaging import (
    center_crop_box,
    decode_eval,
    decode_train,
    encode_for_storage,
    fit_size,
    random_resized_crop_box,
    to_rgb,
)

from .conftest import jpeg_bytes, natural_image


def test_fit_size_never_upscales():
    assert fit_size(300, 200, 512) == (300, 200)
    assert fit_size(1024, 768, 512) == (512, 384)
    assert fit_size(100, 5000, 512) == (10, 512)


def test_small_rgb_jpeg_is_kept_byte_for_byte_and_large_is_reencoded():
    rng = np.random.default_rng(0)
    small = jpeg_bytes(natural_image(rng, 120, 90))
    assert encode_for_storage(small, 512, 90) == small
    large = jpeg_bytes(natural_image(rng, 1000, 600))
    out = Image.open(io.BytesIO(encode_for_storage(large, 512, 90)))
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (512, 307)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_to_rgb(mode):
    img = natural_image(np.random.default_rng(1), 20, 10)
    converted = to_rgb(img.convert(mode) if mode != "I;16" else Image.fromarray(np.full((10, 20), 65535, np.uint16)))
    assert converted.mode == "RGB" and converted.size == (20, 10)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(img)).min() == 255


def test_random_resized_crop_box_in_bounds_and_seeded():
    for seed in range(200):
        left, top, w, h = random_resized_crop_box(500, 375, np.random.default_rng(seed))
        assert 0 <= left and 0 <= top and left + w <= 500 and top + h <= 375 and w > 0 and h > 0
    a = random_resized_crop_box(500, 375, np.random.default_rng(3))
    assert a == random_resized_crop_box(500, 375, np.random.default_rng(3))


def test_center_crop_box_matches_resize_then_crop():
    left, top, w, h = center_crop_box(400, 300, 224)  # shorter side 300 -> 256, crop 224
    assert w == h == pytest.approx(300 * 224 / 256) and left == pytest.approx((400 - w) / 2)


def test_decode_is_seeded_and_reduced_scale_decoding_stays_close():
    rng = np.random.default_rng(2)
    data = jpeg_bytes(natural_image(rng, 512, 384))
    a = decode_train(data, 64, np.random.default_rng(11))
    assert a.shape == (3, 64, 64) and a.dtype == np.uint8
    assert np.array_equal(a, decode_train(data, 64, np.random.default_rng(11)))
    assert not np.array_equal(a, decode_train(data, 64, np.random.default_rng(12)))
    fast = decode_eval(data, 64)  # draft: libjpeg decodes at 1/4 scale
    img = Image.open(io.BytesIO(data)).convert("RGB")
    box = center_crop_box(512, 384, 64)
    exact = np.asarray(img.resize((64, 64), Image.Resampling.BILINEAR,
                                  box=(box[0], box[1], box[0] + box[2], box[1] + box[3]))).transpose(2, 0, 1)
    assert np.abs(fast.astype(int) - exact).mean() < 6
