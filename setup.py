"""Install the ``cpm_live`` package from ``src/``.

Pins are ranges that were tested together (torch 2.13 CPU, bitsandbytes 0.50, peft 0.21).
``torch`` is a range so that an already installed CPU build satisfies it; install
``torch==2.13.0`` first on a CPU-only machine to avoid pulling a CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="cpm_live",
    version="0.1.0",
    description="CPM-Bee fine-tuning with QLoRA on BMTrain and PyTorch FSDP2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    # quant/gemv_4bit.c is compiled at first use (cpm_live/quant/native.py), so it ships as source.
    package_data={"cpm_live": ["demo_data/*.jsonl", "quant/*.c"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6,<2.15",
        "bitsandbytes>=0.46,<0.51",
        "peft>=0.15,<0.22",
        "safetensors>=0.4,<0.9",
        "numpy>=1.24,<3",
        "jsonlines>=3.1,<5",
        "tqdm>=4.60,<5",
        "tensorboard>=2.14,<2.22",
        "rouge-score>=0.1.2,<0.2",
        "sacrebleu>=2.3,<2.7",
        "matplotlib>=3.7,<4",
    ],
    extras_require={
        "test": ["pytest>=7,<10", "pytest-xdist>=3.5,<4", "ruff>=0.5"],
        "gpu": ["bmtrain>=1.0.1,<1.1"],
        # The side-by-side benchmark's peer (benchmarks/bench_peer.py): a Llama loaded in 4-bit by
        # transformers, with peft's LoRA (peft and bitsandbytes are required anyway).
        "peer": ["transformers>=5.0,<6", "accelerate>=1.0,<2"],
    },
    entry_points={
        "console_scripts": [
            "cpm-bee-quantize=cpm_live.convert.cli:main",
            "cpm-bee-export=cpm_live.convert.export:main",
            "cpm-bee-finetune=cpm_live.training.cli:main",
            "cpm-bee-finetune-qlora=cpm_live.training.cli:qlora_main",
            "cpm-bee-preprocess=cpm_live.data.preprocess:main",
            "cpm-bee-generate=cpm_live.generation.cli:main",
            "cpm-bee-evaluate=cpm_live.evaluation:main",
            "cpm-bee-plot=cpm_live.training.plot:main",
            "cpm-bee-demo=cpm_live.demo:main",
            "cpm-bee-format-base=cpm_live.demo.format_base:main",
        ],
    },
)
