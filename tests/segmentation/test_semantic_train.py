"""A short training run through the shared runner learns: mIoU rises well above chance.

Marked slow: about a minute on 2 quiet CPU cores (several when the machine is shared)."""

import pytest
import torch

import segmentation  # noqa: F401  (registers the semantic keys and SemanticSegmentor)
from detection.data.shapes import ensure_shapes_dataset
from detection.engine.evaluation import evaluate
from detection.engine.loading import attach_dataset_metadata, build_model_from_cfg, load_weights
from detection.engine.train_net import train
from segmentation.config import load_config


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    paths = ensure_shapes_dataset(root=root, num_train=8, num_val=4, image_size=(64, 96))
    return (f"{paths.train_json}:{paths.train_images}", f"{paths.val_json}:{paths.val_images}")


@pytest.mark.slow
def test_short_training_raises_miou_above_chance(tiny_shapes, tmp_path):
    train_set, val = tiny_shapes
    torch.manual_seed(0)
    cfg = load_config("semantic_fpn_r18_shapes.yaml", [
        "DATASETS.TRAIN", f"('{train_set}',)", "DATASETS.TEST", f"('{train_set}',)",
        "INPUT.MIN_SIZE_TRAIN", "()",  # no resizing: flips only
        "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "64",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.MAX_ITER", "100",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.003", "TEST.EVAL_PERIOD", "0",
        "SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", "(1000,)",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "False",
        "SOLVER.CHECKPOINT_PERIOD", "0", "SOLVER.LOG_PERIOD", "20",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ])
    attach_dataset_metadata(cfg)  # COCO json without stuff_classes: background + 4
    assert cfg.MODEL.CLASS_NAMES == ["background", "circle", "rectangle", "triangle", "cross"]
    untrained = build_model_from_cfg(cfg)
    before = evaluate(cfg, untrained)["sem_seg"]["mIoU"]
    model, results = train(cfg)
    after = results["sem_seg"]["mIoU"]
    print(f"mIoU before {before:.1f}, after {after:.1f}")
    # predicting background everywhere gives about 80 / 5 = 16; random labels less
    assert after > 25, (before, after)
    assert after > before + 10, (before, after)
    assert (tmp_path / "out" / "model_final.pth").is_file()
    # the checkpoint reloads through the shared runner's weight loading
    reloaded = build_model_from_cfg(cfg)
    load_weights(reloaded, str(tmp_path / "out" / "model_final.pth"), cfg)
    image = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(image)[0]["sem_seg"],
                                   model.eval()(image)[0]["sem_seg"])
