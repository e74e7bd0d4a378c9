"""Install gradsel: the engine (`gradsel_core`) and its Triton kernels (`kernels/gradsel_kernels/`; `kernels/` itself is no package, so it never imports as the HF Hub `kernels`)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

# the one version string lives in gradsel_core/__init__.py (``gradsel --version``, store manifests)
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "gradsel_core" / "__init__.py").read_text(),
                    re.M).group(1)

EXTRAS = {
    "dev": ["pytest>=7", "hypothesis>=6", "matplotlib>=3.5", "ruff>=0.4", "mypy>=1.8"],
    "hf": ["transformers>=4.40", "peft>=0.10", "tokenizers>=0.15", "accelerate>=0.26"],
    "triton": ["triton>=3.0"],
    "trl": ["trl>=1.0", "transformers>=4.40", "peft>=0.10", "accelerate>=0.26", "datasets>=2.0"],
    # BackPACK is a peer too, but its wheel pins torchvision; install it with
    # `pip install --no-deps backpack-for-pytorch einops unfoldNd` (see README).
    "bench": ["opacus>=1.4"],
    "plot": ["matplotlib>=3.5"],
    "datasets": ["datasets>=2.14", "pyarrow>=12"],  # --data as Parquet or a datasets folder; select --format hf|parquet
}

setup(
    name="gradsel",
    version=VERSION,
    description="Exact per-sample gradient norms at the cost of one backward, and gradient-based sample selection "
    "for continual safety alignment.",
    python_requires=">=3.9",
    packages=find_packages(include=["gradsel_core", "gradsel_core.*"]) + ["gradsel", "gradsel_kernels"],  # gradsel: alias of gradsel_core
    package_dir={"gradsel_kernels": "kernels/gradsel_kernels"},
    install_requires=["torch>=2.1", "numpy", "safetensors>=0.4", "tqdm"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["gradsel=gradsel_core.cli:main"]},
)
