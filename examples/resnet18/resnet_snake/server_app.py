"""The server: SnakeStrategy over ResNet-18's automatic segments, evaluated centrally."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from resnet_snake.task import build_model, evaluate, test_set
from snake_flower import SnakeStrategy, segment_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    torch.manual_seed(int(cfg["seed"]))
    model = build_model()
    segments = segment_model(model)
    sizes = {name: sum(model.state_dict()[k].numel() for k in keys) for name, keys in segments.items()}
    print("segments:", ", ".join(f"{name} ({size / 1e6:.2f}M)" for name, size in sizes.items()))
    x_test, y_test = test_set(str(cfg["data-dir"]), int(cfg["eval-samples"]))

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(evaluate(model, x_test, y_test))

    strategy = SnakeStrategy(segments, window=int(cfg["window"]), seed=int(cfg["seed"]))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=int(cfg["num-server-rounds"]), evaluate_fn=central_eval,
                            train_config=ConfigRecord({"lr": float(cfg["lr"]), "local-steps": int(cfg["local-steps"]),
                                                       "seed": int(cfg["seed"])}))
    merged = sum(hop["status"] == "merged" for hop in strategy.hops)
    final = result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]
    print(f"{merged}/{len(strategy.hops)} hops merged; accuracy {final['accuracy']:.4f}, loss {final['loss']:.4f}")
