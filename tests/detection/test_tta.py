"""Test-time augmentation (detection/modeling/tta.py): one size without flip is the plain
model, flips and sizes map back to input pixels, the merge is capped and NMS-clean, Mask
R-CNN's averaged masks, Keypoint R-CNN's averaged heatmaps (mirrored with left and right
exchanged), and ``--eval-only`` / ``load_model`` with ``TEST.AUG``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

import segmentation  # noqa: F401  (declares the MaskRCNN family)
from detection.config import load_config as detection_config
from detection.data.keypoints import COCO_PERSON_KEYPOINT_NAMES, flip_indices, flip_map_from_names
from detection.data.shapes import ensure_shapes_dataset
from detection.deploy.loading import load_for_evaluation
from detection.engine.train_net import train
from detection.families import get_family
from detection.modeling.metadata import Metadata
from detection.modeling.predictor import load_model, predict
from detection.modeling.preprocess import Preprocessor, in_input_pixels
from detection.modeling.structures import Detections
from detection.modeling.tta import DetectorWithTTA, build_tta_model, hflip_boxes
from segmentation.config import load_config

REPO = Path(__file__).resolve().parents[2]
SIZE, MAX = 64, 96  # the tiny models' test sizes

# family -> (config, overrides): small heads, random weights, scores low enough that an
# untrained model detects plenty
MODELS = {
    "faster_rcnn_fpn": ("faster_rcnn_r18_fpn_shapes.yaml", {"MODEL.ROI_BOX_HEAD.FC_DIM": 32}),
    "faster_rcnn_c4": ("faster_rcnn_r50_c4.yaml", {
        "MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.RESNETS.NORM": "BN", "MODEL.ROI_HEADS.NUM_CLASSES": 4,
        "MODEL.RPN.POST_NMS_TOPK_TEST": 50, "MODEL.ANCHOR_GENERATOR.SIZES": "[[16, 32]]"}),
    "mask_rcnn": ("mask_rcnn_r18_fpn_shapes.yaml", {
        "MODEL.ROI_BOX_HEAD.FC_DIM": 32, "MODEL.ROI_MASK_HEAD.CONV_DIM": 8,
        "MODEL.ROI_MASK_HEAD.NUM_CONV": 1}),
    "retinanet": ("retinanet_r18_fpn_shapes.yaml", {
        "MODEL.RETINANET.NUM_CONVS": 1, "MODEL.RETINANET.SCORE_THRESH_TEST": 0.001,
        "MODEL.FPN.OUT_CHANNELS": 64}),
    "fcos": ("fcos_r18_fpn_shapes.yaml", {
        "MODEL.FCOS.NUM_CONVS": 1, "MODEL.FCOS.SCORE_THRESH_TEST": 0.001,
        "MODEL.FPN.OUT_CHANNELS": 64}),
    "keypoint_rcnn": ("torchvision/keypointrcnn_resnet50_fpn.yaml", {
        "MODEL.RESNETS.DEPTH": 18, "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
        "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS": "(8, 8)", "MODEL.RPN.POST_NMS_TOPK_TEST": 100,
        "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE": 20}),
}
ONE_STAGE = ("retinanet", "fcos")


def _opts(**extra) -> list:
    opts = {"INPUT.MIN_SIZE_TEST": SIZE, "INPUT.MAX_SIZE_TEST": MAX,
            "MODEL.FPN.OUT_CHANNELS": 32, "MODEL.WEIGHTS": "", "MODEL.BACKBONE.WEIGHTS": ""}
    opts.update(extra)
    return [str(x) for kv in opts.items() for x in kv]


@pytest.fixture(scope="module")
def models():
    built = {}
    for name, (config, extra) in MODELS.items():
        torch.manual_seed(0)
        cfg = load_config(config, _opts(**extra))
        built[name] = get_family(cfg).build(cfg).eval()
    return built


def _image(h=60, w=90, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-5, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", list(MODELS))
def test_one_size_without_flip_is_the_plain_model(models, name):
    model = models[name]
    images = [_image(), _image(50, 40, seed=1)]
    with torch.no_grad():
        plain = model(images)
    tta = DetectorWithTTA(model, min_sizes=[SIZE], max_size=MAX, flip=False).eval()
    out = tta(images)
    assert tta.merge == ("vote" if name in ONE_STAGE else "nms")
    assert plain[0]["boxes"].shape[0] > 0  # something to compare
    for a, b in zip(out, plain):
        _assert_same(a, b)
    assert (model.preprocessor.min_size_test, model.preprocessor.max_size_test) == (SIZE, MAX)


def test_each_size_is_the_plain_model_at_that_size(models):
    model = models["faster_rcnn_fpn"]
    image = _image()
    for size in (48, 80):
        model.preprocessor.min_size_test = size
        try:
            with torch.no_grad():
                plain = model([image])[0]
        finally:
            model.preprocessor.min_size_test = SIZE
        out = DetectorWithTTA(model, min_sizes=[size], max_size=MAX, flip=False).eval()([image])
        _assert_same(out[0], plain)


@pytest.mark.parametrize("name", ["faster_rcnn_fpn", "retinanet"])
def test_flipped_branch_mirrors_back_on_a_symmetric_image(models, name):
    model = models[name]
    half = _image(60, 45)
    image = torch.cat([half, half.flip(-1)], dim=-1)  # [3, 60, 90], symmetric left-right
    with torch.no_grad():
        plain = model([image])[0]
    tta = DetectorWithTTA(model, min_sizes=[SIZE], max_size=MAX, flip=True).eval()
    assert [a.flip for a in tta.augmentations] == [False, True]
    flipped = tta.detect([image], tta.augmentations[1])[0]
    torch.testing.assert_close(flipped["boxes"], hflip_boxes(plain["boxes"], 90),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(flipped["scores"], plain["scores"])
    assert torch.equal(flipped["labels"], plain["labels"])


class SquareFinder(nn.Module):
    """A detector whose answer is known: the bounding box of the pixels above 128 in the red
    channel, found in the resized image and mapped back as the real detectors map theirs."""

    num_classes = 1

    def __init__(self) -> None:
        super().__init__()
        self.preprocessor = Preprocessor(pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3,
                                         min_size_test=SIZE, max_size_test=1000,
                                         size_divisibility=1)
        self.nms_thresh, self.detections_per_image = 0.5, 10
        self.metadata = Metadata(class_names=["square"])
        self.seen = []

    def forward(self, images):
        batch, sizes, _ = self.preprocessor(images)
        dets = []
        for x, (h, w) in zip(batch, sizes):
            self.seen.append((h, w))
            ys, xs = torch.nonzero(x[0, :h, :w] > 128, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
            dets.append(Detections(boxes=box, scores=torch.tensor([0.9]),
                                   labels=torch.tensor([0])))
        return in_input_pixels(dets, sizes, images)


def test_boxes_come_back_in_input_pixels_at_every_size():
    image = torch.zeros(3, 120, 180, dtype=torch.uint8)
    image[:, 20:60, 30:70] = 255  # off-centre: a wrong flip-back would show
    truth = torch.tensor([[30.0, 20.0, 70.0, 60.0]])
    finder = SquareFinder()
    tta = DetectorWithTTA(finder, min_sizes=[48, 96, 120, 240], max_size=1000, flip=True)
    tta.eval()
    for aug in tta.augmentations:
        found = tta.detect([image], aug)[0]["boxes"]
        # one resized pixel is 120 / min_size input pixels
        torch.testing.assert_close(found, truth, atol=120 / aug.min_size + 0.5, rtol=0,
                                   msg=str(aug))
    assert sorted(set(finder.seen)) == [(48, 72), (96, 144), (120, 180), (240, 360)]
    merged = tta([image])[0]
    assert merged["boxes"].shape == (1, 4)  # the 8 finds of one square merge into one
    torch.testing.assert_close(merged["boxes"], truth, atol=1.5, rtol=0)
    assert finder.preprocessor.min_size_test == SIZE  # the model's own sizes are back


@pytest.mark.parametrize("name", ["faster_rcnn_fpn", "retinanet", "fcos"])
def test_merged_output_is_capped_and_nms_clean_per_class(models, name):
    tta = DetectorWithTTA(models[name], min_sizes=[48, 64, 80], max_size=MAX, flip=True,
                          detections_per_image=20).eval()
    images = [_image(), _image(70, 50, seed=2)]
    for out, img in zip(tta(images), images):
        n = out["boxes"].shape[0]
        assert 0 < n <= 20
        assert torch.all(out["scores"][:-1] >= out["scores"][1:])
        h, w = img.shape[-2:]
        assert out["boxes"].min() >= 0
        assert torch.all(out["boxes"][:, 2] <= w) and torch.all(out["boxes"][:, 3] <= h)
        iou = box_iou(out["boxes"], out["boxes"]).nan_to_num()  # untrained FCOS: empty boxes
        same = out["labels"][:, None] == out["labels"][None]
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        overlaps = iou[same & off_diagonal]
        assert overlaps.numel() == 0 or float(overlaps.max()) <= tta.nms_thresh + 1e-6


def test_mask_rcnn_masks_have_the_input_size(models):
    tta = DetectorWithTTA(models["mask_rcnn"], min_sizes=[48, 80], max_size=MAX,
                          flip=True).eval()
    images = [_image(), _image(44, 70, seed=3)]
    for out, img in zip(tta(images), images):
        n, (h, w) = out["boxes"].shape[0], img.shape[-2:]
        assert n > 0
        assert out["masks"].shape == (n, 1, h, w)
        assert out["binary_masks"].shape == (n, h, w) and out["binary_masks"].dtype == torch.bool
        assert 0 <= float(out["masks"].min()) and float(out["masks"].max()) <= 1


def test_the_wrapper_refuses_training_and_models_without_a_preprocessor(models):
    tta = DetectorWithTTA(models["faster_rcnn_fpn"], min_sizes=[SIZE], max_size=MAX)
    with pytest.raises(RuntimeError, match="inference"):
        tta.train()([_image()])
    tta.eval()
    with pytest.raises(TypeError, match="preprocessor"):
        DetectorWithTTA(nn.Linear(2, 2), min_sizes=[SIZE], max_size=MAX)


@pytest.mark.starts_processes
def test_eval_only_with_test_aug_reports_ap_and_load_model_wraps(tmp_path):
    p = ensure_shapes_dataset(root=tmp_path / "shapes", num_train=4, num_val=2,
                              image_size=(64, 96))
    train_set, val_set = f"{p.train_json}:{p.train_images}", f"{p.val_json}:{p.val_images}"
    opts = _opts(**{
        "DATASETS.TRAIN": f"('{train_set}',)", "DATASETS.TEST": f"('{val_set}',)",
        "DATASETS.ROOT": str(tmp_path / "datasets"), "DATALOADER.NUM_WORKERS": 0,
        "SOLVER.IMS_PER_BATCH": 2, "SOLVER.MAX_ITER": 1, "SOLVER.WARMUP_ITERS": 1,
        "SOLVER.AMP.ENABLED": False, "INPUT.MIN_SIZE_TRAIN": "(64,)",
        "INPUT.MAX_SIZE_TRAIN": 96, "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
        "TEST.RETAIN_FREED_MEMORY": False, "OUTPUT_DIR": str(tmp_path / "run")})
    torch.manual_seed(0)
    train(detection_config("faster_rcnn_r18_fpn_shapes.yaml", opts))
    weights = str(tmp_path / "run" / "model_final.pth")
    aug = ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(48, 80)",
           "TEST.AUG.MAX_SIZE", "160", "MODEL.WEIGHTS", weights]

    cfg = detection_config("faster_rcnn_r18_fpn_shapes.yaml", opts + aug)
    evaluated = load_for_evaluation(cfg)  # what --eval-only evaluates
    assert isinstance(evaluated, DetectorWithTTA) and len(evaluated.augmentations) == 4
    plain_cfg = detection_config("faster_rcnn_r18_fpn_shapes.yaml", opts)
    assert build_tta_model(plain_cfg, evaluated.model) is evaluated.model  # off by default

    loaded = load_model(cfg)  # TEST.AUG.ENABLED; tta=False would leave it out
    assert isinstance(loaded, DetectorWithTTA) and len(loaded.augmentations) == 4
    det = predict(loaded, next(Path(p.val_images).iterdir()))
    assert det["boxes"].shape[1] == 4 and len(det["class_names"]) == det["labels"].numel()

    out = tmp_path / "eval"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "tools" / "train_det.py"), "--config",
           "faster_rcnn_r18_fpn_shapes.yaml", "--eval-only", *opts, *aug,
           "OUTPUT_DIR", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| bbox |" in res.stdout
    log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else res.stderr
    assert "Test-time augmentation on" in log and "[48, 80]" in log


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_keypoint_flip_tta_of_a_mirrored_image_mirrors_and_swaps_left_right(models, offset):
    """With flip, TTA of an image's mirror is TTA of the image mirrored: the same boxes
    mirrored and the keypoints mirrored (x -> W - x in continuous coordinates: W - 1 - x in
    COCO's pixel indices for detectron2's offset 0.5), left and right exchanged."""
    model = models["keypoint_rcnn"]
    head = model.roi_heads.keypoint_head
    head.coordinate_offset = offset
    try:
        tta = DetectorWithTTA(model, min_sizes=[48, 80], max_size=MAX, flip=True).eval()
        image = _image(60, 90, seed=5)
        a, b = tta([image])[0], tta([image.flip(-1)])[0]
    finally:
        head.coordinate_offset = 0.0
    n = a["boxes"].shape[0]
    assert n > 0 and a["keypoints"].shape == (n, 17, 3) and a["keypoints_scores"].shape == (n, 17)
    torch.testing.assert_close(b["boxes"], hflip_boxes(a["boxes"], 90), atol=1e-3, rtol=0)
    torch.testing.assert_close(b["scores"], a["scores"])
    perm = flip_indices(COCO_PERSON_KEYPOINT_NAMES,
                        flip_map_from_names(COCO_PERSON_KEYPOINT_NAMES))
    assert perm[1:3] == [2, 1]  # left_eye <-> right_eye
    mirrored = a["keypoints"][:, perm].clone()
    mirrored[..., 0] = 90 - 2 * offset - mirrored[..., 0]
    # a box under a pixel wide decodes at a width clamped to 1 from its left edge (as both
    # peers decode), which a mirror does not preserve: the untrained model makes a few
    wide = (a["boxes"][:, 2] - a["boxes"][:, 0]) >= 1.0
    assert wide.sum() >= n // 2
    torch.testing.assert_close(b["keypoints"][wide], mirrored[wide], atol=1e-3, rtol=0)
    torch.testing.assert_close(b["keypoints_scores"], a["keypoints_scores"][:, perm],
                               atol=1e-4, rtol=1e-5)


def test_keypoint_flip_indices_must_permute_the_keypoints(models):
    model = models["keypoint_rcnn"]
    with pytest.raises(ValueError, match="not a permutation of the model's 17 keypoints"):
        DetectorWithTTA(model, min_sizes=[SIZE], max_size=MAX, keypoint_flip_indices=[0, 1])
    unflipped = DetectorWithTTA(model, min_sizes=[SIZE], max_size=MAX, flip=False)
    assert unflipped.keypoint_flip_indices is None
    default = DetectorWithTTA(model, min_sizes=[SIZE], max_size=MAX, flip=True)
    assert default.keypoint_flip_indices[:5] == [0, 2, 1, 4, 3]
