import io

import numpy as np
import pytest
from PIL import Image

from detection.data.image_io import ImageReadError, image_size, read_image


def _rgb(h=20, w=30):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, :, 0] = 200
    arr[: h // 2, : w // 2] = (0, 0, 255)  # blue top-left corner
    return arr


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="nope.jpg"):
        read_image(tmp_path / "nope.jpg")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty.*empty.png"):
        read_image(p)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "trunc.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="trunc.jpg"):
        read_image(p)


def test_corrupt_bytes(tmp_path):
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageReadError, match="corrupt.jpg"):
        read_image(p)
    assert isinstance(ImageReadError("x"), OSError)


def test_grayscale(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.full((10, 12), 77, np.uint8), mode="L").save(p)
    out = read_image(p)
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    assert (out == 77).all()


def test_rgba_composited_on_black(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., :3] = (100, 150, 200)
    arr[:4, ..., 3] = 255  # top half opaque
    arr[4:, ..., 3] = 0  # bottom half transparent
    p = tmp_path / "a.png"
    Image.fromarray(arr, mode="RGBA").save(p)
    out = read_image(p)
    assert out.shape == (8, 8, 3)
    assert (out[:4] == (100, 150, 200)).all() and (out[4:] == 0).all()


def test_16bit_png(tmp_path):
    arr = np.array([[0, 65535], [257 * 100, 257 * 200]], np.uint16)
    p = tmp_path / "d.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[..., 0].tolist() == [[0, 255], [100, 200]]


def test_palette(tmp_path):
    p = tmp_path / "p.png"
    Image.fromarray(_rgb()).convert("P", palette=Image.ADAPTIVE, colors=4).save(p)
    out = read_image(p)
    assert out.shape == (20, 30, 3)
    assert tuple(out[0, 0]) == (0, 0, 255)


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(_rgb(20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    p = tmp_path / "rot.jpg"
    img.save(p, quality=95, exif=exif.tobytes())
    out = read_image(p)
    assert out.shape == (30, 20, 3)  # height and width swapped
    assert image_size(p) == (30, 20)
    # orientation 6: the stored top-left (blue) shows at the top-right
    top_right = out[:10, 12:].reshape(-1, 3).mean(0)
    assert top_right[2] > 200 and top_right[0] < 60
    bottom_left = out[20:, :8].reshape(-1, 3).mean(0)
    assert bottom_left[0] > 150 and bottom_left[2] < 60
    raw = read_image(p, exif_transpose=False)
    assert raw.shape == (20, 30, 3)


def _png_with_exif_after_data(path, arr, orientation):
    """A PNG whose eXIf chunk (orientation) comes after the image data, before IEND."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    data = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif") else exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload) & 0xFFFFFFFF)
    iend = data.rindex(b"IEND") - 4
    path.write_bytes(data[:iend] + chunk + data[iend:])


@pytest.mark.parametrize("where", ["header", "after_data", "none"])
def test_png_size_after_exif_without_decoding(tmp_path, monkeypatch, where):
    p = tmp_path / "rot.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    if where == "header":
        Image.fromarray(_rgb(20, 30)).save(p, exif=exif.tobytes())
    elif where == "after_data":
        _png_with_exif_after_data(p, _rgb(20, 30), 6)
    else:
        Image.fromarray(_rgb(20, 30)).save(p)
    expected = (20, 30) if where == "none" else (30, 20)
    assert read_image(p).shape[:2] == expected  # what the mapper will see
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("image_size decoded the image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert image_size(p) == expected
    assert image_size(p, exif_transpose=False) == (20, 30)


def _files(tmp_path):
    """One file of each kind the decoding rules differ on."""
    g = np.random.default_rng(0)
    files = {}
    rgba = g.integers(0, 256, (12, 16, 4), dtype=np.uint8)
    files["rgba"] = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(files["rgba"])
    files["gray"] = tmp_path / "gray.png"
    Image.fromarray(g.integers(0, 256, (12, 16), dtype=np.uint8), "L").save(files["gray"])
    files["16bit"] = tmp_path / "16bit.png"
    Image.fromarray(g.integers(0, 65536, (12, 16), dtype=np.uint16)).save(files["16bit"])
    files["palette"] = tmp_path / "palette.png"
    Image.fromarray(_rgb(12, 16)).convert("P", palette=Image.ADAPTIVE, colors=4).save(
        files["palette"])
    files["exif"] = tmp_path / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_rgb(12, 16)).save(files["exif"], quality=95, exif=exif.tobytes())
    return files


@pytest.mark.parametrize("kind", ["rgba", "gray", "16bit", "palette", "exif"])
def test_every_path_decodes_a_file_to_the_same_pixels(tmp_path, kind):
    """Training and evaluation (``read_image``), ``predict`` (a path, a PIL image, an array of
    the file's values), the demo and submission (``read_image``) see the same RGB pixels."""
    import torch

    from detection.modeling.predictor import to_image_tensor

    path = _files(tmp_path)[kind]
    want = read_image(path)  # what the training mapper and the evaluation loader decode
    assert want.dtype == np.uint8 and want.shape[2] == 3
    got = {"path": to_image_tensor(path), "str": to_image_tensor(str(path))}
    with Image.open(path) as im:
        got["PIL"] = to_image_tensor(im)
        if kind in ("rgba", "gray", "16bit"):  # arrays carry no palette nor EXIF
            got["array"] = to_image_tensor(np.asarray(im))
    for how, tensor in got.items():
        assert tensor.shape == (3, *want.shape[:2]), how
        torch.testing.assert_close(tensor.permute(1, 2, 0).numpy(), want, rtol=0, atol=0,
                                   msg=f"{kind} via {how}")
