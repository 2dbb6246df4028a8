"""Export of FCOS, Cascade R-CNN (with and without masks) and Keypoint R-CNN: the ONNX graph
run in ONNX Runtime and in OpenVINO (whole, and as its preprocess, backbone and heads graphs)
reproduces the eager model's detections on image sizes other than the traced one: the same
labels, boxes within 1e-3 px relative, scores within 1e-4, masks within 1e-3, keypoints within
1e-2 px and keypoint scores within 1e-3; the outputs have the eager model's keys; a keypoint
export without detections returns empty keypoints; a model outside the covered families is
refused with a message that lists them, and so is one with outputs the graph would drop
(Panoptic FPN's segmentations)."""

import pytest
import torch
from torch import nn

from detection.deploy import UnsupportedExportError, export_model, load_exported
from detection.deploy.export import sample_image, unsupported_parts
from detection.engine.loading import build_model_from_cfg
from detection.modeling.calibration import calibrate_batchnorm
from detection.modeling.keypoint_head import decode_heatmaps, decode_heatmaps_padded
from segmentation.config import load_config  # the full tree: mask, keypoint and FCOS keys

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

SIZES = [(161, 243), (200, 200), (257, 190)]  # none is the traced 480x640
SMALL = ["INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "400", "MODEL.FPN.OUT_CHANNELS",
         "32"]
