"""hookadapt: parameter-efficient adapters on any PyTorch module, through forward hooks."""

from .adapter_set import AdapterSet, adapters, attach, attached, detach_all
from .checkpoint import load_adapters, save_adapters
from .config import AdapterSpec, NetworkSpec, StrategySpec, config_to_dict, parse_config
from .errors import (
    AttachError,
    CheckpointError,
    ConfigError,
    HookadaptError,
    SelectionError,
    ShapeError,
    TargetError,
)
from .meta_strategies import Average, Fusion
from .networks import Identity, LinearAdapter, LoRA, Scale
from .registry import NETWORKS, STRATEGIES, register_network, register_strategy
from .strategies import Concat, Gated, Multiply, ResidualAdd, ReturnResult, ScaledAdd, Strategy

__version__ = "0.1.0"

__all__ = [
    "AdapterSet",
    "AdapterSpec",
    "AttachError",
    "Average",
    "Concat",
    "Fusion",
    "Gated",
    "Identity",
    "CheckpointError",
    "ConfigError",
    "HookadaptError",
    "LinearAdapter",
    "LoRA",
    "Multiply",
    "NETWORKS",
    "NetworkSpec",
    "ResidualAdd",
    "ReturnResult",
    "STRATEGIES",
    "Scale",
    "ScaledAdd",
    "SelectionError",
    "ShapeError",
    "Strategy",
    "StrategySpec",
    "TargetError",
    "__version__",
    "adapters",
    "attach",
    "attached",
    "config_to_dict",
    "detach_all",
    "load_adapters",
    "parse_config",
    "register_network",
    "register_strategy",
    "save_adapters",
]
