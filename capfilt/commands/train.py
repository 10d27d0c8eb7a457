"""`capfilt pretrain` and `capfilt finetune`: train MED on parquet directories, export the models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from capfilt.commands._shared import AddressOption, ConfigOption, SetOption, config_from

DataOption = Annotated[list[str], typer.Option(
    "--data", help="Parquet folder, glob or URI (s3://, gs://, ...): img2dataset input shards or CapFilt "
                   "output (its data/ part); repeat for several.")]
OutOption = Annotated[Path, typer.Option(
    "--out", help="Output folder: checkpoints/, tb/, med/ (+ captioner/ or filter/), metrics.json, "
                  "config.yaml. Running the same command again resumes from the last checkpoint.")]
InitBlipOption = Annotated[Optional[tuple[str, str]], typer.Option(
    "--init-blip", help="Start from published BLIP checkpoints: CAPTIONER FILTER, transformers folders "
                        "or hub ids (BlipForConditionalGeneration, BlipForImageTextRetrieval).")]
WorkersOption = Annotated[Optional[int], typer.Option(
    "--workers", min=1, help="DDP processes; above 1 runs Ray Train (train_resources.workers).")]
GpuOption = Annotated[Optional[bool], typer.Option(
    "--gpu/--no-gpu", help="One GPU per Ray Train worker (train_resources.gpu).")]


def _train(role: str, data: list[str], out: Path, init: Optional[Path], init_blip: Optional[tuple[str, str]],
           flags: dict[str, object], config: Optional[Path], overrides: Optional[list[str]]) -> None:
    from capfilt.config import ConfigError
    from capfilt.model_folders import check_model_folder
    from capfilt.pipelines.train import run_training
    from capfilt.training import TrainJob, role_config

    cfg = role_config(config_from(config, overrides, flags), role)
    job = TrainJob(role=role, data=tuple(str(d) for d in data), out=str(out),
                   init=str(init) if init else None, init_blip=tuple(init_blip) if init_blip else None)
    if role != "pretrain" and not (job.init or job.init_blip):
        raise ConfigError("finetune starts from a pre-trained MED: give --init DIR or --init-blip CAPTIONER FILTER")
    for folder, part in zip(job.init_blip or (), ("captioner", "filter")):
        if Path(folder).is_dir():  # a hub id is transformers' to resolve (offline: from its cache)
            check_model_folder(folder, part, f"--init-blip {part.upper()}")
    metrics = run_training(job, cfg)
    losses = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("loss"))
    typer.echo(f"{role}: {metrics['step']} steps ({metrics['epoch']:.2f} epochs) on {metrics['rows']} rows "
               f"of {metrics['read']}; skipped {metrics['skipped']}")
    if metrics["decode_reasons"]:
        typer.echo(f"images refused by reason: {metrics['decode_reasons']}")
    for shard, problem in metrics["shard_problems"].items():
        typer.echo(f"shard skipped: {shard}: {problem}")
    typer.echo(f"final {losses}")
    typer.echo(f"models in {', '.join(str(out / name) for name in metrics['outputs'])}")


def pretrain(
    data: DataOption,
    out: OutOption,
    size: Annotated[Optional[str], typer.Option(
        "--size", help="MED preset when training from scratch: tiny, base or large (model.size).")] = None,
    init: Annotated[Optional[Path], typer.Option(
        "--init", exists=True, file_okay=False, help="Continue from a saved MED folder (an OUT/med).")] = None,
    init_blip: InitBlipOption = None,
    workers: WorkersOption = None,
    gpu: GpuOption = None,
    address: AddressOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Pre-train MED with ITC + ITM + LM (BLIP's three losses) and save it to OUT/med."""
    _train("pretrain", data, out, init, init_blip,
           {"model.size": size, "train_resources.workers": workers, "train_resources.gpu": gpu,
            "train_resources.address": address}, config, overrides)

def finetune(
    role: Annotated[str, typer.Option(
        "--role", help="captioner: LM loss after the prompt 'a picture of ' -> OUT/captioner; "
                       "filter: ITC + ITM -> OUT/filter. OUT/med is written for both.")],
    data: DataOption,
    out: OutOption,
    init: Annotated[Optional[Path], typer.Option(
        "--init", exists=True, file_okay=False, help="The pre-trained MED folder (an OUT/med).")] = None,
    init_blip: InitBlipOption = None,
    workers: WorkersOption = None,
    gpu: GpuOption = None,
    address: AddressOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Fine-tune a pre-trained MED into a CapFilt captioner or filter (transformers BLIP folder)."""
    if role not in ("captioner", "filter"):
        from capfilt.config import ConfigError

        raise ConfigError(f"--role {role!r} is not captioner or filter")
    _train(role, data, out, init, init_blip,
           {"train_resources.workers": workers, "train_resources.gpu": gpu,
            "train_resources.address": address}, config, overrides)


COMMANDS = {"pretrain": pretrain, "finetune": finetune}
