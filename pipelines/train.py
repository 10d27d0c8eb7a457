"""Training as a job: one process, or a Ray Train `TorchTrainer` of `train_resources.workers` DDP workers.

`run_training(job, cfg)` is what `capfilt pretrain` / `capfilt finetune` and the bootstrap call:
it records the job in `OUT/job.json` (a different job in the same folder is refused, so
checkpoints of one run never resume another), writes the resolved config, and runs
`capfilt.training.train_worker` here or in every Ray Train worker. A Ray it starts for the
workers is shut down afterwards, so the next stage of a bootstrap gets a fresh one.
"""

from __future__ import annotations

import json
from pathlib import Path

from capfilt.config import Config, write_resolved
from capfilt.training import TrainJob, train_worker


def _ray_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    metrics = train_worker(config["job"], config["cfg"], device=ray.train.torch.get_device())
    ray.train.report({"step": metrics["step"], "loss": metrics.get("loss", float("nan"))})


def _train_with_ray(job: TrainJob, cfg: Config) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .ray_env import init_ray

    resources = cfg.train_resources
    started_ray = init_ray(resources.address)
    try:
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={"job": job, "cfg": cfg},
            torch_config=TorchConfig(backend="nccl" if resources.gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpu),
            run_config=RunConfig(name="ray_train", storage_path=str(Path(job.out).resolve())),
        )
        trainer.fit()
    finally:
        if started_ray:  # the next stage gets a fresh Ray: a driver's GCS query once hung after Ray Train
            ray.shutdown()
    return json.loads((Path(job.out) / "metrics.json").read_text())


def run_training(job: TrainJob, cfg: Config) -> dict:
    """Train as the job says; returns the metrics also written to OUT/metrics.json."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "job.json"
    if job_file.exists() and json.loads(job_file.read_text()) != job.describe():
        raise ValueError(f"{out} holds checkpoints of another job ({job_file.read_text().strip()}); "
                         "use a new --out")
    job_file.write_text(json.dumps(job.describe(), indent=1))
    write_resolved(cfg, out)
    if cfg.train_resources.workers > 1:
        return _train_with_ray(job, cfg)
    return train_worker(job, cfg)
