import hashlib
import io
import os
import pickle
import re
import struct
from typing import Any

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from backbones import build_backbone, resnet18, resnet50
from backbones.convert import torchvision_resnet_to_ours
from backbones.weights import (
    MSRA_MEAN_BGR,
    WEIGHTS,
    ChecksumError,
    UnknownWeightsError,
    WeightsSpec,
    WeightsUnavailableError,
    cache_file_name,
    list_weights,
    load_pretrained,
    resolve_weights,
)


@pytest.fixture(autouse=True)
def _private_torch_home(tmp_path, monkeypatch):
    """Keep the real torch.hub cache out of every test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


class _Py2StylePickler(pickle._Pickler):
    """Protocol 2 laid out as Python 2 wrote MSRA's ``.pkl`` files: ``bytes`` become py2
    ``str`` (BINSTRING opcodes, read back with ``encoding="latin1"``) and numpy's module is
    ``numpy.core``. Pass ``bytes`` keys to get py2 ``str`` keys."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj: Any, name: Any = None) -> None:
        module = getattr(obj, "__module__", "")
        if not module.startswith("numpy._core"):
            return super().save_global(obj, name)
        qualname = name or obj.__qualname__
        line = f"numpy.core{module[len('numpy._core'):]}\n{qualname}\n"
        self.write(pickle.GLOBAL + line.encode())
        self.memoize(obj)

    dispatch[type(len)] = save_global  # builtin functions such as _reconstruct


def _py2_pickle_dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _with_random_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Random BN statistics, so that a missed buffer shows up in comparisons."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _torchvision_checkpoint(tmp_path, arch="resnet18", name=None):
    model = _with_random_statistics(getattr(torchvision.models, arch)())
    data = model.state_dict()
    path = tmp_path / (name or f"{arch}.pth")
    torch.save(data, path)
    return path, model


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ registry

def test_registry_covers_torchvision_detectron2_and_timm():
    names = set(list_weights())
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                 "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2"):
        assert f"torchvision/{arch}.imagenet1k_v1" in names
        has_v2 = arch not in ("resnet18", "resnet34")
        assert (f"torchvision/{arch}.imagenet1k_v2" in names) == has_v2
    assert {"detectron2/R-50", "detectron2/R-101", "timm/resnet50.a1_in1k",
            "timm/resnet50.tv_in1k"} <= names
    assert list_weights("resnet101") == sorted(n for n in names if WEIGHTS[n].arch == "resnet101")


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_every_spec_is_consistent_and_buildable(name):
    spec = WEIGHTS[name]
    assert spec.name == name and name.startswith(spec.source + "/")
    model = build_backbone(spec.arch, out_features=["res2"])  # res3..res5 not built: fast
    assert model.output_shape()["res2"].stride == 4
    assert spec.url.startswith("https://")
    if spec.source == "torchvision":
        file_name = spec.url.rsplit("/", 1)[1]
        assert re.fullmatch(rf"{spec.arch}-{spec.sha256}\.pth", file_name)
        assert spec.input_format == "RGB" and spec.style == "pytorch"
        assert 69 < spec.metrics["imagenet_acc@1"] < 83
    if spec.source == "detectron2":
        assert spec.sha256 is None and spec.style == "caffe" and spec.input_format == "BGR"
        assert spec.pixel_mean == (103.530, 116.280, 123.675) and spec.pixel_std == (1, 1, 1)
    if spec.source == "timm":
        assert spec.url == f"https://huggingface.co/{name}/resolve/main/model.safetensors"


def test_published_numbers_and_cache_names():
    assert WEIGHTS["torchvision/resnet50.imagenet1k_v2"].metrics["imagenet_acc@1"] == 80.858
    assert WEIGHTS["torchvision/resnet18.imagenet1k_v1"].sha256 == "f37072fd"
    assert WEIGHTS["detectron2/R-101"].url.endswith("/ImageNetPretrained/MSRA/R-101.pkl")
    timm_files = {WEIGHTS[n].file_name for n in list_weights() if n.startswith("timm/")}
    assert len(timm_files) == len([n for n in list_weights() if n.startswith("timm/")])
    assert cache_file_name(WEIGHTS["timm/resnet50.a1_in1k"].url) == (
        "timm--resnet50.a1_in1k--model.safetensors")
    assert WEIGHTS["detectron2/R-50"].file_name == "detectron2--ImageNetPretrained--MSRA--R-50.pkl"
    assert WEIGHTS["torchvision/resnet50.imagenet1k_v2"].file_name == "resnet50-11ad3fa6.pth"
    assert len({s.file_name for s in WEIGHTS.values()}) == len(WEIGHTS)


