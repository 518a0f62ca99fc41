"""defendpp_jax: Defend++ (DNN bottleneck reinforcement) and adversarial attacks in JAX/Flax."""

__version__ = '0.1.0'
