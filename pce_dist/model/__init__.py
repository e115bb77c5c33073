"""The PCE model in pure tensor code: no torch.distributed, no I/O, no environment reads.

Top-down: patches -> routing math -> router -> experts -> dispatch -> layer -> network -> losses.
"""

from .dispatch import DenseReferenceDispatcher, Dispatcher, LocalDispatcher, RoutePlan, plan_routes
from .experts import ConvExpert
from .layer import DenseLayer, PCELayer
from .losses import LossResult, pce_loss
from .net import PCEClassifier, PCENet, PCEOutput, build_model
from .patches import PatchExtractor
from .router import Router, spp
from .routing import RouteResult, ThresholdWeights, adaptive_threshold, ema_keys, route
from .specs import ExpertSpec, RouterSpec

__all__ = [
    "ConvExpert", "DenseLayer", "DenseReferenceDispatcher", "Dispatcher", "ExpertSpec", "LocalDispatcher", "LossResult",
    "PCEClassifier", "PCELayer", "PCENet", "PCEOutput", "PatchExtractor", "RoutePlan", "RouteResult", "Router",
    "RouterSpec", "ThresholdWeights", "adaptive_threshold", "build_model", "ema_keys", "pce_loss", "plan_routes", "route", "spp",
]
