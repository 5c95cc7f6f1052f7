"""Flower strategies for Snake Learning (imports only flwr, numpy and torch)."""

from .fedavg import OrderedFedAvg
from .gate import MergeGate
from .schedule import SnakeSchedule, serpentine_schedule
from .snake import SnakeStrategy
from .split import SplitStrategy
from .window import check_window, merge_window, select, window_keys

__all__ = ["MergeGate", "OrderedFedAvg", "SnakeSchedule", "SnakeStrategy", "SplitStrategy", "check_window", "merge_window", "select",
           "serpentine_schedule", "window_keys"]
