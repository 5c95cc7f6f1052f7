"""The server: Snake, then Flower's FedAvg, on the same nodes with the same node visits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from own_model.task import Net, evaluate, test_set
from snake_flower import SnakeStrategy, segment_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    torch.manual_seed(int(cfg["seed"]))
    model = Net()
    segments = segment_model(model)  # nested names, e.g. "features.0+features.1", "classifier.1"
    print(f"{len(segments)} segments: {', '.join(segments)}")
    x_test, y_test = test_set(str(cfg["dataset"]))

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(evaluate(model, x_test, y_test))

    hops, nodes = int(cfg["num-server-rounds"]), len(list(grid.get_node_ids()))
    train_config = ConfigRecord({"lr": float(cfg["lr"]), "local-steps": int(cfg["local-steps"]),
                                 "seed": int(cfg["seed"])})
    initial = ArrayRecord(model.state_dict())
    curves: dict[str, dict] = {}
    for name in str(cfg["strategies"]).split(","):
        if name == "snake":
            strategy = SnakeStrategy(segments, window=int(cfg["window"]), seed=int(cfg["seed"]))
            rounds = hops
        elif name == "fedavg":  # Flower's own; evaluation on the server, as for Snake
            strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=nodes, min_train_nodes=nodes)
            rounds = max(1, hops // nodes)
        else:
            raise ValueError(f"strategies: {name!r} is not snake or fedavg")
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                                train_config=train_config, evaluate_fn=central_eval)
        scores = result.evaluate_metrics_serverapp
        curves[name] = {"visits": [r * (1 if name == "snake" else nodes) for r in sorted(scores)],
                        "accuracy": [scores[r]["accuracy"] for r in sorted(scores)],
                        "loss": [scores[r]["loss"] for r in sorted(scores)]}
        if name == "snake":
            curves[name]["status"] = [hop["status"] for hop in strategy.hops]
    print(f"{'strategy':<8} {'node visits':>11} {'accuracy':>9} {'loss':>7}")
    for name, curve in curves.items():
        print(f"{name:<8} {curve['visits'][-1]:>11} {curve['accuracy'][-1]:>9.4f} {curve['loss'][-1]:>7.4f}")
    if cfg["out-file"]:
        Path(str(cfg["out-file"])).write_text(json.dumps(curves, indent=1))
