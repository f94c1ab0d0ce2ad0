"""lseg-jax: LSeg (Li et al., ICLR 2022) in JAX/Flax."""