def test_specs_are_frozen_and_validated():
    spec = WEIGHTS["torchvision/resnet50.imagenet1k_v2"]
    with pytest.raises(AttributeError):
        spec.url = "x"
    with pytest.raises(TypeError):
        spec.metrics["imagenet_acc@1"] = 0.0
    with pytest.raises(ValueError, match="source"):
        WeightsSpec(name="x", arch="resnet50", url="u", sha256=None, source="caffe")


# ------------------------------------------------------------------------------ bad input

def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownWeightsError) as info:
        resolve_weights("torchvision/resnet50.imagenet1k_v3")
    message = str(info.value)
    assert "torchvision/resnet50.imagenet1k_v2" in message and "detectron2/R-50" in message
    assert "Did you mean" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(KeyError, match="detectron2/R-101"):
        resnet50(weights="imagenet")


def test_name_for_another_arch():
    with pytest.raises(ValueError, match=r"resnet18.*resnet50|resnet50.*resnet18"):
        resolve_weights("torchvision/resnet18.imagenet1k_v1", arch="resnet50")


def test_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "R-50.pkl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        resnet50(weights=str(missing))


def test_checkpoint_for_another_arch_names_key_and_shapes(tmp_path):
    path, _ = _torchvision_checkpoint(tmp_path, "resnet18")
    model = build_backbone("resnet50", num_classes=1000)
    with pytest.raises(ValueError) as info:
        load_pretrained(model, str(path))
    message = str(info.value)
    assert "'res2.0.conv1.weight'" in message
    assert "(64, 64, 3, 3)" in message and "(64, 64, 1, 1)" in message
    assert "resnet18" in message


