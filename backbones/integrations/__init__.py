"""Our backbones inside other detection frameworks.

- ``backbones.adapters.TorchvisionBackbone``: torchvision's ``FasterRCNN`` / ``MaskRCNN``.
- ``backbones.integrations.detectron2``: detectron2's ``BACKBONE_REGISTRY`` (importing it
  registers ``build_detkit_resnet_backbone`` and ``build_detkit_resnet_fpn_backbone``; a
  no-op where detectron2 is not installed).
"""
