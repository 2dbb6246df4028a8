"""Integrations with frameworks that are not dependencies import cleanly without them."""

import importlib.util

import pytest


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None,
                    reason="detectron2 is installed: test_detectron2_integration covers it")
def test_detectron2_integration_is_a_no_op_without_detectron2():
    import backbones.integrations.detectron2 as detkit_d2

    assert detkit_d2.AVAILABLE is False
    assert callable(detkit_d2.build_detkit_resnet_fpn_backbone)  # defined, registered nowhere
