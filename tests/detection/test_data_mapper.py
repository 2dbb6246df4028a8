import numpy as np
import pytest
import torch

from detection.config import get_cfg
from detection.data.coco import load_coco_json
from detection.data.image_io import ImageReadError
from detection.data.mapper import DatasetMapper, MapDataset

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
# (x0, y0, x1, y1) filled rectangles, one per colour; the last one partly leaves the image
BOXES = [(4, 6, 30, 20), (40, 10, 70, 50), (10, 30, 25, 55), (75, 40, 100, 60)]


@pytest.fixture
def rect_dataset(tmp_path, coco_writer):
    h, w = 60, 90
    img = np.full((h, w, 3), 128, np.uint8)
    anns = []
    for i, ((x0, y0, x1, y1), c) in enumerate(zip(BOXES, COLOURS)):
        img[y0:y1, x0:x1] = c
        anns.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": [3, 7, 42, 3][i],
                "bbox": [x0, y0, x1 - x0, y1 - y0],  # the last one is clipped at load
                "iscrowd": 0,
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            }
        )
    anns.append(  # a crowd region: dropped from training targets
        {"id": 9, "image_id": 1, "category_id": 7, "bbox": [0, 0, 3, 3], "iscrowd": 1}
    )
    images = [{"id": 1, "file_name": "r.png", "height": h, "width": w}]
    path = coco_writer(tmp_path, images, anns, pixels={1: img})
    records, _ = load_coco_json(path, tmp_path / "images")
    return records[0]


@pytest.mark.parametrize("seed", range(6))
def test_boxes_stay_on_their_objects(rect_dataset, seed):
    mapper = DatasetMapper(True, min_size_train=(90, 120, 150), max_size_train=200, mask_on=True)
    out = mapper(rect_dataset, np.random.default_rng(seed))
    img = out["image"].permute(1, 2, 0).numpy().astype(int)
    inst = out["instances"]
    assert out["height"] == 60 and out["width"] == 90  # original size
    assert inst["boxes"].dtype == torch.float32 and inst["labels"].dtype == torch.int64
    assert inst["labels"].tolist() == [0, 1, 2, 0]
    H, W = img.shape[:2]
    assert inst["masks"].shape == (4, H, W) and inst["masks"].dtype == torch.uint8
    for k, (box, colour) in enumerate(zip(inst["boxes"].tolist(), COLOURS)):
        x0, y0, x1, y1 = box
        # inside (shrunk by 1.5 px for resampling at the edges): the object's colour
        inner = img[int(np.ceil(y0 + 1.5)) : int(y1 - 1.5), int(np.ceil(x0 + 1.5)) : int(x1 - 1.5)]
        assert inner.size > 0
        assert np.abs(inner - colour).max() <= 12, (k, box)
        # a ring just outside the box (2..4 px away): not the object's colour
        ring = np.zeros((H, W), bool)
        ring[max(0, int(y0) - 4) : int(y1) + 4, max(0, int(x0) - 4) : int(x1) + 4] = True
        ring[max(0, int(y0) - 2) : int(y1) + 2, max(0, int(x0) - 2) : int(x1) + 2] = False
        if ring.any():
            assert not (np.abs(img[ring] - colour).max(axis=1) <= 12).any(), (k, box)
        # the mask covers the box
        m = inst["masks"][k].numpy()
        ys, xs = np.nonzero(m)
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1


def test_flip_and_resize_happen(rect_dataset):
    mapper = DatasetMapper(True, min_size_train=(120,), max_size_train=1000, hflip_prob=1.0)
    out = mapper(rect_dataset, np.random.default_rng(0))
    assert tuple(out["image"].shape) == (3, 120, 180)
    x0, y0, x1, y1 = out["instances"]["boxes"][0].tolist()
    # box 0 was (4, 6, 30, 20) in 90x60: scaled x2 and mirrored
    assert np.allclose([x0, y0, x1, y1], [180 - 60, 12, 180 - 8, 40], atol=0.01)


def test_max_size_caps_long_edge(rect_dataset):
    mapper = DatasetMapper(True, min_size_train=(400,), max_size_train=150, hflip_prob=0.0)
    out = mapper(rect_dataset, np.random.default_rng(0))
    assert tuple(out["image"].shape) == (3, 100, 150)


