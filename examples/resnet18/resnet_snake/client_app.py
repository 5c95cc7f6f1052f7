"""The node: ``make_client_app`` with ResNet-18; ``segment_model`` finds the same segments here."""

from flwr.app import Context

from resnet_snake.task import build_model, load_train
from snake_flower import make_client_app


def train_data(context: Context):
    cfg = context.run_config
    return load_train(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                      str(cfg["data-dir"]), int(cfg["examples-per-node"]), int(cfg["batch-size"]))


app = make_client_app(build_model, train_data)  # lr, local steps: from the server's train_config
