"""Pre-training and fine-tuning MED from parquet directories: config in, model directories out.

`train_worker(job, cfg)` builds MED (from scratch, from a saved MED, or from published BLIP
checkpoints), reads the data directories (input shards and CapFilt output alike), runs
`model.train.train` and exports: `OUT/med/` always, plus `OUT/captioner/` or `OUT/filter/`
(plain transformers BLIP directories) when fine-tuning for that role. Checkpoints live in
`OUT/checkpoints/`, so the same command run again after a crash resumes. A fine-tuning first
moves the MED to `finetune.image_size` (BLIP fine-tunes at 384 px; the position grid is
interpolated bicubically), so the exported folders and the pipeline work at that size. It runs
as it is in one process, or in every worker of a Ray Train job
(`capfilt.pipelines.train.run_training`); with several workers `OUT` must be on storage every
worker sees (a local Ray, or a shared file system).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capfilt import schema, workdir
from capfilt.config import Config, ConfigError
from capfilt.storage import location, parquet_files


@dataclass(frozen=True)
class Role:
    fixed: dict[str, Any]  # `train` values that make the role (losses, schedule shape): always applied
    blip: dict[str, Any]  # BLIP's settings for the role: applied where `train` leaves TrainConfig's default
    export: str | None  # transformers directory written next to OUT/med: "captioner" | "filter"


# Pre-training takes the `train` section as given (TrainConfig's defaults are BLIP pretrain.py's:
# crop scale 0.2, 30 tokens, alpha over 2 epochs). The fine-tunings are BLIP's COCO ones:
# captioning (train_caption.py, 40 tokens) and retrieval (train_retrieval.py, 35 tokens), both
# cosine to 0 without warm-up, crop scale 0.5 (create_dataset's default), alpha over 1 epoch;
# their budget (epochs, lr, max_steps) is the `finetune` section, their resolution
# `finetune.image_size` (BLIP: 384).
_FINETUNE_SCHEDULE = {"min_lr": 0.0, "warmup_steps": 0}
_FINETUNE_BLIP = {"crop_scale_min": 0.5, "alpha_rampup_epochs": 1}
ROLES: dict[str, Role] = {
    "pretrain": Role({}, {}, None),
    "captioner": Role({**_FINETUNE_SCHEDULE, "itc": False, "itm": False, "lm": True},
                      {**_FINETUNE_BLIP, "max_text_len": 40}, workdir.CAPTIONER),
    "filter": Role({**_FINETUNE_SCHEDULE, "itc": True, "itm": True, "lm": False},
                   {**_FINETUNE_BLIP, "max_text_len": 35}, workdir.FILTER),
}


def role_config(cfg: Config, role: str) -> Config:
    """The config `role` trains with: the one rule of `capfilt pretrain`/`finetune` and the bootstrap.

    The role's fixed values, then BLIP's settings for it where the `train` section leaves
    TrainConfig's default (a deliberate value, such as the demo's crop_scale_min 0.9, holds in
    every stage), then a fine-tuning's budget from the `finetune` section. The captioner learns
    with `run.caption.prompt`, the prompt CapFilt and `capfilt eval` decode with.
    """
    from capfilt.model.train_config import TrainConfig

    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {sorted(ROLES)}")
    if cfg.train.lm_prompt and cfg.train.lm_prompt != cfg.run.caption.prompt:
        raise ConfigError(f"train.lm_prompt={cfg.train.lm_prompt!r}: the captioner trains with run.caption.prompt "
                          f"({cfg.run.caption.prompt!r}), the prompt it decodes with; set that key instead")
    spec, default = ROLES[role], TrainConfig()
    values = dict(spec.fixed)
    values |= {name: value for name, value in spec.blip.items()
               if getattr(cfg.train, name) == getattr(default, name)}
    if spec.export:
        f = cfg.finetune
        values |= {"epochs": f.captioner_epochs if role == "captioner" else f.filter_epochs,
                   "lr": f.lr, "max_steps": f.max_steps}
    values["lm_prompt"] = cfg.run.caption.prompt if role == "captioner" else ""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **values))


@dataclass(frozen=True)
class TrainJob:
    role: str  # a key of ROLES
    data: tuple[str, ...]  # parquet folders, globs or URIs (input shards or CapFilt output)
    out: str  # output directory: checkpoints, tb/, med/, captioner/ or filter/
    init: str | None = None  # a saved MED directory to start from
    init_blip: tuple[str, str] | None = None  # (captioner, filter) transformers BLIP dirs or hub ids

    def describe(self) -> dict[str, Any]:
        return {"role": self.role, "data": [str(location(d)) for d in self.data],
                "init": self.init, "init_blip": list(self.init_blip) if self.init_blip else None}


def build_model(cfg: Config, job: TrainJob):
    """MED from --init, --init-blip, or a fresh `model.size` preset seeded by train.seed (its
    towers from `model.vision_init` / `model.text_init` when given); for a fine-tuning, moved to
    `finetune_image_size`."""
    from capfilt.model.med import MED

    if job.init and job.init_blip:
        raise ConfigError("give --init or --init-blip, not both")
    if job.init:
        model = MED.load(job.init)
    elif job.init_blip:
        model = MED.from_blip(*job.init_blip)
    else:
        model = _fresh_model(cfg)
    if ROLES[job.role].export:
        from capfilt.model.image_size import with_image_size

        size = finetune_image_size(cfg, model.cfg)
        try:
            model = with_image_size(model, size)
        except ValueError as exc:
            raise ConfigError(f"finetune.image_size={cfg.finetune.image_size}: {exc}") from exc
    return model


def finetune_image_size(cfg: Config, med_cfg) -> int:
    """`finetune.image_size`, or for 0: BLIP's 384 for the base/large presets, else the model's own."""
    if cfg.finetune.image_size:
        return cfg.finetune.image_size
    return 384 if med_cfg.size in ("base", "large") else med_cfg.image_size


def _fresh_model(cfg: Config):
    import torch

    from capfilt.model.med import MED, MEDConfig, med_config

    known = {f.name for f in dataclasses.fields(MEDConfig)}
    if not isinstance(cfg.model.overrides, dict):
        raise ConfigError(f"model.overrides: expected a mapping, got {cfg.model.overrides!r}")
    for key in cfg.model.overrides:
        if key not in known:
            raise ConfigError(f"unknown config key model.overrides.{key} "
                              f"(MEDConfig fields: {', '.join(sorted(known))})")
    try:
        med_cfg = med_config(cfg.model.size, **cfg.model.overrides)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"model.size={cfg.model.size!r}: {exc}") from exc
    torch.manual_seed(cfg.train.seed)  # the same fresh weights for the same config
    model = MED(med_cfg)
    if cfg.model.vision_init:
        from capfilt.model.vision_init import init_vision_from_vit

        try:
            init_vision_from_vit(model, Path(cfg.model.vision_init))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.vision_init={cfg.model.vision_init!r}: {exc}") from exc
    if cfg.model.text_init:
        from capfilt.model.bert_init import init_text_from_bert, packaged_bert_dir

        bert_dir = packaged_bert_dir() if cfg.model.text_init == "packaged" else Path(cfg.model.text_init)
        try:
            init_text_from_bert(model, bert_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.text_init={cfg.model.text_init!r}: {exc}") from exc
    return model


def _columns(cfg: Config):
    from capfilt.model.data import Columns

    c = cfg.run.columns
    return Columns(image=c.image, text=c.text, status=c.status, texts=schema.TEXTS,
                   success=schema.STATUS_SUCCESS)


def train_worker(job: TrainJob, cfg: Config, device: Any = None) -> dict:
    """Build, train and (on rank 0) export; run as is, or by every Ray Train worker."""
    import torch.distributed as dist

    from capfilt.model import to_transformers
    from capfilt.model.tokenizer import build_tokenizer
    from capfilt.model.train import build_dataset, train

    model = build_model(cfg, job)
    tokenizer = build_tokenizer()
    files = [f for spec in job.data for f in parquet_files(spec)]  # local folders or URIs (capfilt.storage)
    dataset = build_dataset(files, cfg.train, model.cfg.image_size, _columns(cfg), cfg.run.image)
    metrics = train(model, dataset, cfg.train, job.out, tokenizer=tokenizer, device=device)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out = Path(job.out)
        model.to("cpu").eval()
        model.save(out / workdir.MED)
        role = ROLES[job.role]
        if role.export:
            getattr(to_transformers, f"export_{role.export}")(model, tokenizer, out / role.export)
        metrics = {**metrics, "formats": sorted(set(dataset.formats.values())),
                   "outputs": [workdir.MED] + ([role.export] if role.export else [])}
        location(out / workdir.METRICS).write_text(json.dumps(metrics, indent=1))
    return metrics
