"""Build and install kasa_kernels (and the kasa_reference oracle it is tested against)."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "kasa_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def read_readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="kasa_kernels",
    version=read_version(),
    description="Fused Triton and CUDA kernels for KaSA (Knowledge-aware Singular-value Adaptation) fine-tuning",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["kasa_kernels", "kasa_kernels.*"]) + ["kasa_reference"],
    package_dir={"kasa_reference": "python/kasa_reference"},
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "peft>=0.21",
            "transformers",
            "safetensors",
        ],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["kasa-bench = kasa_kernels.bench.__main__:main"]},
)