def test_strict_refuses_missing_keys_and_lenient_reports_them(tmp_path):
    data = torchvision.models.resnet18().state_dict()
    data = {k: v for k, v in data.items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pth"
    torch.save(data, path)
    with pytest.raises(ValueError, match=r"missing keys \[res5\.0\.conv1\.weight"):
        load_pretrained(build_backbone("resnet18"), str(path))
    report = load_pretrained(build_backbone("resnet18"), str(path), strict=False)
    assert "res5.0.conv1.weight" in report.missing_keys
    assert report.unexpected_keys == ["fc.weight", "fc.bias"]


def test_torch_load_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class RunsShell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": RunsShell()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_pretrained(build_backbone("resnet18"), str(path))
    assert not marker.exists()


def test_unsafe_pkl_refused_by_loader(tmp_path):
    marker = tmp_path / "pwned"

    class RunsShell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": RunsShell()}}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"system.*evil|evil.*system"):
        resnet50(weights=str(path))
    assert not marker.exists()


# ------------------------------------------------------------------------------ MSRA .pkl

def _ours_to_caffe2(key: str) -> str:
    """Our name -> the MSRA Caffe2 blob name (the inverse of the converter, written out)."""
    norm_param = {"weight": "s", "bias": "b"}
    if key.startswith("stem.conv1."):
        return "conv1_w"
    if key.startswith("stem.bn1."):
        return "res_conv1_bn_" + norm_param[key.rsplit(".", 1)[1]]
    if key.startswith("fc."):
        return "pred_" + key[3]
    stage, index, *rest = key.split(".")
    prefix = f"{stage}_{index}_branch"
    part, param = ".".join(rest[:-1]), rest[-1]
    branch = {"conv1": "2a", "bn1": "2a", "conv2": "2b", "bn2": "2b", "conv3": "2c",
              "bn3": "2c", "downsample.0": "1", "downsample.1": "1"}[part]
    if part.startswith("conv") or part == "downsample.0":
        return f"{prefix}{branch}_w"
    return f"{prefix}{branch}_bn_{norm_param[param]}"


def test_msra_r50_pkl_loads_every_key(tmp_path):
    source = resnet50(style="caffe", norm="FrozenBN", num_classes=1000)
    blobs = {}
    for key, value in source.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            continue  # MSRA norms are affine only
        name = _ours_to_caffe2(key)
        assert name not in blobs, key
        blobs[name.encode()] = value.numpy()
        if key.endswith("conv1.weight"):
            blobs[f"{name}_momentum".encode()] = value.numpy() * 0
    path = tmp_path / "R-50.pkl"
    raw = _py2_pickle_dumps({b"blobs": blobs})
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw  # as Python 2 wrote it
    path.write_bytes(raw)
    # 53 convs, 53 affine norms (scale and bias), the classifier's weight and bias
    assert len([k for k in blobs if not k.endswith(b"_momentum")]) == 53 + 2 * 53 + 2

    spec = resolve_weights(str(path), arch="resnet50")
    assert (spec.source, spec.style, spec.input_format) == ("detectron2", "caffe", "BGR")
    assert spec.pixel_mean == MSRA_MEAN_BGR and spec.pixel_std == (1.0, 1.0, 1.0)
    assert spec.arch == "resnet50" and spec.num_classes == 1000

    model = resnet50(style="caffe", norm="FrozenBN", num_classes=1000)
    report = load_pretrained(model, str(path), spec=spec)
    assert report.format == "caffe2"
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert not hasattr(model, "pixel_std")  # the spec, not the module, holds normalization
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        if key.endswith("running_mean"):
            assert torch.count_nonzero(loaded[key]) == 0
        elif key.endswith("running_var"):
            torch.testing.assert_close(loaded[key], torch.full_like(value, 1 - 1e-5))
        else:
            assert torch.equal(loaded[key], value), key


def test_msra_pkl_through_the_builder(tmp_path):
    """``resnet50(weights=path)`` picks caffe style and BGR from the file's names alone."""
    source = build_backbone("resnet50", style="caffe", num_classes=1000)
    blobs = {_ours_to_caffe2(k).encode(): v.numpy() for k, v in source.state_dict().items()
             if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    blobs = {k: v for k, v in blobs.items() if not k.startswith(b"pred_")}  # headless file
    path = tmp_path / "R-50.pkl"
    path.write_bytes(_py2_pickle_dumps({b"blobs": blobs}))
    model = resnet50(weights=str(path))
    assert model.style == "caffe"
    assert resolve_weights(str(path)).pixel_mean == MSRA_MEAN_BGR
    assert torch.equal(model.res5[0].conv1.weight, source.res5[0].conv1.weight)
    assert not model.stem.conv1.weight.requires_grad  # pretrained default: freeze_at=2


def test_detectron2_pkl_with_numpy_arrays(tmp_path):
    source = build_backbone("resnet18", num_classes=10)
    d2 = {}
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"^stem\.bn1\.", "stem.conv1.norm.", key)
        key = re.sub(r"\.bn([12])\.", r".conv\1.norm.", key)
        key = key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
        d2["backbone.bottom_up." + key.replace("fc.", "linear.")] = value.numpy()
    d2["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 4).numpy()
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": d2, "__author__": "Caffe2"}, protocol=2))
    spec = resolve_weights(str(path))
    assert (spec.arch, spec.style, spec.input_format, spec.num_classes) == (
        "resnet18", "caffe", "BGR", 10)
    model = build_backbone("resnet18", num_classes=10)
    report = load_pretrained(model, str(path))
    assert report.format == "detectron2" and report.dropped == 1
    assert report.missing_keys == []
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_round_trip(tmp_path, arch):
    path, reference = _torchvision_checkpoint(tmp_path, arch)
    model = build_backbone(arch, norm="FrozenBN", num_classes=1000)
    report = load_pretrained(model, str(path))
    assert report.format == "torchvision"
    assert report.missing_keys == [] and report.unexpected_keys == []
    ours = model.state_dict()
    for key, value in torchvision_resnet_to_ours(reference.state_dict()).items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(ours[key], value), key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours_logits, reference_logits = model.eval().classify(x), reference(x)
    scale = reference_logits.abs().max().item()
    torch.testing.assert_close(ours_logits, reference_logits, rtol=1e-4, atol=1e-5 * scale)
    assert not hasattr(model, "input_format")


def test_headless_backbone_ignores_classifier(tmp_path, caplog):
    path, _ = _torchvision_checkpoint(tmp_path, "resnet18")
    model = build_backbone("resnet18")
    with caplog.at_level("INFO", logger="backbones.weights"):
        report = load_pretrained(model, str(path))
    assert report.unexpected_keys == ["fc.weight", "fc.bias"]
    assert report.missing_keys == []
    assert "unexpected (unused): fc.weight, fc.bias" in caplog.text


def test_timm_safetensors_round_trip(tmp_path):
    # timm's plain ResNet names: conv1, bn1, layer1..4 (conv1..3, bn1..3, downsample.0/1), fc
    reference = _with_random_statistics(torchvision.models.resnet50())
    timm_named = {k: v.contiguous() for k, v in reference.state_dict().items()
                  if not k.endswith("num_batches_tracked")}  # timm files carry none
    source = tmp_path / "model.safetensors"
    save_file(timm_named, str(source))
    spec = WeightsSpec(name="timm/resnet50.test", arch="resnet50", url=source.as_uri(),
                       sha256=_sha256(source), source="timm")
    model = build_backbone("resnet50", norm="FrozenBN", num_classes=1000)
    report = load_pretrained(model, source.as_uri(), spec=spec, model_dir=tmp_path / "cache")
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.loaded == len(timm_named)
    for key, value in torchvision_resnet_to_ours(timm_named).items():
        assert torch.equal(model.state_dict()[key], value), key


# ------------------------------------------------------------------------------ download

def _hashed_checkpoint(tmp_path):
    """A torchvision-style file ``resnet18-<first 8 hex of sha256>.pth`` and its URL."""
    server = tmp_path / "server"
    server.mkdir()
    path, _ = _torchvision_checkpoint(server, "resnet18")
    named = path.rename(path.with_name(f"resnet18-{_sha256(path)[:8]}.pth"))
    return named, named.as_uri()


def test_download_checks_hash_and_caches(tmp_path):
    source, url = _hashed_checkpoint(tmp_path)
    cache = tmp_path / "cache"
    report = load_pretrained(build_backbone("resnet18"), url, model_dir=cache, progress=False)
    cached = cache / source.name
    assert report.file == str(cached) and cached.is_file()
    source.unlink()  # offline: the second load is served from the cache
    report = load_pretrained(build_backbone("resnet18"), url, model_dir=cache, progress=False)
    assert report.file == str(cached) and report.missing_keys == []


def test_download_with_default_cache_is_torch_home(tmp_path):
    source, url = _hashed_checkpoint(tmp_path)
    load_pretrained(build_backbone("resnet18"), url, progress=False)
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / source.name).is_file()


def test_wrong_hash_is_refused_and_not_cached(tmp_path):
    source, _ = _hashed_checkpoint(tmp_path)
    bad = source.with_name("resnet18-deadbeef.pth")
    source.rename(bad)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as info:
        load_pretrained(build_backbone("resnet18"), bad.as_uri(), model_dir=cache,
                        progress=False)
    message = str(info.value)
    assert "resnet18-deadbeef.pth" in message and "expected deadbeef" in message
    assert _sha256(bad) in message
    assert list(cache.iterdir()) == []


def test_spec_hash_is_checked(tmp_path):
    source, url = _hashed_checkpoint(tmp_path)
    plain = source.with_name("weights.pth")
    source.rename(plain)
    spec = WeightsSpec(name="test/r18", arch="resnet18", url=plain.as_uri(),
                       sha256="ab" * 32, source="torchvision")
    with pytest.raises(ChecksumError, match="expected " + "ab" * 32):
        load_pretrained(build_backbone("resnet18"), plain.as_uri(), spec=spec,
                        model_dir=tmp_path / "cache", progress=False)


def test_unreachable_and_uncached_says_where_to_put_the_file(tmp_path):
    url = (tmp_path / "gone" / "resnet18-f37072fd.pth").as_uri()
    cache = tmp_path / "cache"
    with pytest.raises(WeightsUnavailableError) as info:
        load_pretrained(build_backbone("resnet18"), url, model_dir=cache, progress=False)
    message = str(info.value)
    assert url in message and str(cache / "resnet18-f37072fd.pth") in message


def test_registered_name_loads_offline_from_cache(tmp_path):
    path, reference = _torchvision_checkpoint(tmp_path, "resnet18")
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"  # TORCH_HOME is tmp_path/torch_home
    cache.mkdir(parents=True)
    path.rename(cache / "resnet18-f37072fd.pth")  # where a download would have put it
    model = resnet18(weights="torchvision/resnet18.imagenet1k_v1")
    assert torch.equal(model.res2[0].conv1.weight, reference.layer1[0].conv1.weight)
    report = load_pretrained(build_backbone("resnet18"), "torchvision/resnet18.imagenet1k_v1",
                             model_dir=cache)
    assert report.file == str(cache / "resnet18-f37072fd.pth")


def test_digits_in_a_file_name_are_not_taken_for_a_hash(tmp_path):
    path, _ = _torchvision_checkpoint(tmp_path, "resnet18", name="resnet18-20240101.pth")
    report = load_pretrained(build_backbone("resnet18"), path.as_uri(),
                             model_dir=tmp_path / "cache", progress=False)
    assert report.missing_keys == []


def test_stages_the_model_did_not_build_are_unused_not_wrong(tmp_path):
    path, _ = _torchvision_checkpoint(tmp_path, "resnet18")
    model = build_backbone("resnet18", out_features=["res2", "res3", "res4"])  # a C4 body
    report = load_pretrained(model, str(path))
    assert report.missing_keys == []
    assert {k.split(".")[0] for k in report.unexpected_keys} == {"res5", "fc"}


def test_surplus_blocks_in_a_built_stage_are_refused(tmp_path):
    data = torchvision.models.resnet18().state_dict()
    data.update({k.replace("layer1.1.", "layer1.2."): v for k, v in data.items()
                 if k.startswith("layer1.1.")})  # a third block, as in a deeper ResNet
    path = tmp_path / "deeper.pth"
    torch.save(data, path)
    with pytest.raises(ValueError, match=r"unexpected keys \[res2\.2\."):
        load_pretrained(build_backbone("resnet18"), str(path))
