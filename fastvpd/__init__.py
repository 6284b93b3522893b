"""fastvpd: fast, faithful trainer for 'Distilling Visual Priors from Self-Supervised Learning'."""

__version__ = "0.1.0"
