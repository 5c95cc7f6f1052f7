"""snake_flower: Snake Learning (sequential, layer-window training) as a Flower app."""

from strategies import SnakeStrategy

__all__ = ["SnakeStrategy"]