RCNN = ["MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "MODEL.ROI_HEADS.MIN_BOX_SIZE", "0.01"]
CASCADE = ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads"]
FAMILIES = {
    "fcos": ("fcos_r18_fpn_shapes.yaml", []),
    "cascade": ("mask_rcnn_r18_fpn_shapes.yaml", [*RCNN, *CASCADE, "MODEL.MASK_ON", "False"]),
    "cascade_mask": ("mask_rcnn_r18_fpn_shapes.yaml", [
        *RCNN, *CASCADE, "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_MASK_HEAD.NUM_CONV",
        "2"]),
    "keypoint": ("faster_rcnn_r18_fpn_shapes.yaml", [
        *RCNN, "MODEL.KEYPOINT_ON", "True", "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(16, 16)",
        "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "5"]),
}
OUTPUTS = {
    "fcos": ["boxes", "scores", "labels"],
    "cascade": ["boxes", "scores", "labels"],
    "cascade_mask": ["boxes", "scores", "labels", "masks"],
    "keypoint": ["boxes", "scores", "labels", "keypoints", "keypoints_scores"],
}


def _class_layers(model: nn.Module):
    """The layers whose outputs are the class logits (one per cascade stage)."""
    if hasattr(model, "head"):
        return [model.head.cls_score]
    predictor = model.roi_heads.box_predictor
    return [p.cls_score for p in (predictor if isinstance(predictor, nn.ModuleList)
                                  else [predictor])]


def lively_model(family: str) -> nn.Module:
    """A small random model of ``family`` with calibrated BatchNorm statistics and class
    logits lively enough that many detections pass the score threshold."""
    config, opts = FAMILIES[family]
    cfg = load_config(config, ["MODEL.BACKBONE.WEIGHTS", "", *SMALL, *opts])
    torch.manual_seed(0)
    model = build_model_from_cfg(cfg).eval()
    with torch.no_grad():
        for layer in _class_layers(model):
            nn.init.normal_(layer.weight, std=0.05)
        if family == "fcos":
            model.head.cls_score.bias.fill_(-3.0)
        calibrate_batchnorm(model, lambda: model([sample_image(240, 320, seed=7)]))
    return model


def matched_differences(expected, got):
    """Pair each expected detection with the got one of its label whose corners are nearest
    (each used once; the orders may differ where scores tie): the largest differences over
    the pairs, per output."""
    assert got["boxes"].shape == expected["boxes"].shape, (got["boxes"].shape,
                                                           expected["boxes"].shape)
    assert torch.equal(torch.sort(got["labels"])[0], torch.sort(expected["labels"])[0])
    distance = (expected["boxes"][:, None] - got["boxes"][None]).abs().amax(dim=2)
    distance[expected["labels"][:, None] != got["labels"][None]] = float("inf")
    best = distance.argmin(dim=1)
    assert best.unique().numel() == best.numel(), "two detections paired with one"
    scale = expected["boxes"].abs().clamp(min=1.0)
    diffs = {"box": float(((expected["boxes"] - got["boxes"][best]).abs()).max()),
             "box_rel": float(((expected["boxes"] - got["boxes"][best]).abs() / scale).max()),
             "score": float((expected["scores"] - got["scores"][best]).abs().max())}
    if "masks" in expected:
        diffs["mask"] = float((expected["masks"] - got["masks"][best]).abs().max())
    if "keypoints" in expected:
        diffs["keypoint"] = float((expected["keypoints"] - got["keypoints"][best]).abs().max())
        diffs["keypoint_score"] = float(
            (expected["keypoints_scores"] - got["keypoints_scores"][best]).abs().max())
    return diffs


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    """(family, eager detections per size, {runtime: deployed model}): the ONNX export with
    its split graphs, run in ONNX Runtime and in OpenVINO, whole and split (Cascade R-CNN's
    split graphs are run with its mask head only, to save time)."""
    family = request.param
    model = lively_model(family)
    root = tmp_path_factory.mktemp(family)
    split = family != "cascade"
    info = export_model(model, root, "onnx", split=split)
    assert info.outputs == OUTPUTS[family]
    assert bool(info.parts) == split
    runtimes = {"onnxruntime": load_exported(root),
                "openvino": load_exported(root, "openvino", split=False)}
    if split:
        runtimes["openvino-split"] = load_exported(root, "openvino", split=True)
    with torch.no_grad():
        expected = {(h, w): model([sample_image(h, w, seed=h)])[0] for h, w in SIZES}
    return family, expected, runtimes, model, root


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "openvino-split"])
def test_runtime_parity(exported, runtime):
    family, expected_per_size, runtimes, _, _ = exported
    if runtime not in runtimes:
        pytest.skip(f"{family} is exported without split graphs")
    deployed = runtimes[runtime]
    worst = {}
    for (h, w), expected in expected_per_size.items():
        got = deployed([sample_image(h, w, seed=h)])[0]
        assert expected["boxes"].shape[0] >= 10, "the reference must detect something"
        assert got["labels"].dtype == torch.int64
        assert set(got) == set(expected)
        diffs = matched_differences(expected, got)
        where = f"{family}, {runtime}, {h}x{w}: {diffs}"
        assert diffs["box_rel"] < 1e-3 and diffs["score"] < 1e-4, where
        if "masks" in expected:
            assert got["masks"].shape[1:] == (1, h, w) and diffs["mask"] < 1e-3, where
        if "keypoints" in expected:
            assert got["keypoints"].shape == expected["keypoints"].shape
            assert diffs["keypoint"] < 1e-2 and diffs["keypoint_score"] < 1e-3, where
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in diffs.items()}
    print(f"\n{family} {runtime}: max differences {worst}")


def test_check_export_measures_keypoints(exported):
    """The exporter's check (stored in export.json) compares the keypoints and their scores
    of the matched detections as well, where the model has them."""
    from detection.deploy.export import check_export

    family, _, _, model, root = exported
    if family != "keypoint":
        pytest.skip("keypoints only")
    check = check_export(model, root, sizes=((240, 320),))
    image = check["images"][0]
    assert check["fraction"] > 0.99, check
    assert 0.0 <= image["max_keypoint_diff"] < 1e-2, image
    assert 0.0 <= image["max_keypoint_score_diff"] < 1e-3, image
    assert "keypoint diff" in image["agreement"]


