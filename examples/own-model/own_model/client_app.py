"""The node: everything Snake (and FedAvg) needs from it comes from ``make_client_app``."""

from flwr.app import Context

from own_model.task import Net, load_train
from snake_flower import make_client_app


def train_data(context: Context):
    """This node's batches of (images, labels)."""
    return load_train(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                      str(context.run_config["dataset"]), int(context.run_config["examples-per-node"]))


# lr and local steps are defaults: the server's train_config (below) overrides them per message
app = make_client_app(Net, train_data, lr=0.05, local_steps=30)
