"""tailkd_dist: tail-aware knowledge distillation (TAD) of language models at cluster scale."""

__version__ = "0.1.0"
