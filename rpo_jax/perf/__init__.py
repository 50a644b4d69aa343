"""Throughput tools: ``rpo-jax bench`` (the RPO step, sampling and reward scoring in JAX against
PyTorch, side by side) and ``rpo-jax plan`` (ahead-of-time compiles of the RPO step for Cloud TPU
topologies from a CPU host). They sit above the method (rpo/, sd/, reward/) and below the job layer."""