def test_same_rng_same_sample(rect_dataset):
    mapper = DatasetMapper(True, min_size_train=(90, 120, 150), max_size_train=200)
    ds = MapDataset([rect_dataset] * 3, mapper, seed=5)
    a, b = ds[(2, 4)], ds[(2, 4)]
    assert torch.equal(a["image"], b["image"])
    assert torch.equal(a["instances"]["boxes"], b["instances"]["boxes"])
    sizes = {tuple(ds[(i, e)]["image"].shape) for i in range(3) for e in range(4)}
    assert len(sizes) > 1  # different (index, epoch) draw different scales


def test_eval_mode_keeps_original_image(rect_dataset):
    cfg = get_cfg()
    mapper = DatasetMapper.from_config(cfg, is_train=False)
    out = mapper(rect_dataset)
    assert tuple(out["image"].shape) == (3, 60, 90) and out["image"].dtype == torch.uint8
    assert "instances" not in out
    assert out["image_id"] == 1 and out["file_name"].endswith("r.png")


def test_empty_annotations(rect_dataset):
    rec = dict(rect_dataset, annotations=[])
    out = DatasetMapper(True, min_size_train=(90,), mask_on=True)(rec, np.random.default_rng(0))
    assert out["instances"]["boxes"].shape == (0, 4)
    assert out["instances"]["labels"].shape == (0,)
    assert out["instances"]["masks"].shape[0] == 0


def test_missing_image_error_or_skip(rect_dataset, tmp_path):
    rec = dict(rect_dataset, file_name=str(tmp_path / "gone.png"), image_id=77)
    with pytest.raises(ImageReadError, match=r"gone.png.*image_id=77"):
        DatasetMapper(False)(rec)
    mapper = DatasetMapper(True, min_size_train=(90,), skip_missing_images=True)
    assert mapper(rec) is None and mapper.num_skipped_images == 1
    ds = MapDataset([rec, rect_dataset], mapper, seed=0)
    out = ds[(0, 0)]  # replaced by a readable record
    assert out["image_id"] == 1


def test_no_resize_when_the_model_resizes(rect_dataset):
    cfg = get_cfg()
    cfg.INPUT.HFLIP_PROB = 1.0
    if "RESIZE_IN_MODEL_TRAIN" in cfg.INPUT:
        cfg.INPUT.RESIZE_IN_MODEL_TRAIN = True
        out = DatasetMapper.from_config(cfg, True)(rect_dataset, np.random.default_rng(0))
        assert tuple(out["image"].shape) == (3, 60, 90)
        box = out["instances"]["boxes"][0].tolist()
        assert np.allclose(box, [60, 6, 86, 20], atol=1e-3)  # flipped only


@pytest.mark.parametrize("h, w, short, max_size", [
    (60, 90, 120, 1000), (187, 301, 192, 320), (301, 187, 192, 320), (200, 1000, 160, 320),
    (333, 333, 176, 176), (101, 757, 800, 1333), (97, 113, 101, 130)])
def test_training_at_a_fixed_size_sees_the_models_test_size(tmp_path, h, w, short, max_size):
    """One resize rule: the mappers (detection, semantic, panoptic share it) at a fixed short
    edge give the size the model's test resize gives for the same setting."""
    from PIL import Image

    from detection.modeling.preprocess import Preprocessor, resized_shape

    path = tmp_path / "img.png"
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)
    record = {"file_name": str(path), "height": h, "width": w, "image_id": 1,
              "annotations": [{"bbox": [1.0, 1.0, w / 2, h / 2], "category_id": 0,
                               "iscrowd": 0}]}
    mapper = DatasetMapper(True, min_size_train=(short,), max_size_train=max_size,
                           hflip_prob=0.0)
    trained = tuple(mapper(record, np.random.default_rng(0))["image"].shape[1:])
    model = Preprocessor(pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3, min_size_test=short,
                         max_size_test=max_size).eval()
    _, sizes, _ = model([torch.zeros(3, h, w)])
    assert trained == tuple(sizes[0]) == resized_shape(h, w, short, max_size)
