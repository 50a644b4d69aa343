"""rpo-jax: Reward Preference Optimization (Miao et al., NeurIPS 2024) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="rpo-jax",
    version="0.1.0",
    description="Reward Preference Optimization for subject-driven text-to-image generation, in JAX",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rpo_jax", "rpo_jax.*"]),
    package_data={"rpo_jax": ["assets/*/*", "assets/toy/*/*", "assets/toy/*/*/*"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "numpy>=2.0",
        "safetensors>=0.8.0",
        "Pillow>=11.0",
        "tokenizers>=0.21",
        "tqdm",
        "absl-py",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        # The PyTorch side of `rpo-jax bench` (torch pinned as below).
        "bench": ["torch==2.13.0", "diffusers>=0.42.1", "transformers>=5.24.0"],
        # Reference implementations for parity tests. torch is pinned: on the project's machines
        # torch==2.13.0 is a local CPU wheel, and any other spec pulls gigabytes of CUDA wheels.
        "test": [
            "pytest>=9.0",
            "torch==2.13.0",
            "diffusers>=0.42.1",
            "transformers>=5.24.0",
            "peft==0.21.2",  # LoRA parity tests (diffusers' load_lora_weights / save_lora_weights)
            "import-linter>=2.0",  # the layering contract in .importlinter (tests/test_layers.py)
            "jax[tpu]",  # libtpu: tests/test_plan.py compiles for a TPU topology on a CPU host
        ],
        # `rpo-jax plan` for Cloud TPU topologies: libtpu (matched to jax's version by jax's extra)
        # describes and compiles for TPU slices on any host. Not needed to train on a TPU VM.
        "plan": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["rpo-jax=rpo_jax.cli:main"]},
)
