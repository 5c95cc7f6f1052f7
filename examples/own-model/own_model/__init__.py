"""own_model: Snake Learning on a model of your own, next to FedAvg (snake_flower example)."""
