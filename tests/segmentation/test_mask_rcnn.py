"""Mask R-CNN: config and build, detectron2 checkpoint names, targets, losses, inference
outputs, segm AP against pycocotools, and learning on a tiny shapes set."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import segmentation  # noqa: F401  (MODEL.MASK_ON, ROI_MASK_HEAD.*)
from detection.engine.loading import build_model_from_cfg
from detection.evaluation.coco_evaluation import COCOEvaluator
from detection.modeling.convert import load_state_dict
from detection.modeling.structures import SampledProposals
from segmentation.config import ConfigKeyError, load_config
from segmentation.mask_rcnn import (
    MaskRCNN,
    build_mask_rcnn,
    crop_and_resize,
    detectron2_to_ours,
    to_ours,
)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared CPU, tiny convs run many times faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_cfg(num_classes: int = 3):
    cfg = load_config("mask_rcnn_r18_fpn_shapes.yaml")
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 2
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    return cfg


def test_config_keys_and_builders():
    cfg = load_config("mask_rcnn_r50_fpn.yaml")
    assert cfg.MODEL.MASK_ON and cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION == 14
    assert cfg.MODEL.ROI_MASK_HEAD.NUM_CONV == 4 and cfg.MODEL.ROI_MASK_HEAD.CONV_DIM == 256
    with pytest.raises(ConfigKeyError, match="MODEL.ROI_MASK_HEAD.NUM_CONV"):
        load_config("mask_rcnn_r50_fpn.yaml", ["MODEL.ROI_MASK_HEAD.NUM_CONVS", "2"])
    tiny = _tiny_cfg()
    assert isinstance(build_model_from_cfg(tiny), MaskRCNN)
    tiny.MODEL.MASK_ON = False  # the same runner path builds a plain detector
    assert not isinstance(build_model_from_cfg(tiny), MaskRCNN)


def _detectron2_mask_rcnn_r50_fpn_shapes(k: int = 80) -> dict:
    """Names and shapes of detectron2's mask_rcnn_R_50_FPN_3x checkpoint (FrozenBN: weight,
    bias, running mean and var per norm)."""
    sd = {}
    stem = "backbone.bottom_up.stem.conv1"
    sd[f"{stem}.weight"] = (64, 3, 7, 7)
    for p in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{stem}.norm.{p}"] = (64,)
    in_ch = 64
    for s, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        out_ch = width * 4
        for b in range(n):
            pre = f"backbone.bottom_up.res{s + 2}.{b}"
            convs = {"conv1": (width, in_ch if b == 0 else out_ch, 1, 1),
                     "conv2": (width, width, 3, 3), "conv3": (out_ch, width, 1, 1)}
            if b == 0:
                convs["shortcut"] = (out_ch, in_ch, 1, 1)
            for name, shape in convs.items():
                sd[f"{pre}.{name}.weight"] = shape
                for p in ("weight", "bias", "running_mean", "running_var"):
                    sd[f"{pre}.{name}.norm.{p}"] = (shape[0],)
        in_ch = out_ch
    for lvl, ch in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        sd[f"backbone.fpn_lateral{lvl}.weight"], sd[f"backbone.fpn_lateral{lvl}.bias"] = (
            (256, ch, 1, 1), (256,))
        sd[f"backbone.fpn_output{lvl}.weight"], sd[f"backbone.fpn_output{lvl}.bias"] = (
            (256, 256, 3, 3), (256,))
    rpn = "proposal_generator.rpn_head"
    sd.update({f"{rpn}.conv.weight": (256, 256, 3, 3), f"{rpn}.conv.bias": (256,),
               f"{rpn}.objectness_logits.weight": (3, 256, 1, 1),
               f"{rpn}.objectness_logits.bias": (3,),
               f"{rpn}.anchor_deltas.weight": (12, 256, 1, 1), f"{rpn}.anchor_deltas.bias": (12,),
               "roi_heads.box_head.fc1.weight": (1024, 256 * 49),
               "roi_heads.box_head.fc1.bias": (1024,),
               "roi_heads.box_head.fc2.weight": (1024, 1024),
               "roi_heads.box_head.fc2.bias": (1024,),
               "roi_heads.box_predictor.cls_score.weight": (k + 1, 1024),
               "roi_heads.box_predictor.cls_score.bias": (k + 1,),
               "roi_heads.box_predictor.bbox_pred.weight": (4 * k, 1024),
               "roi_heads.box_predictor.bbox_pred.bias": (4 * k,)})
    for j in range(1, 5):
        sd[f"roi_heads.mask_head.mask_fcn{j}.weight"] = (256, 256, 3, 3)
        sd[f"roi_heads.mask_head.mask_fcn{j}.bias"] = (256,)
    sd.update({"roi_heads.mask_head.deconv.weight": (256, 256, 2, 2),
               "roi_heads.mask_head.deconv.bias": (256,),
               "roi_heads.mask_head.predictor.weight": (k, 256, 1, 1),
               "roi_heads.mask_head.predictor.bias": (k,)})
    return sd


def test_detectron2_mask_rcnn_names_load_with_every_key_used():
    shapes = _detectron2_mask_rcnn_r50_fpn_shapes()
    gen = torch.Generator().manual_seed(0)
    ckpt = {"model": {k: np.asarray(torch.randn(s, generator=gen)) for k, s in shapes.items()},
            "__author__": "Detectron2 Model Zoo"}
    ckpt["model"]["pixel_mean"] = np.zeros((3, 1, 1))  # detectron2 files may carry these
    cfg = load_config("detectron2/mask_rcnn_R_50_FPN_3x.yaml")
    cfg.MODEL.BACKBONE.WEIGHTS = ""
    model = build_mask_rcnn(cfg)
    converted = detectron2_to_ours(ckpt)
    assert converted.keys() == to_ours(ckpt).keys()
    load_state_dict(model, converted)  # refuses missing or unused keys
    own = model.state_dict()
    w = ckpt["model"]["roi_heads.mask_head.mask_fcn3.weight"]
    assert torch.equal(own["roi_heads.mask_head.convs.2.conv.weight"], torch.from_numpy(w))
    assert own["roi_heads.mask_head.predictor.weight"].shape == (80, 256, 1, 1)
    extra = dict(ckpt["model"], **{"roi_heads.mask_head.mask_fcn5.weight": w})
    with pytest.raises(KeyError, match="missing|unexpected"):
        load_state_dict(model, detectron2_to_ours({"model": extra}))


def test_crop_and_resize_targets():
    masks = torch.zeros(2, 40, 60, dtype=torch.uint8)
    masks[0, 10:30, 20:40] = 1
    masks[1, :, :30] = 1
    boxes = torch.tensor([[20.0, 10, 40, 30], [20.0, 10, 40, 30], [0.0, 0, 60, 40]])
    # aligned (detectron2): pixel i covers [i, i + 1), so the RoI holds exactly the instance
    t = crop_and_resize(masks, boxes, torch.tensor([0, 1, 1]), 28, aligned=True)
    assert t.shape == (3, 28, 28)
    assert torch.allclose(t[0], torch.ones(28, 28))
    assert torch.allclose(t[1][:, :14], torch.ones(28, 14)) and t[1][:, 14:].max() == 0
    assert torch.allclose(t[2][:, :14], torch.ones(28, 14)) and t[2][:, 14:].max() == 0
    # torchvision's (not aligned): pixel centres at integers, half a pixel off at the far edges
    t = crop_and_resize(masks, boxes, torch.tensor([0, 1, 1]), 28)
    assert torch.allclose(t[0][:27, :27], torch.ones(27, 27)) and t[0][27, 27] < 1
    assert t[1][:, 15:].max() == 0


def _batch(cfg, n: int = 2):
    gen = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(n):
        h, w = 64 + 8 * i, 96
        img = torch.randint(0, 255, (3, h, w), generator=gen).to(torch.uint8)
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 8:40, 10:50] = 1
        masks[1, 30:60, 55:90] = 1
        targets.append({"boxes": torch.tensor([[10.0, 8, 50, 40], [55.0, 30, 90, 60]]),
                        "labels": torch.tensor([0, 2]), "masks": masks})
        images.append(img)
    return images, targets


def test_training_losses_and_inference_outputs(one_thread):
    cfg = _tiny_cfg()
    cfg.INPUT.RESIZE_IN_MODEL_TRAIN = True  # masks resized by the model along with the image
    cfg.INPUT.MIN_SIZE_TRAIN = (48,)
    torch.manual_seed(0)
    model = build_mask_rcnn(cfg).train()
    images, targets = _batch(cfg)
    losses = model(images, targets)
    assert set(losses) >= {"loss_mask", "loss_cls"}
    assert abs(losses["loss_mask"].item() - np.log(2)) < 0.05  # small init: logits near 0
    sum(losses.values()).backward()
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="masks"):
        model(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o, img in zip(out, images):
        n = o["boxes"].shape[0]
        assert o["masks"].shape == (n, 1, *img.shape[-2:]) and o["masks"].dtype == torch.float32
        assert o["binary_masks"].shape == (n, *img.shape[-2:])
        assert o["binary_masks"].dtype == torch.bool


def test_no_foreground_gives_zero_mask_loss():
    model = build_mask_rcnn(_tiny_cfg()).train()
    head = model.roi_heads.mask_head
    sampled = SampledProposals(boxes=[torch.tensor([[0.0, 0, 10, 10]])],
                               labels=[torch.tensor([3])], matched_gt=[torch.tensor([0])])
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 64, 96, dtype=torch.uint8)}
    loss = head.loss({}, sampled, [target])["loss_mask"]
    assert loss.item() == 0 and loss.requires_grad


def test_segm_ap_equals_pycocotools_on_mask_rcnn_outputs(tmp_path):
    """Outputs shaped like the model's ((N, 1, H, W) probabilities) against pycocotools run
    directly on the thresholded masks."""
    rng = np.random.default_rng(0)
    images, anns, outputs = [], [], []
    for img_id in (1, 2):
        h, w = 50, 70
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": h, "width": w})
        probs = []
        for j in range(3):
            m = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, 25), rng.integers(0, 40)
            m[y : y + 20, x : x + 25] = 1
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": [4, 8][j % 2],
                         "bbox": [float(x), float(y), 25.0, 20.0], "area": float(m.sum()),
                         "iscrowd": 0, "segmentation": rle})
            p = np.clip(m * 0.8 + rng.normal(0, 0.25, m.shape), 0, 1)  # noisy probabilities
            probs.append(p)
        probs = torch.tensor(np.stack(probs), dtype=torch.float32)[:, None]
        xyxy = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + 25, a["bbox"][1] + 20]
                for a in anns[-3:]]
        outputs.append({"boxes": torch.tensor(xyxy),
            "scores": torch.tensor([0.9, 0.6, 0.3]), "labels": torch.tensor([0, 1, 0]),
            "masks": probs})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 4, "name": "a"}, {"id": 8, "name": "b"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ev = COCOEvaluator((path, {"contiguous_id_to_dataset_id": [4, 8]}), tasks=("bbox", "segm"),
                       engine="pycocotools")
    ev.process([{"image_id": 1}, {"image_id": 2}], outputs)
    ours = ev.evaluate()["segm"]["AP"]
    # the reference: pycocotools on RLEs of the masks thresholded at 0.5
    dets = []
    for img_id, o in zip((1, 2), outputs):
        for m, s, lab in zip(o["masks"][:, 0].numpy(), o["scores"], o["labels"]):
            rle = mask_util.encode(np.asfortranarray((m >= 0.5).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            dets.append({"image_id": img_id, "category_id": [4, 8][int(lab)],
                         "segmentation": rle, "score": float(s)})
    coco = COCO(str(path))
    e = COCOeval(coco, coco.loadRes(dets), "segm")
    e.evaluate()
    e.accumulate()
    e.summarize()
    assert 0 < ours < 100
    assert ours == pytest.approx(100 * e.stats[0], abs=1e-9)


@pytest.mark.parametrize("mode", ["detectron2"])
def test_learns_masks_on_one_image(mode, one_thread):
    """Trained on one image with the boxes given as proposals' ground truth, the predicted
    mask of each object overlaps its ground truth with IoU > 0.7."""
    torch.manual_seed(0)
    cfg = _tiny_cfg(num_classes=2)
    cfg.MODEL.ROI_MASK_HEAD.PASTE_MODE = mode
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_mask_rcnn(cfg).train()
    h, w = 64, 96
    img = torch.full((3, h, w), 90, dtype=torch.uint8)
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks[0] = ((yy - 30) ** 2 + (xx - 28) ** 2 <= 18 ** 2).to(torch.uint8)  # disc
    tri = (yy >= 12) & (yy <= 56) & ((xx - 74).abs() <= (yy - 12) // 2)  # triangle
    masks[1] = tri.to(torch.uint8)
    img[:, masks[0].bool()] = torch.tensor([230, 40, 40], dtype=torch.uint8)[:, None]
    img[:, masks[1].bool()] = torch.tensor([40, 200, 60], dtype=torch.uint8)[:, None]
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([0, 1]),
              "masks": masks}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(60):
        losses = model([img], [target])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        feats = model.backbone(model.preprocessor([img])[0])
    # the mask head on the ground-truth boxes (in the 64-px resized frame: scale 1)
    scale = model.preprocessor([img])[1][0][0] / h
    from detection.modeling.structures import Detections

    det = Detections(boxes=target["boxes"] * scale, scores=torch.ones(2),
                     labels=torch.tensor([0, 1]))
    probs = model.roi_heads.mask_head.predict(feats, [det])[0].masks
    from segmentation.mask_rcnn import paste_masks

    pasted = paste_masks(probs, target["boxes"], (h, w), mode=mode) >= 0.5
    for k in range(2):
        inter = (pasted[k] & masks[k].bool()).sum().item()
        union = (pasted[k] | masks[k].bool()).sum().item()
        assert inter / union > 0.7, (k, inter / union)
