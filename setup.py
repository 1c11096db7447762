"""guide-fast: fast, tested GUIDE identity unlearning for EG3D.

torch is declared without a version pin on purpose: GPU users bring their own CUDA build
(2.4 or newer). The Makefile pins torch for the project's own CPU development machines only.
"""
from setuptools import find_packages, setup

setup(
    name="guide-fast",
    version="0.1.0",
    description="GUIDE (Generative Unlearning for Any Identity) for EG3D: Triton kernels, "
    "CUDA-graph fine-tuning, identity scoring, evaluation.",
    python_requires=">=3.10",
    packages=find_packages(include=["guide_fast", "guide_fast.*"]) + ["guide_fast.kernels"],
    # The Triton kernels live in the top-level kernels/ folder of the repository but are
    # installed as guide_fast.kernels: a top-level import name `kernels` collides with an
    # existing PyPI package.
    package_dir={"guide_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "pillow",
        "tqdm",
        "onnx",
        "onnxruntime",
        "nvtx",
        # GUIDE's ID-metric alignment warps with cv2.warpAffine (OpenCV's fixed-point bilinear);
        # the 4.x series of GUIDE's environment (opencv-python 4.10; tested with 4.10.0.84)
        "opencv-python-headless>=4.5,<5",
        # every unlearning run draws grid.png, losses.png and identity.png (unlearn/plots.py, Agg backend)
        "matplotlib",
    ],
    extras_require={
        # torchvision: VGG16 / Inception architectures, and facenet-pytorch imports it.
        # facenet-pytorch itself is installed with --no-deps by the Makefile (its pins are stale).
        "face": ["torchvision", "scipy", "requests"],
        "test": [
            "torchvision",
            "scipy",
            "requests",
            "pytest",
            "pytest-timeout",
            "lpips==0.1.4",
            "scikit-image",
            "onnxscript",
            "matplotlib",
        ],
    },
    entry_points={"console_scripts": ["guide-fast=guide_fast.cli:main"]},
)
