"""The node: snake-flower's own ClientApp, which builds the model from the run-config's ``task``."""

from snake_flower.client_app import app

__all__ = ["app"]
