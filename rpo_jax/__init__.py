"""rpo-jax: Reward Preference Optimization for subject-driven text-to-image generation in JAX."""
__version__ = "0.1.0"