def test_keypoint_agreement_counts_the_keypoints():
    """compare_detections: keypoints moved by 0.25 px and scores by 0.5 in the candidate are
    reported as such over the matched pairs; -1 where either side has none."""
    from detection.deploy.agreement import compare_detections

    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0], [30.0, 5.0, 90.0, 40.0]])
    reference = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]),
                 "labels": torch.tensor([1, 2]),
                 "keypoints": torch.rand(2, 5, 3, generator=g) * 40,
                 "keypoints_scores": torch.rand(2, 5, generator=g)}
    flipped = {k: v.flip(0) for k, v in reference.items()}  # another order
    candidate = dict(flipped, keypoints=flipped["keypoints"] + torch.tensor([0.25, 0.0, 0.0]),
                     keypoints_scores=flipped["keypoints_scores"] - 0.5)
    agreement = compare_detections(reference, candidate)
    assert agreement.matched == 2
    assert agreement.max_keypoint_diff == pytest.approx(0.25, abs=1e-5)
    assert agreement.max_keypoint_score_diff == pytest.approx(0.5, abs=1e-5)
    plain = compare_detections(reference, {k: flipped[k] for k in ("boxes", "scores", "labels")})
    assert plain.max_keypoint_diff == -1.0 and "keypoint" not in str(plain)


def test_keypoint_export_without_detections(tmp_path):
    """Background logits far above the others: empty keypoint outputs of the right shapes."""
    model = lively_model("keypoint")
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[-1] = 100.0
    export_model(model, tmp_path, "onnx")
    image = sample_image(120, 90, seed=1)
    with torch.no_grad():
        assert model([image])[0]["keypoints"].shape == (0, 5, 3)
    for deployed in (load_exported(tmp_path), load_exported(tmp_path, "openvino")):
        out = deployed([image])[0]
        assert out["boxes"].shape == (0, 4)
        assert out["keypoints"].shape == (0, 5, 3) and out["keypoints_scores"].shape == (0, 5)


def test_padded_heatmap_decoding_matches_the_per_box_one():
    """The traced decoding (one canvas for all boxes) equals the eager one, box by box, on
    boxes smaller and larger than the heatmaps."""
    torch.manual_seed(0)
    heatmaps = torch.randn(5, 3, 56, 56)
    boxes = torch.tensor([[3.2, 4.1, 50.7, 90.3], [0.0, 0.0, 10.5, 3.2],
                          [10.0, 10.0, 200.2, 150.9], [1.0, 2.0, 1.5, 2.5],
                          [0.0, 5.0, 130.0, 20.0]])
    keypoints, scores = decode_heatmaps(heatmaps, boxes)
    padded_keypoints, padded_scores = decode_heatmaps_padded(heatmaps, boxes)
    torch.testing.assert_close(padded_keypoints, keypoints, rtol=0, atol=1e-4)
    torch.testing.assert_close(padded_scores, scores, rtol=0, atol=1e-4)


def test_unsupported_model_lists_the_covered_families(tmp_path):
    class Classifier(nn.Module):
        def forward(self, images):
            return images

    bad = unsupported_parts(Classifier(), "onnx")
    assert len(bad) == 1
    for family in ("Faster R-CNN", "Mask R-CNN", "Cascade", "Keypoint R-CNN", "RetinaNet",
                   "FCOS"):
        assert family in bad[0]
    with pytest.raises(UnsupportedExportError, match="FCOS"):
        export_model(Classifier(), tmp_path, "onnx")


def test_panoptic_outputs_are_refused(tmp_path):
    cfg = load_config("panoptic_fpn_r18_shapes.yaml", ["MODEL.BACKBONE.WEIGHTS", ""])
    model = build_model_from_cfg(cfg).eval()
    with pytest.raises(UnsupportedExportError, match="sem_seg_head.*panoptic"):
        export_model(model, tmp_path, "onnx")


def test_an_output_without_a_graph_output_is_refused(tmp_path):
    """A detector returning more than the graph's outputs fails the export, naming it."""
    class Detector(nn.Module):
        roi_heads = None

        def forward(self, images):
            n = images[0].shape[1]
            return [{"boxes": images[0][0, :n, :4], "scores": images[0][0, :n, 0],
                     "labels": images[0][0, :n, 0].long(), "heatmaps": images[0]}]

    with pytest.raises(UnsupportedExportError, match="heatmaps"):
        export_model(Detector(), tmp_path, "onnx")
