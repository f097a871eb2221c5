"""rat-transformers: the RAT architecture as a Hugging Face Transformers model."""

from pathlib import Path

from setuptools import setup


here = Path(__file__).parent
readme = (here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else ""

TRAIN = [
    "peft>=0.17",
    "trl>=1.0",
    "datasets>=3.0",
    "tokenizers>=0.21",
    "rouge-score>=0.1.2",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

# lm-evaluation-harness (pinned: the version tested) and what the offline tasks in examples/eval_tasks/ score with
EVAL = ["lm-eval==0.4.13", "rouge-score>=0.1.2", "datasets>=3.0", "matplotlib>=3.8", "tqdm>=4.66"]

setup(
    name="rat-transformers",
    version="0.1.0",
    description="RAT (chunked recurrence + attention) as a first-class Hugging Face Transformers model",
    long_description=readme,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["configuration_rat", "modeling_rat", "modeling_rat.hub", "modeling_rat.training"],
    package_data={"modeling_rat.hub": ["model_card_template.md"]},
    py_modules=["hub_upload"],
    install_requires=[
        "torch>=2.5",
        "transformers>=5.18,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "bench": ["matplotlib>=3.8", "tqdm>=4.66", "psutil>=5.9"],
        "train": TRAIN,
        "eval": EVAL,
        # triton in dev: the kernel tests run on CPUs too, under Triton's interpreter (wheels exist for Linux only)
        "dev": TRAIN + EVAL + ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3", "triton>=3.2; platform_system == 'Linux'"],
    },
    entry_points={
        "console_scripts": [
            "rat-convert-official=modeling_rat.convert_official:main",
            "rat-hub-upload=hub_upload:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
