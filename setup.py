"""moecl: continual learning of CLIP with Mixture-of-Experts adapters, scaled with DeepSpeed."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="moecl",
    version="0.1.0",
    description="Continual learning of CLIP models with Mixture-of-Experts adapters on DeepSpeed",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moecl", "moecl.*", "data_tools", "data_tools.*"]),
    package_data={
        "moecl": ["configs/*.yaml", "backbones/*.json", "sequences/*.yaml", "ds_configs/*.json"],
        "data_tools": ["benchmarks/*.json"],
    },
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "deepspeed>=0.19.4,<0.20",  # 0.19.4: sparse MoE routes, 7-tuple gate; moecl/compat.py checks it at import
        "open_clip_torch>=2.26",
        "webdataset>=0.2.90",
        "fairscale>=0.4.13",
        "tensorboard>=2.15",
        "pyyaml>=6.0",
        "pydantic>=2.5",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.24",
        "pillow>=10.0",
        "scipy>=1.10",  # Flowers102 / StanfordCars annotations are .mat files
    ],
    extras_require={"test": ["pytest>=8.0", "pytest-timeout>=2.2"]},
    entry_points={"console_scripts": ["moecl=moecl.cli:main"]},
)
