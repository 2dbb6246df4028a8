from setuptools import find_packages, setup

setup(
    name="resnet-detkit",
    version="0.1.0",
    description="ResNet backbones, FPN, Faster R-CNN / Mask R-CNN and segmentation heads, "
    "with COCO training and evaluation tools",
    packages=find_packages(include=["backbones*", "detection*", "segmentation*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1,<=2.14.1",
        "torchvision>=0.16,<=0.29.1",
        "numpy",
        "pillow",
        "pycocotools>=2.0.6",
        # the same COCO evaluation in C++, 5-10x faster; pycocotools stays the reference and
        # tests check that both give identical stats
        "faster-coco-eval>=1.6",
        "albumentations>=1.4",
        "fvcore>=0.1.5",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "safetensors",
    ],
    extras_require={
        # exporting (ONNX, OpenVINO IR) and running exports: load_model(..., runtime=...);
        # nncf (OpenVINO's own post-training quantizer) for int8 exports
        "deploy": ["onnx>=1.15", "onnxruntime>=1.17", "openvino>=2024.0", "nncf>=2.14"],
        # tests: the deploy runtimes too, hypothesis for the fuzz tests, timm for the
        # resnet50d parity test
        "dev": ["pytest>=7", "ruff", "hypothesis>=6", "timm>=0.9",
                "onnx>=1.15", "onnxruntime>=1.17", "openvino>=2024.0", "nncf>=2.14"],
    },
)
