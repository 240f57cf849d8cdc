"""tailkd_dist: scale-out trainer for tail-aware knowledge distillation (TAD) of language models.

Install on a CPU-only machine with the README's first line (a pinned lock installed with
--no-deps, see README "Why the install line looks like this"); on a GPU cluster
`pip install -e .` with dependencies works as usual.
"""
from setuptools import find_packages, setup

setup(
    name="tailkd_dist",
    version="0.1.0",
    description="Tail-aware knowledge distillation (TAD) at cluster scale: DeepSpeed/FSDP2, "
    "vocabulary-sharded fused loss, streaming data.",
    python_requires=">=3.10",
    packages=find_packages(include=["tailkd_dist", "tailkd_dist.*"]),
    include_package_data=True,
    # The DeepSpeed configs ship inside the package (ds_configs/ at the top of the checkout is
    # a link to them): a run started outside the checkout still finds the defaults.
    package_data={"tailkd_dist": ["ds_configs/*.json"]},
    # Tested: CI (CPU, Python 3.11) runs the whole suite with requirements.lock: torch 2.13.0,
    # transformers 5.17.0, huggingface_hub 1.33.0, tokenizers 0.23.2, deepspeed 0.19.8, datasets
    # 5.0.1; the previous lock (transformers 4.57.6, huggingface_hub 0.36.2, tokenizers 0.22.2)
    # passed the same suite, and so did torch 2.14.1 (CUDA build on CPU). tools/gpu_check.py is
    # prepared for the GPU image (Python 3.12, torch 2.11, transformers 5.17). torch 2.15 is
    # admitted but not yet run (README, "Library versions").
    install_requires=[
        "torch>=2.11,<2.16",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.57,<6",
        "datasets>=3.0,<6",
        "huggingface_hub>=0.36,<2",
        "tokenizers>=0.22,<0.24",
        "safetensors>=0.4",
        "mosaicml-streaming>=0.11,<0.14",
        "numpy>=1.26,<2.2",
        "tensorboard>=2.15",
        "tqdm>=4.64",
        "pyyaml>=6",
        "pydantic>=2.7,<3",
        "matplotlib>=3.7",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3"]},
    entry_points={
        "console_scripts": [
            "tailkd-prepare-data=tailkd_dist.data.prepare:main",
            "tailkd-train=tailkd_dist.train:main",
            "tailkd-export-hf=tailkd_dist.export:main",
            "tailkd-derive-student=tailkd_dist.derive:main",
            "tailkd-preflight=tailkd_dist.preflight:main",
            "tailkd-demo=tailkd_dist.demo:main",
            "tailkd-cache-teacher=tailkd_dist.cache_teacher:main",
        ]
    },
)
