"""pce_dist: distributed training of Positional Convolution Experts.

Nothing is imported eagerly: ``import pce_dist`` stays cheap and side-effect free.
"""

__version__ = "0.1.0"
