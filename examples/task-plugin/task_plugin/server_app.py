"""The server: snake-flower's own ServerApp (metering, results JSON), with the plugin task."""

from snake_flower.server_app import app

__all__ = ["app"]
