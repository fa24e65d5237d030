"""karl-verl: KARL (arXiv 2503.12797) as a plugin for stock verl 0.9."""

from setuptools import find_packages, setup

# torch must already be installed (2.13.0 CPU wheel on CPU machines) before this package:
# a bare "torch" requirement on a machine without it pulls several GB of CUDA wheels.
INSTALL_REQUIRES = [
    "verl>=0.9.1,<0.10",
    "transformers>=5.5.3,<5.11,!=5.6.0",
    "hydra-core>=1.3",
    "omegaconf>=2.3",
    "numpy>=2",
    "pandas",
    "pyarrow",
    # karl-verl data reads datasets' save_to_disk folders (verl depends on it too).
    "datasets",
    "pillow",
    "tqdm",
    "matplotlib",
    # Imported by verl's v1 trainer and agent loop but not declared by verl itself.
    "TransferQueue",
    "cachetools",
    "uvicorn",
    "fastapi",
    "pyzmq",
    "msgspec",
    "qwen_vl_utils",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.5", "hypothesis>=6", "ruff"],
    # Real training on GPU nodes: verl's vLLM extra (vLLM 0.24.0 with its own torch 2.11.0 and transformers
    # 5.9.0). Not flash-attn: PyPI has no wheel of it, so pip would build it from source (hours with nvcc, or
    # a failure under build isolation). Runs pick flash_attention_2 where a flash-attn install imports and
    # torch's sdpa otherwise (karl_verl/gpu_stack.py); the README says how to get a matching flash-attn.
    "gpu": ["verl[vllm]>=0.9.1,<0.10"],
}

setup(
    name="karl-verl",
    version="0.1.0",
    description="Knowledge-aware RL (KARL) for visual grounding as a plugin for verl 0.9",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["karl_verl", "karl_verl.*"])
    + ["hydra_plugins.karl_verl_recipes", "karl_verl.recipes", "karl_verl.recipes.recipe", "karl_verl.recipes.scripts"],
    # The repository's top-level recipes/ folder installs as karl_verl/recipes, so Hydra finds
    # the YAMLs through pkg://karl_verl.recipes after a non-editable install. Its two data folders
    # are listed as packages too: setuptools otherwise warns that it may stop shipping them.
    package_dir={
        "karl_verl.recipes": "recipes",
        "karl_verl.recipes.recipe": "recipes/recipe",
        "karl_verl.recipes.scripts": "recipes/scripts",
    },
    package_data={"karl_verl.recipes.recipe": ["*.yaml"], "karl_verl.recipes.scripts": ["*.sh"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        # verl only imports this entry point (it never calls it): importing karl_verl.integration
        # runs karl_verl/__init__.py, which registers the parts while verl's own import finishes.
        "verl.plugins": ["karl = karl_verl.integration:register_all"],
        "console_scripts": ["karl-verl = karl_verl.cli:main"],
    },
)
