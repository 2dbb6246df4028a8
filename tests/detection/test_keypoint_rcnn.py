"""Keypoint R-CNN: the keypoint head's targets, loss and decoding; parity with torchvision's
``keypointrcnn_resnet50_fpn`` on converted random weights; torchvision's and detectron2's names
loaded with every key used."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection import keypointrcnn_resnet50_fpn
from torchvision.models.detection import roi_heads as tv_roi_heads

from detection.config import load_config
from detection.modeling.build import build_model
from detection.modeling.calibration import calibrate_batchnorm, textured_image
from detection.modeling.convert import (
    detectron2_to_ours,
    load_state_dict,
    to_ours,
    torchvision_to_ours,
)
from detection.modeling.keypoint_head import decode_heatmaps, keypoint_targets
from detection.modeling.structures import SampledProposals

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MIN_SIZE, MAX_SIZE = 160, 224
POST_NMS, DETECTIONS = 100, 4  # the 8 x 512 keypoint convs run in float64: few RoIs


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _tiny_cfg(*opts: str):
    """A small ResNet-18 FPN Keypoint R-CNN with a narrow keypoint head."""
    return load_config(CONFIGS / "torchvision" / "fasterrcnn_resnet50_fpn.yaml", [
        "MODEL.WEIGHTS", "", "MODEL.BACKBONE.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18",
        "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
        "MODEL.ROI_HEADS.NUM_CLASSES", "1", "MODEL.KEYPOINT_ON", "True",
        "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(8, 8)", "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS",
        "5", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", *opts])


def _parity_cfg():
    return load_config(CONFIGS / "torchvision" / "fasterrcnn_resnet50_fpn.yaml", [
        "MODEL.WEIGHTS", "", "MODEL.BACKBONE.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "1",
        "MODEL.KEYPOINT_ON", "True", "MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE", "ROIAlign",
        "MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO", "2",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.02",
        "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", str(DETECTIONS),
        "MODEL.RPN.POST_NMS_TOPK_TEST", str(POST_NMS),
        "INPUT.MIN_SIZE_TEST", str(MIN_SIZE), "INPUT.MAX_SIZE_TEST", str(MAX_SIZE)])


# ----------------------------------------------------------------- targets and decoding


def test_keypoint_targets_match_torchvision():
    gen = torch.Generator().manual_seed(0)
    rois = torch.tensor([[10.0, 20.0, 50.0, 70.0], [0.0, 0.0, 33.0, 17.0]])
    kp = torch.rand(2, 6, 3, generator=gen) * 80 - 10
    kp[..., 2] = torch.tensor([[2, 0, 1, 2, 2, 1], [1, 1, 0, 2, 1, 2]])
    kp[0, 0, :2] = torch.tensor([50.0, 70.0])  # on the right / bottom edge: last cell
    cells, valid = keypoint_targets(kp, rois, 56)
    ref_cells, ref_valid = tv_roi_heads.keypoints_to_heatmap(kp, rois, 56)
    assert torch.equal(valid, ref_valid.bool())
    assert torch.equal(cells, ref_cells)
    assert valid[0, 0] and cells[0, 0] == 55 * 56 + 55
    assert not valid[0, 1]  # invisible


def test_decode_heatmaps_matches_torchvision():
    gen = torch.Generator().manual_seed(1)
    maps = torch.randn(3, 4, 56, 56, generator=gen)
    boxes = torch.tensor([[3.0, 4.0, 40.5, 90.2], [10.0, 10.0, 10.4, 11.0], [0., 0., 56., 56.]])
    kp, scores = decode_heatmaps(maps, boxes)
    ref_kp, ref_scores = tv_roi_heads.heatmaps_to_keypoints(maps, boxes)
    torch.testing.assert_close(kp, ref_kp)
    torch.testing.assert_close(scores, ref_scores)
    empty_kp, empty_scores = decode_heatmaps(maps[:0], boxes[:0])
    assert empty_kp.shape == (0, 4, 3) and empty_scores.shape == (0, 4)


# ----------------------------------------------------------------- the tiny model


def test_tiny_model_trains_and_predicts_keypoints_in_input_pixels():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg())
    head = model.roi_heads.keypoint_head
    assert head is not None and head.resolution == 56 and head.relu_layers == ("convs",)
    images = [torch.randint(0, 256, (3, 80, 120), dtype=torch.uint8)]
    kp = torch.tensor([[[20.0, 30.0, 2.0], [40.0, 50.0, 1.0], [0.0, 0.0, 0.0],
                        [35.0, 25.0, 2.0], [55.0, 58.0, 2.0]]])
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0]]),
                "labels": torch.tensor([0]), "keypoints": kp}]
    model.train()
    losses = model(images, targets)
    assert set(losses) >= {"loss_keypoint", "loss_cls"}
    assert torch.isfinite(losses["loss_keypoint"]) and losses["loss_keypoint"] > 0
    losses["loss_keypoint"].backward()
    assert head.score_lowres.weight.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="keypoints"):
        model(images, [{"boxes": targets[0]["boxes"], "labels": targets[0]["labels"]}])
    with pytest.raises(ValueError, match=r"keypoints of shape \(1, 4, 3\)"):
        model(images, [{**targets[0], "keypoints": kp[:, :4]}])

    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        out = model(images)[0]
    n = out["boxes"].shape[0]
    assert n > 0
    assert out["keypoints"].shape == (n, 5, 3) and out["keypoints_scores"].shape == (n, 5)
    # keypoints lie in their boxes, in input pixels (the model resized 80x120 to 64x96)
    x, y = out["keypoints"][..., 0], out["keypoints"][..., 1]
    b = out["boxes"][:, None]
    assert ((x >= b[..., 0] - 1e-3) & (x <= b[..., 2] + 1e-3)).all()
    assert ((y >= b[..., 1] - 1e-3) & (y <= b[..., 3] + 1e-3)).all()
    assert torch.equal(out["keypoints"][..., 2], torch.ones(n, 5))


def test_keypoint_on_refused_where_unsupported():
    with pytest.raises(ValueError, match="KEYPOINT_ON"):
        build_model(_tiny_cfg("MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
                              "MODEL.ROI_HEADS.IOU_THRESHOLDS", "(0.5,)"))


# ----------------------------------------------------------------- checkpoints


def test_detectron2_names_load_with_every_key_used():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg())
    ours = model.state_dict()
    d2 = {}
    for k, v in ours.items():
        if k.startswith("roi_heads.keypoint_head.convs."):
            j = int(k.split(".")[3])
            d2[f"roi_heads.keypoint_head.conv_fcn{j + 1}.{k.split('.')[-1]}"] = v
        elif k.startswith("roi_heads.keypoint_head.score_lowres."):
            d2[k] = v
    assert len(d2) == 6
    kp_only = detectron2_to_ours({"model": d2})
    assert set(kp_only) == {k for k in ours if k.startswith("roi_heads.keypoint_head.")}
    assert all(torch.equal(kp_only[k], ours[k]) for k in kp_only)
    bad = {**d2, "roi_heads.keypoint_head.conv_fcn1.norm.weight": torch.ones(8)}
    with pytest.raises(KeyError, match=r"roi_heads\.keypoint_head\.conv_fcn1\.norm\.weight"):
        detectron2_to_ours({"model": bad})
    # a whole detectron2-named checkpoint of the model loads exactly
    d2_full = {"proposal_generator.rpn_head.anchor_deltas.weight": torch.zeros(0), **d2}
    with pytest.raises(KeyError, match="missing"):  # the rest of the model is absent
        load_state_dict(model, to_ours({"model": d2_full}))


def test_torchvision_names_convert_with_every_key_used():
    ref = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    sd = ref.state_dict()
    ours = torchvision_to_ours(sd)
    kp = {k for k in ours if k.startswith("roi_heads.keypoint_head.")}
    assert len(kp) == 2 * 8 + 2
    assert torch.equal(ours["roi_heads.keypoint_head.convs.7.conv.weight"],
                       sd["roi_heads.keypoint_head.14.weight"])
    assert torch.equal(ours["roi_heads.keypoint_head.score_lowres.weight"],
                       sd["roi_heads.keypoint_predictor.kps_score_lowres.weight"])
    with pytest.raises(KeyError, match=r"roi_heads\.keypoint_head\.1\.weight"):
        torchvision_to_ours({**sd, "roi_heads.keypoint_head.1.weight": torch.zeros(1)})


# ----------------------------------------------------------------- parity with torchvision


def _image():
    gen = torch.Generator().manual_seed(0)
    return textured_image(150, 200, noise=0.15, generator=gen)


def _reference():
    torch.manual_seed(0)
    ref = keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE,
        box_score_thresh=0.02, box_detections_per_img=DETECTIONS,
        rpn_post_nms_top_n_test=POST_NMS).eval()
    with torch.no_grad():  # livelier heads than the default init: spread-out scores
        torch.nn.init.normal_(ref.rpn.head.cls_logits.weight, std=0.3)
        torch.nn.init.normal_(ref.roi_heads.box_predictor.cls_score.weight, std=0.05)
        torch.nn.init.normal_(ref.roi_heads.box_predictor.bbox_pred.weight, std=0.01)
    img = _image() / 255
    calibrate_batchnorm(ref, lambda: ref([img]))
    return ref.double()


def test_torchvision_parity_boxes_keypoints_and_loss():
    ref = _reference()
    ours = build_model(_parity_cfg()).eval()
    load_state_dict(ours, torchvision_to_ours(ref.state_dict()))
    ours = ours.double()
    img = _image().double()
    with torch.no_grad():
        expected = ref([img / 255])[0]
        got = ours([img])[0]
    assert expected["boxes"].shape[0] == DETECTIONS, "the reference must return detections"
    assert set(got) >= {"boxes", "scores", "labels", "keypoints", "keypoints_scores"}
    assert torch.equal(expected["labels"], got["labels"] + 1)  # ours 0, torchvision 1: person
    torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["keypoints"], expected["keypoints"].to(got["keypoints"]),
                               atol=1e-4, rtol=0)  # torchvision's are float32
    torch.testing.assert_close(got["keypoints_scores"],
                               expected["keypoints_scores"].to(got["keypoints_scores"]),
                               atol=1e-4, rtol=0)

    # the loss on the same RoIs and targets: torchvision's keypointrcnn_loss
    gen = torch.Generator().manual_seed(3)
    features = {k: v.double() for k, v in zip(("p2", "p3", "p4", "p5"), (
        torch.randn(1, 256, 40, 56, generator=gen), torch.randn(1, 256, 20, 28, generator=gen),
        torch.randn(1, 256, 10, 14, generator=gen), torch.randn(1, 256, 5, 7, generator=gen)))}
    rois = torch.tensor([[10.0, 12.0, 90.0, 120.0], [30.0, 5.0, 70.0, 60.0],
                         [0.0, 0.0, 150.0, 140.0]], dtype=torch.float64)
    gt_kp = torch.rand(2, 17, 3, generator=gen, dtype=torch.float64) * 150
    gt_kp[..., 2] = (torch.rand(2, 17, generator=gen) > 0.3).double()
    matched = torch.tensor([0, 1, 0])
    sampled = SampledProposals(boxes=[torch.cat([rois, rois[:1]])],
                               labels=[torch.tensor([0, 0, 0, 1])],  # the last: background
                               matched_gt=[torch.cat([matched, matched[:1]])])
    target = {"boxes": gt_kp.new_zeros(2, 4), "keypoints": gt_kp}
    loss = ours.roi_heads.keypoint_head.loss(features, sampled, [target])["loss_keypoint"]
    tv_feats = {str(i): features[f"p{i + 2}"] for i in range(4)}
    with torch.no_grad():
        pooled = ref.roi_heads.keypoint_roi_pool(tv_feats, [rois], [(160, 224)])
        logits = ref.roi_heads.keypoint_predictor(ref.roi_heads.keypoint_head(pooled))
    ref_loss = tv_roi_heads.keypointrcnn_loss(logits, [rois], [gt_kp], [matched])
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-8, rtol=1e-8)


# ----------------------------------------------------------------- data


def _person_json(tmp_path, coco_writer, keypoints):
    from detection.data.keypoints import COCO_PERSON_KEYPOINT_NAMES

    cats = [{"id": 1, "name": "person", "keypoints": list(COCO_PERSON_KEYPOINT_NAMES),
             "skeleton": [[16, 14], [14, 12]]}]
    images = [{"id": 5, "file_name": "p.png", "height": 60, "width": 80}]
    anns = [{"id": 77, "image_id": 5, "category_id": 1, "bbox": [10, 5, 40, 50], "iscrowd": 0,
             "num_keypoints": 2, "keypoints": keypoints}]
    return coco_writer(tmp_path, images, anns, cats)


def _person_keypoints():
    kp = [0.0] * 51
    kp[3:6] = [20.0, 10.0, 2.0]  # left_eye
    kp[6:9] = [30.0, 12.0, 1.0]  # right_eye
    return kp


def test_coco_keypoints_load_and_flip_with_their_pairs(tmp_path, coco_writer):
    import numpy as np

    from detection.data.coco import load_coco_json
    from detection.data.mapper import DatasetMapper

    records, meta = load_coco_json(_person_json(tmp_path, coco_writer, _person_keypoints()),
                                   tmp_path / "images")
    assert meta["keypoint_names"][1] == "left_eye"
    assert ("left_eye", "right_eye") in meta["keypoint_flip_map"]
    assert len(meta["keypoint_flip_map"]) == 8 and meta["keypoint_skeleton"][0] == [16, 14]
    assert records[0]["annotations"][0]["keypoints"][3:6] == [20.0, 10.0, 2.0]

    plain = DatasetMapper(True, min_size_train=(120,), max_size_train=1000, hflip_prob=0.0,
                          keypoint_on=True)
    flip = DatasetMapper(True, min_size_train=(120,), max_size_train=1000, hflip_prob=1.0,
                         keypoint_on=True)
    a = plain(records[0], np.random.default_rng(0))["instances"]["keypoints"]
    b = flip(records[0], np.random.default_rng(0))["instances"]["keypoints"]
    assert a.shape == (1, 17, 3) and a.dtype == torch.float32
    assert a[0, 1].tolist() == [40.0, 20.0, 2.0]  # resized 60x80 -> 120x160: x2
    # flipped: x -> 160 - x, and left_eye (1) / right_eye (2) exchange
    assert b[0, 2].tolist() == [120.0, 20.0, 2.0] and b[0, 1].tolist() == [100.0, 24.0, 1.0]
    assert b[0, 0, 2] == 0
    assert "keypoints" not in DatasetMapper(True, min_size_train=(120,))(
        records[0], np.random.default_rng(0))["instances"]


@pytest.mark.parametrize("bad, match", [
    ([1.0, 2.0, 2.0] * 16, r"48 numbers, expected 51"),
    ([1.0, 2.0, "2"] * 17, r"'keypoints'\[2\] is '2'"),
    ("1 2 2", r"not a list"),
])
def test_bad_keypoint_arrays_are_refused_naming_file_and_annotation(tmp_path, coco_writer, bad,
                                                                    match):
    from detection.data.coco import CocoFormatError, load_coco_json
    from detection.data.errors import InvalidAnnotationError
    from detection.data.mapper import DatasetMapper

    path = _person_json(tmp_path, coco_writer, bad)
    with pytest.raises(CocoFormatError, match=match) as err:
        load_coco_json(path, tmp_path / "images")
    assert "ann.json" in str(err.value) and "id 77" in str(err.value)
    # records from elsewhere are checked by the mapper
    records, _ = load_coco_json(_person_json(tmp_path, coco_writer, _person_keypoints()),
                                tmp_path / "images")
    records[0]["annotations"][0]["keypoints"] = bad
    mapper = DatasetMapper(True, min_size_train=(60,), keypoint_on=True)
    with pytest.raises(InvalidAnnotationError, match=match) as err:
        mapper(records[0])
    assert "p.png" in str(err.value) and "annotation 77" in str(err.value)


# ----------------------------------------------------------------- evaluation


def test_keypoint_ap_through_pycocotools(tmp_path, coco_writer):
    import json

    from detection.evaluation.coco_evaluation import COCOEvaluator

    path = _person_json(tmp_path, coco_writer, _person_keypoints())
    data = json.loads(path.read_text())
    data["annotations"][0]["area"] = 40 * 50 * 20  # "medium"/"large": OKS scale, large range
    path.write_text(json.dumps(data))
    gt = torch.tensor(_person_keypoints()).view(1, 17, 3)
    box = torch.tensor([[10.0, 5.0, 50.0, 55.0]])

    def evaluate(keypoints, **kwargs):
        ev = COCOEvaluator((str(path), None), tasks=("bbox", "keypoints"), **kwargs)
        ev.process([{"image_id": 5}], [{"boxes": box, "scores": torch.tensor([0.9]),
                                        "labels": torch.tensor([0]), "keypoints": keypoints}])
        return ev.evaluate()

    exact = evaluate(gt.clone())
    assert exact["keypoints"]["AP"] == pytest.approx(100.0)
    assert exact["bbox"]["AP"] == pytest.approx(100.0)
    assert set(exact["keypoints"]) >= {"AP", "AP50", "AP75", "APm", "APl", "AR", "AP-person"}
    off = gt.clone()
    off[0, 1:3, 0] += 6.0  # the two eyes 6 px off: OKS well below 1
    assert evaluate(off)["keypoints"]["AP"] < 100.0
    # wider sigmas forgive the same error
    assert evaluate(off, kpt_oks_sigmas=[10.0] * 17)["keypoints"]["AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="'keypoint'"):
        COCOEvaluator((str(path), None), tasks=("keypoint",))


def test_family_builds_loads_and_evaluates_keypoints(tmp_path, coco_writer):
    from detection.families import get_family

    cfg = _tiny_cfg()
    family = get_family(cfg)
    assert family.name == "GeneralizedRCNN"
    torch.manual_seed(0)
    model = family.build(cfg)
    assert model.roi_heads.keypoint_head is not None
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    torch.manual_seed(1)
    other = family.build(cfg)
    family.load_weights(other, str(path))
    assert torch.equal(other.roi_heads.keypoint_head.score_lowres.weight,
                       model.roi_heads.keypoint_head.score_lowres.weight)
    json_path = _person_json(tmp_path, coco_writer, _person_keypoints())
    evaluator = family.build_evaluator(cfg, (str(json_path), None), None)
    assert evaluator.tasks == ("bbox", "keypoints")


def test_optimized_model_fuses_the_keypoint_convs_and_agrees():
    import copy

    from backbones.fused import FusedConv2d
    from detection.optimize import optimize_for_inference

    torch.manual_seed(0)
    model = build_model(_tiny_cfg()).eval()
    model.roi_heads.score_thresh = 0.0
    fast = optimize_for_inference(copy.deepcopy(model))
    assert all(any(isinstance(m, FusedConv2d) for m in c.modules())
               for c in fast.roi_heads.keypoint_head.convs)
    image = [torch.randint(0, 256, (3, 80, 120), dtype=torch.uint8)]
    with torch.no_grad():
        want, got = model(image)[0], fast(image)[0]
    torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got["keypoints_scores"], want["keypoints_scores"], atol=1e-3,
                               rtol=1e-3)


def test_model_resizing_training_images_scales_target_keypoints():
    from detection.modeling.preprocess import Preprocessor

    pre = Preprocessor(pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3, min_size_test=40,
                       max_size_test=80, min_size_train=(40,), max_size_train=80,
                       resize_in_train=True).train()
    kp = torch.tensor([[[10.0, 20.0, 2.0], [30.0, 5.0, 0.0]]])
    target = {"boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0]]), "labels": torch.tensor([0]),
              "keypoints": kp}
    _, sizes, (t,) = pre([torch.full((3, 80, 120), 9.0)], [target])
    assert sizes == [(40, 60)]
    assert t["keypoints"].tolist() == [[[5.0, 10.0, 2.0], [15.0, 2.5, 0.0]]]


def test_images_with_few_visible_keypoints_are_dropped():
    from detection.data.keypoints import filter_images_with_few_keypoints

    two, none = _person_keypoints(), [0.0] * 51
    records = [{"image_id": 1, "annotations": [{"keypoints": two}]},
               {"image_id": 2, "annotations": [{"keypoints": none}, {"bbox": [0, 0, 1, 1]}]},
               {"image_id": 3, "annotations": []}]
    assert [r["image_id"] for r in filter_images_with_few_keypoints(records, 1)] == [1]
    assert filter_images_with_few_keypoints(records, 3) == []


def test_fixed_loss_normalizer_as_detectron2():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg())
    head = model.roi_heads.keypoint_head
    assert head.normalize_by_visible and head.loss_normalizer == 512 * 0.25 * 5
    features = {f"p{i}": torch.randn(1, 16, 64 // 2 ** i, 64 // 2 ** i) for i in range(2, 6)}
    rois = torch.tensor([[4.0, 4.0, 40.0, 50.0]])
    kp = torch.tensor([[[10.0, 10.0, 2.0], [20.0, 30.0, 1.0], [0.0, 0.0, 0.0],
                        [39.0, 49.0, 2.0], [60.0, 60.0, 2.0]]])  # 3 visible inside the RoI
    sampled = SampledProposals(boxes=[rois], labels=[torch.tensor([0])],
                               matched_gt=[torch.tensor([0])])
    target = [{"boxes": rois, "keypoints": kp}]
    by_visible = head.loss(features, sampled, target)["loss_keypoint"]
    head.normalize_by_visible, head.loss_normalizer, head.loss_weight = False, 10.0, 2.0
    fixed = head.loss(features, sampled, target)["loss_keypoint"]
    torch.testing.assert_close(fixed, by_visible * 3 / 10 * 2)


def test_mapper_targets_train_the_model(tmp_path, coco_writer):
    import numpy as np

    from detection.data.coco import load_coco_json
    from detection.data.mapper import DatasetMapper

    records, _ = load_coco_json(_person_json(tmp_path, coco_writer, _person_keypoints()),
                                tmp_path / "images")
    cfg = _tiny_cfg("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "17")
    mapper = DatasetMapper.from_config(cfg, is_train=True)
    assert mapper.keypoint_on
    item = mapper(records[0], np.random.default_rng(0))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model([item["image"]], [item["instances"]])
    assert torch.isfinite(losses["loss_keypoint"]) and losses["loss_keypoint"] > 0


def test_demo_draws_keypoints_and_the_skeleton():
    import runpy

    from detection.data.keypoints import COCO_PERSON_SKELETON
    from detection.visualization import class_colour, draw_instances

    image = np.zeros((60, 80, 3), np.uint8)
    kps = np.zeros((1, 17, 3), np.float32)
    kps[0, :, 2] = 1
    kps[0, 5, :2], kps[0, 6, :2] = (20, 30), (60, 30)  # the shoulders: limb (5, 6)
    kps[0, 0, :2] = (40, 10)
    scores = np.full((1, 17), 5.0, np.float32)
    scores[0, 0] = -1.0  # the nose under the threshold: not drawn
    others = [i for i in range(17) if i not in (0, 5, 6)]
    kps[0, others, 2] = 0  # invisible
    out = draw_instances(image, np.array([[0, 0, 0, 0]]), [2], keypoints=kps,
                         keypoint_scores=scores, skeleton=COCO_PERSON_SKELETON)
    colour = np.array(class_colour(2))
    assert (out[30, 20] == colour).all() and (out[30, 60] == colour).all()  # the two dots
    assert (out[30, 40] == colour).all()  # the limb between them
    assert (out[10, 40] == 0).all()  # the nose
    assert (out[45:, :] == 0).all()  # nothing else below the shoulders

    demo = runpy.run_path(str(Path(__file__).resolve().parents[2] / "tools" / "demo.py"))
    det = {"keypoints": torch.from_numpy(kps), "keypoints_scores": torch.from_numpy(scores)}
    args = demo["_keypoints"](det, [0])
    assert args["skeleton"] == COCO_PERSON_SKELETON and args["keypoints"].shape == (1, 17, 3)
    assert demo["_keypoints"]({"boxes": torch.zeros(0, 4)}, []) == {}


# ----------------------------------------------------------------- coordinate convention


def test_coordinate_offset_shifts_targets_and_outputs_in_input_pixels():
    """Offset 0.5 (detectron2's weights) on the same weights as offset 0: outputs 0.5 input
    pixels lower although the model resizes 80x120 to 64x96, and the loss on targets T is the
    offset-0 model's loss on T + 0.5."""
    torch.manual_seed(0)
    plain = build_model(_tiny_cfg())
    shifted = build_model(_tiny_cfg("MODEL.ROI_KEYPOINT_HEAD.COORDINATE_OFFSET", "0.5"))
    shifted.load_state_dict(plain.state_dict())
    assert plain.roi_heads.keypoint_head.coordinate_offset == 0.0
    assert shifted.roi_heads.keypoint_head.coordinate_offset == 0.5
    gen = torch.Generator().manual_seed(4)
    images = [torch.randint(0, 256, (3, 80, 120), dtype=torch.uint8, generator=gen)]

    for m in (plain, shifted):
        m.eval().roi_heads.score_thresh = 0.0
    with torch.no_grad():
        a, b = plain(images)[0], shifted(images)[0]
    assert a["boxes"].shape[0] > 0
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    torch.testing.assert_close(b["keypoints"][..., :2], a["keypoints"][..., :2] - 0.5,
                               atol=1e-5, rtol=0)
    assert torch.equal(b["keypoints"][..., 2], a["keypoints"][..., 2])
    assert torch.equal(b["keypoints_scores"], a["keypoints_scores"])

    kp = torch.tensor([[[20.2, 30.0, 2.0], [40.0, 50.7, 1.0], [0.0, 0.0, 0.0],
                        [35.4, 25.1, 2.0], [55.0, 58.3, 2.0]],
                       [[70.0, 12.0, 2.0], [82.3, 30.5, 2.0], [90.0, 40.0, 1.0],
                        [75.5, 35.2, 2.0], [99.0, 20.6, 2.0]]])
    boxes = torch.tensor([[10.0, 20.0, 60.0, 70.0], [65.0, 5.0, 110.0, 50.0]])

    def loss(model, keypoints):
        torch.manual_seed(1)  # the same sampled RoIs for both models
        target = {"boxes": boxes, "labels": torch.tensor([0, 0]), "keypoints": keypoints}
        return model.train()(images, [target])["loss_keypoint"].detach()

    half = torch.tensor([0.5, 0.5, 0.0])
    torch.testing.assert_close(loss(shifted, kp), loss(plain, kp + half), atol=0, rtol=0)
    assert loss(shifted, kp) != loss(plain, kp)  # the offset moves target cells


# ----------------------------------------------------------------- configs and zoo


def _zoo_weights(name: str, path: Path) -> None:
    """Random weights for zoo entry ``name``, in its format (torchvision's names; ours for
    detectron2's configs), whose box classifier scores every proposal 0.95 (detections)."""
    from detection.modeling.zoo import get_detector_weights

    torch.manual_seed(0)
    if get_detector_weights(name).source == "torchvision":
        sd = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
        sd["roi_heads.box_predictor.cls_score.weight"].zero_()
        sd["roi_heads.box_predictor.cls_score.bias"].copy_(torch.tensor([0.0, 3.0]))  # bg, person
        torch.save(sd, path)
        return
    cfg = load_config(get_detector_weights(name).config_path,
                      ["MODEL.WEIGHTS", "", "MODEL.BACKBONE.WEIGHTS", ""])
    sd = build_model(cfg).state_dict()
    sd["roi_heads.box_predictor.cls_score.weight"].zero_()
    sd["roi_heads.box_predictor.cls_score.bias"].copy_(torch.tensor([3.0, 0.0]))  # person, bg
    torch.save({"model": sd}, path)


KEYPOINT_ZOO = {  # name: (config, box AP, keypoint AP, offset)
    "torchvision/keypointrcnn_resnet50_fpn.coco_v1": (
        "torchvision/keypointrcnn_resnet50_fpn.yaml", 54.6, 65.0, 0.0),
    "detectron2/keypoint_rcnn_R_50_FPN_1x": ("detectron2/keypoint_rcnn_R_50_FPN_1x.yaml",
                                             53.6, 64.0, 0.5),
    "detectron2/keypoint_rcnn_R_50_FPN_3x": ("detectron2/keypoint_rcnn_R_50_FPN_3x.yaml",
                                             55.4, 65.5, 0.5),
}


@pytest.mark.parametrize("name", list(KEYPOINT_ZOO))
def test_keypoint_zoo_entries_load_and_predict_keypoints(name, tmp_path):
    from detection.data.catalog import DatasetCatalog
    from detection.data.keypoints import COCO_PERSON_KEYPOINT_NAMES, COCO_PERSON_SKELETON
    from detection.modeling.predictor import load_model, predict
    from detection.modeling.zoo import get_detector_weights

    config, box_ap, kp_ap, offset = KEYPOINT_ZOO[name]
    entry = get_detector_weights(name)
    assert (entry.config, entry.box_ap, entry.keypoint_ap) == (config, box_ap, kp_ap)
    assert entry.keypoints.names == COCO_PERSON_KEYPOINT_NAMES
    assert entry.keypoints.skeleton == COCO_PERSON_SKELETON
    assert len(entry.keypoints.flip_map) == 8 and ("left_eye", "right_eye") in \
        entry.keypoints.flip_map
    assert entry.keypoints.flip_indices[:5] == [0, 2, 1, 4, 3]
    cfg = load_config(entry.config_path)
    assert cfg.MODEL.WEIGHTS == name and cfg.MODEL.KEYPOINT_ON
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1 and cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS == 17
    assert cfg.MODEL.ROI_KEYPOINT_HEAD.COORDINATE_OFFSET == offset
    assert cfg.DATASETS.TRAIN == ("keypoints_coco_2017_train",)
    assert set(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST) <= set(DatasetCatalog.list())

    weights = tmp_path / "weights.pth"
    _zoo_weights(name, weights)
    small = tmp_path / "small.yaml"  # the zoo config at a CPU-test size, as a YAML path
    small.write_text(f'_BASE_: "{entry.config_path}"\nINPUT:\n  MIN_SIZE_TEST: 96\n'
                     "  MAX_SIZE_TEST: 128\nMODEL:\n  RPN:\n    POST_NMS_TOPK_TEST: 50\n"
                     "  ROI_HEADS:\n    DETECTIONS_PER_IMAGE: 3\n")
    model = load_model(small, str(weights), optimize=False)
    assert model.roi_heads.keypoint_head.coordinate_offset == offset
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    out = predict(model, image)
    n = out["boxes"].shape[0]
    assert n == 3
    assert out["keypoints"].shape == (n, 17, 3) and out["keypoints_scores"].shape == (n, 17)
    assert out["class_names"] == ["person"] * n and out["category_ids"] == [1] * n
    assert torch.isfinite(out["keypoints"]).all()


def test_convert_and_analyze_tools_take_keypoint_configs(tmp_path, capsys):
    import runpy

    from detection.modeling.predictor import load_model

    tools = Path(__file__).resolve().parents[2] / "tools"
    name = "torchvision/keypointrcnn_resnet50_fpn.coco_v1"
    src, dst = tmp_path / "tv.pth", tmp_path / "ours.pth"
    _zoo_weights(name, src)
    convert = runpy.run_path(str(tools / "convert_weights.py"))
    config = CONFIGS / KEYPOINT_ZOO[name][0]
    assert convert["main"](["--config", str(config), "--weights", str(src),
                            "--output", str(dst)]) == 0
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt["metadata"]["class_names"] == ["person"]
    tv = torch.load(src, weights_only=True)
    assert torch.equal(ckpt["model"]["roi_heads.keypoint_head.score_lowres.weight"],
                       tv["roi_heads.keypoint_predictor.kps_score_lowres.weight"])
    model = load_model(config, str(dst), optimize=False)  # our format, back through the config
    assert torch.equal(model.roi_heads.keypoint_head.convs[0].conv.weight,
                       tv["roi_heads.keypoint_head.0.weight"])
    capsys.readouterr()

    analyze = runpy.run_path(str(tools / "analyze_model.py"))
    assert analyze["main"](["--config", "keypoint_rcnn_r50_fpn.yaml", "--size", "96", "128",
                            "--opts", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST",
                            "128", "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "2"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        part, params, gflops = line.split()
        rows[part] = (int(params.replace(",", "")), float(gflops))
    head = sum(p.numel() for p in model.roi_heads.keypoint_head.parameters())
    box = sum(p.numel() for n, p in model.roi_heads.named_parameters()
              if not n.startswith("keypoint_head."))
    assert rows["roi_heads"][0] == head + box  # the keypoint head is counted in the RoI heads
    assert rows["total"][0] == sum(p.numel() for p in model.parameters())


def test_keypoint_ap_equals_pycocotools_with_occluded_outside_keypoints_and_crowds(
        tmp_path, coco_writer):
    """Three people (keypoints visible, occluded (v=1) and unlabelled (v=0, one of them off
    the image)) and a crowd region; seven detections with growing keypoint errors, one inside
    the crowd: the evaluator's keypoint AP and every other statistic equal pycocotools'
    COCOeval run by hand on the same results."""
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from detection.data.keypoints import COCO_PERSON_KEYPOINT_NAMES
    from detection.evaluation.coco_evaluation import COCOEvaluator

    g = np.random.default_rng(0)
    cats = [{"id": 1, "name": "person", "keypoints": list(COCO_PERSON_KEYPOINT_NAMES),
             "skeleton": [[16, 14], [14, 12]]}]
    images = [{"id": 5, "file_name": "p.png", "height": 200, "width": 240}]
    boxes = [[10, 20, 60, 120], [90, 10, 80, 150], [180, 60, 55, 130]]  # medium, large
    anns, people = [], []
    for k, (x, y, w, h) in enumerate(boxes):
        kp = np.zeros((17, 3))
        kp[:, 0] = x + g.uniform(0, w, 17)
        kp[:, 1] = y + g.uniform(0, h, 17)
        kp[:, 2] = g.choice([0, 1, 2], 17, p=[0.2, 0.3, 0.5])
        kp[kp[:, 2] == 0, :2] = 0
        if k == 2:  # the third person runs off the image: its right side unlabelled
            kp[[2, 4, 6, 8, 10, 12, 14, 16]] = 0
        people.append(kp)
        anns.append({"id": 10 + k, "image_id": 5, "category_id": 1, "bbox": [x, y, w, h],
                     "area": float(w * h), "iscrowd": 0,
                     "num_keypoints": int((kp[:, 2] > 0).sum()),
                     "keypoints": kp.reshape(-1).round(2).tolist()})
    anns.append({"id": 20, "image_id": 5, "category_id": 1, "bbox": [60, 140, 120, 55],
                 "area": 6600.0, "iscrowd": 1, "num_keypoints": 0, "keypoints": [0] * 51,
                 "segmentation": {"size": [200, 240], "counts": None}})
    # a crowd region as an uncompressed RLE of its box
    mask = np.zeros((200, 240), np.uint8, order="F")
    mask[140:195, 60:180] = 1
    from pycocotools import mask as mask_util

    rle = mask_util.encode(mask)
    anns[-1]["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    path = coco_writer(tmp_path, images, anns, cats)

    det_boxes, det_kps, det_scores = [], [], []
    for k, (x, y, w, h) in enumerate(boxes):
        for noise in (0.5, 4.0):  # a close and a loose guess of each person
            kp = people[k][:, :2] + g.normal(0, noise, (17, 2))
            det_kps.append(np.concatenate([kp, np.ones((17, 1))], 1))
            det_boxes.append([x, y, x + w, y + h])
            det_scores.append(float(g.uniform(0.3, 0.99)))
    det_kps.append(np.concatenate([g.uniform([60, 140], [180, 195], (17, 2)),
                                   np.ones((17, 1))], 1))  # inside the crowd region
    det_boxes.append([62, 142, 178, 193])
    det_scores.append(0.95)
    ev = COCOEvaluator((str(path), None), tasks=("bbox", "keypoints"))
    ev.process([{"image_id": 5}], [{
        "boxes": torch.tensor(det_boxes, dtype=torch.float32),
        "scores": torch.tensor(det_scores), "labels": torch.zeros(7, dtype=torch.int64),
        "keypoints": torch.tensor(np.stack(det_kps), dtype=torch.float32)}])
    ours = ev.evaluate()["keypoints"]

    results = [{"image_id": 5, "category_id": 1, "score": s,
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "keypoints": np.asarray(kp, np.float32).astype(np.float64).reshape(-1).tolist()}
               for b, kp, s in zip(det_boxes, det_kps, det_scores)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        e = COCOeval(gt, gt.loadRes(results), "keypoints")
        e.evaluate()
        e.accumulate()
        e.summarize()
    names = ["AP", "AP50", "AP75", "APm", "APl"]
    want = {n: 100 * float(v) for n, v in zip(names, e.stats[:5])}
    assert 0 < want["AP"] < 100 and min(want.values()) >= 0  # the case discriminates
    for n in names:
        assert ours[n] == pytest.approx(want[n], abs=1e-6), n
