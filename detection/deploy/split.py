"""A detector exported as three graphs, so that a runtime can run each in its own precision.

OpenVINO's CPU plugin takes one precision hint per compiled model, and in bf16 it runs every
convolution and fully connected layer in bf16, the RPN head and the box head included (its
markers to keep a node in float32 are not honoured by the CPU plugin). That moves the
proposals and the final boxes enough to lose detections (measured: 87% kept on the trained
shapes default). Split in three, the detector runs as the torch bf16 mode does:

- ``preprocess``: image -> normalized, resized, padded batch, plus the sizes the heads need;
  float32.
- ``backbone``: batch -> backbone features (ResNet, FPN); compiled in bf16.
- ``heads``: image (for its size), sizes, features -> RPN and RoI heads (box, cascade, mask
  and keypoint heads) or a one-stage head (RetinaNet, FCOS), rescaling, masks, keypoints;
  compiled in float32.

The heads graph is traced from the unchanged model: while it is traced, the model's
preprocessor and backbone are stood in for by modules that return the graph's inputs
(:func:`_fed`), so no second copy of the model's code exists.
"""

import contextlib
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from detection.modeling.tracing import as_size, size_tensor

from .export import SingleImageGraph

SPLIT_FILES = {
    "onnx": ("preprocess.onnx", "backbone.onnx", "heads.onnx"),
    "openvino": ("preprocess.xml", "backbone.xml", "heads.xml"),
}


class PreprocessGraph(nn.Module):
    """image ``(3, H, W)`` -> (sizes ``[h, w, padded_h, padded_w]`` int64, batch
    ``(1, 3, padded_h, padded_w)``): normalization, resizing and padding. Kept apart from the
    backbone so that the resize stays in float32 when the backbone runs in bf16 (OpenVINO's
    bf16 would interpolate the image in bf16: 92.6% of the detections kept instead of 99%)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        batch, sizes, _ = self.model.preprocessor([image])
        (h, w), (ph, pw) = sizes[0], batch.shape[-2:]
        hw = size_tensor([h, w, ph, pw], dtype=torch.int64, device=batch.device)
        return hw, batch


class BackboneGraph(nn.Module):
    """batch ``(1, 3, H, W)`` -> the backbone's features, in ``feature_names`` order."""

    def __init__(self, model: nn.Module, feature_names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.feature_names = model, list(feature_names)

    def forward(self, batch: Tensor) -> Tuple[Tensor, ...]:
        features = self.model.backbone(batch)
        return tuple(features[name] for name in self.feature_names)


class _FedPreprocessor(nn.Module):
    """Returns the sizes given to the heads graph instead of preprocessing: a zero-strided
    batch of the padded size (only its shape is read) and the resized size."""

    def __init__(self, sizes: Tensor) -> None:
        super().__init__()
        self.sizes = sizes

    def forward(self, images: Sequence[Tensor], targets=None):
        h, w, ph, pw = (as_size(self.sizes[i]) for i in range(4))
        batch = images[0].new_zeros(()).expand(1, 3, ph, pw)
        return batch, [(h, w)], None


class _FedBackbone(nn.Module):
    def __init__(self, features: Dict[str, Tensor]) -> None:
        super().__init__()
        self.features = features

    def forward(self, batch: Tensor) -> Dict[str, Tensor]:
        return dict(self.features)


@contextlib.contextmanager
def _fed(model: nn.Module, sizes: Tensor, features: Dict[str, Tensor]) -> Iterator[None]:
    """``model`` with its preprocessor and backbone returning ``sizes`` and ``features``."""
    pre, backbone = model.preprocessor, model.backbone
    model.preprocessor, model.backbone = _FedPreprocessor(sizes), _FedBackbone(features)
    try:
        yield
    finally:
        model.preprocessor, model.backbone = pre, backbone


class HeadsGraph(nn.Module):
    """(image, sizes, *features) -> the detector's outputs, as :class:`SingleImageGraph`."""

    def __init__(self, model: nn.Module, feature_names: Sequence[str]) -> None:
        super().__init__()
        self.whole = SingleImageGraph(model)
        self.feature_names = list(feature_names)

    def forward(self, image: Tensor, sizes: Tensor, *features: Tensor) -> Tuple[Tensor, ...]:
        model = self.whole.model
        with _fed(model, sizes, dict(zip(self.feature_names, features))):
            return self.whole(image)


def feature_names(model: nn.Module, image: Tensor) -> List[str]:
    """The backbone's output names, in the order it returns them."""
    with torch.no_grad():
        batch, _, _ = model.preprocessor([image])
        return list(model.backbone(batch))


def write_split(model: nn.Module, image: Tensor, output_dir, fmt: str,
                outputs: Sequence[str]) -> Dict[str, object]:
    """Write the preprocess, backbone and heads graphs of ``model`` in ``fmt`` ("onnx" or
    "openvino") into ``output_dir``; returns what ``export.json`` records of them."""
    from pathlib import Path

    from .export import write_graph

    names = feature_names(model, image)
    pre_file, backbone_file, heads_file = SPLIT_FILES[fmt]
    out = Path(output_dir)
    pre = PreprocessGraph(model).eval()
    backbone = BackboneGraph(model, names).eval()
    with torch.no_grad():
        sizes, batch = pre(image)
        features = backbone(batch)
    write_graph(pre, (image,), out / pre_file, fmt, input_names=["image"],
                output_names=["sizes", "batch"],
                dynamic_axes={"image": {1: "height", 2: "width"},
                              "batch": {2: "batch_h", 3: "batch_w"}})
    feature_axes = {n: {2: f"{n}_h", 3: f"{n}_w"} for n in names}
    write_graph(backbone, (batch,), out / backbone_file, fmt, input_names=["batch"],
                output_names=names,
                dynamic_axes={"batch": {2: "batch_h", 3: "batch_w"}, **feature_axes})
    heads = HeadsGraph(model, names).eval()
    axes = {"image": {1: "height", 2: "width"}, **feature_axes,
            **{n: {0: "detections"} for n in outputs}}
    if "masks" in outputs:
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    write_graph(heads, (image, sizes, *features), out / heads_file, fmt,
                input_names=["image", "sizes", *names], output_names=list(outputs),
                dynamic_axes=axes)
    return {"preprocess": pre_file, "backbone": backbone_file, "heads": heads_file,
            "features": names}
