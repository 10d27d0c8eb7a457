"""The MED trainer: AdamW, warm-up + cosine, grad accumulation, DDP, exact-resume checkpoints.

`train(model, dataset, cfg, out_dir)` runs in one process or in each rank of an initialised
torch.distributed group (DDP and data sharding switch on when the world size is above one; the
code path is the same). A run killed at any point and started again with the same arguments
resumes from its last checkpoint and ends with the same weights an uninterrupted run would
(bitwise on CPU): a checkpoint holds the model (momentum encoders and queues included), the
optimiser, the step (the learning rate and alpha are pure functions of it), the data position
and every RNG state, each rank's own.

Checkpoints are safetensors (tensors) + JSON (everything else); nothing is pickled. A
checkpoint is written into a temporary directory, fsynced, renamed into place and only then
named by the `latest` pointer (itself replaced atomically), so a save cut short leaves the
previous checkpoint in charge; at load, one whose files do not match its manifest is skipped
for the one before it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.utils.data import DataLoader

from .data import (
    Collator,
    Columns,
    EpochBatchSampler,
    EvalTransform,
    ImageTextDataset,
    TrainTransform,
    batches_per_epoch,
)
from .image_config import ImageConfig
from .train_config import TrainConfig


# Fields that fix the data order and batch composition: a resume must not change them.
_RESUME_INVARIANTS = ("batch_size", "grad_accum", "seed")


def build_dataset(sources: Sequence[Any], cfg: TrainConfig, image_size: int,
                  columns: Columns = Columns(), image_cfg: ImageConfig = ImageConfig(),
                  augment: bool = True) -> ImageTextDataset:
    """The training dataset the config describes (augment=False: eval transform).

    `sources`: local data directories, or parquet files on any filesystem (see ImageTextDataset).
    """
    transform = (TrainTransform(image_size, cfg.hflip, cfg.randaug_ops, cfg.randaug_magnitude,
                                (cfg.crop_scale_min, 1.0))
                 if augment else EvalTransform(image_size))
    columns = replace(columns, image_id=cfg.image_id_column)
    return ImageTextDataset(sources, transform, columns, cfg.max_words, cfg.seed, image_cfg)


# ---------------------------------------------------------------------------------------------
# Schedule


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at total_steps."""
    warmup = min(cfg.warmup_steps, total_steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def alpha_at(step: int, steps_per_epoch: int, base_alpha: float, cfg: TrainConfig) -> float:
    """BLIP's distillation ramp: alpha * min(1, step / steps of the ramp-up epochs)."""
    ramp = steps_per_epoch * cfg.alpha_rampup_epochs
    return base_alpha * min(1.0, step / ramp) if ramp > 0 else base_alpha


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Every trainable parameter decays, biases, norms and the temperature included: BLIP's
    AdamW(params=model.parameters(), weight_decay=0.05) in pretrain.py, train_caption.py and
    train_retrieval.py (the usual no-decay group for 1-d tensors is not what BLIP trained with)."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_text(path: Path, text: str) -> None:
    """Write `path` under a temporary name, fsync, rename into place: a crash leaves old or new.

    model/ cannot import capfilt.storage (whose Location.write_with does this for capfilt); the
    checkpoint files themselves are written into a temporary folder that is renamed whole.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    version, py_state, py_gauss = random.getstate()
    scalars = {"numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)],
               "python": [version, list(py_state), py_gauss]}
    return tensors, scalars


def _set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    np_kind, np_pos, np_has_gauss, np_gauss = scalars["numpy"]
    np.random.set_state((np_kind, tensors["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    version, py_state, py_gauss = scalars["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state_dict -> (tensors, JSON-able rest), so it can go to safetensors."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _optimizer_join(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": rest["param_groups"]}


class Checkpoints:
    """step-NNNNNNNN directories under `root`, the newest named by `root/latest`."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, keep)

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:08d}"

    def clear_partial(self) -> None:
        """Remove temporaries of saves that were cut short."""
        for path in self.root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
             rank: int = 0, world_size: int = 1) -> Path:
        """Every rank writes its RNG state; rank 0 the rest, then renames and re-points latest."""
        final = self.root / self.name(step)
        tmp = self.root / f".tmp-{self.name(step)}"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(world_size)
        rng_tensors, rng_scalars = _rng_state()
        save_file(rng_tensors, tmp / f"rng-rank{rank}.safetensors")
        (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_scalars))
        for name in (f"rng-rank{rank}.safetensors", f"rng-rank{rank}.json"):
            _fsync(tmp / name)
        _barrier(world_size)
        if rank == 0:
            save_model(model, str(tmp / "model.safetensors"))
            optim_tensors, optim_rest = _optimizer_split(optimizer)
            save_file(optim_tensors, tmp / "optimizer.safetensors")
            (tmp / "optimizer.json").write_text(json.dumps(optim_rest))
            files = sorted(p.name for p in tmp.iterdir())
            for name in files:
                _fsync(tmp / name)
            manifest = {**meta, "step": step, "world_size": world_size,
                        "files": {name: (tmp / name).stat().st_size for name in files}}
            (tmp / "meta.json").write_text(json.dumps(manifest, indent=1))  # last: marks completeness
            _fsync(tmp / "meta.json")
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(self.root)
            _replace_text(self.root / "latest", final.name)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(world_size)
        return final

    def complete(self) -> list[Path]:
        """Checkpoint directories, oldest first (rename makes them whole; load still verifies)."""
        return sorted(p for p in self.root.glob("step-*") if p.is_dir())

    def candidates(self) -> list[Path]:
        """Newest first: the one `latest` names, then the others by step."""
        ordered = []
        pointer = self.root / "latest"
        if pointer.is_file():
            ordered.append(self.root / pointer.read_text().strip())
        ordered += [p for p in reversed(self.complete()) if p not in ordered]
        return ordered

    @staticmethod
    def verify(directory: Path) -> dict:
        """The manifest, if every file it lists is there with its recorded size; else ValueError."""
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"no readable meta.json ({exc})") from exc
        for name, size in meta["files"].items():
            path = directory / name
            if not path.is_file() or path.stat().st_size != size:
                raise ValueError(f"{name} is missing or not {size} bytes")
        return meta

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
             world_size: int = 1) -> dict | None:
        """Restore the newest sound checkpoint into model/optimizer/RNG; its manifest, or None."""
        for directory in self.candidates():
            try:
                meta = self.verify(directory)
                tensors = {name: load_file(directory / f"{name}.safetensors")
                           for name in ("optimizer", f"rng-rank{rank}")}
                with safe_open(directory / "model.safetensors", framework="pt"):
                    pass  # the header parses; the tensors are read by load_model below
            except (ValueError, OSError, SafetensorError) as exc:  # torn or damaged files
                warnings.warn(f"ignoring checkpoint {directory}: {exc}", stacklevel=2)
                continue
            # A sound checkpoint that does not fit this run is an error, never a silent restart.
            if meta["world_size"] != world_size:
                raise RuntimeError(
                    f"checkpoint {directory} was written by {meta['world_size']} processes, this run "
                    f"has {world_size}: the data position and RNG states cannot carry over")
            load_model(model, str(directory / "model.safetensors"), strict=True)
            optimizer.load_state_dict(_optimizer_join(
                tensors["optimizer"], json.loads((directory / "optimizer.json").read_text())))
            _set_rng_state(tensors[f"rng-rank{rank}"],
                           json.loads((directory / f"rng-rank{rank}.json").read_text()))
            return meta
        return None


# ---------------------------------------------------------------------------------------------
# Training


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up here: on CUDA, and on CPUs whose matmuls run bf16
    natively (AVX512-BF16 or AMX: 1.75x on the small MED, 2 Zen 4 cores); elsewhere it is emulated."""
    if device.type == "cuda":
        return True
    # torch's CPU feature probes are private: a torch without them trains in fp32.
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return device.type == "cpu" and any(probe is not None and probe() for probe in probes)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class _Log:
    """Loss sums over a logging window, reduced across ranks when printed."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.micro_batches = 0
        self.images = 0
        self.started = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], images: int) -> None:
        for key, value in out.items():
            if key.startswith("loss"):
                self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())
        self.micro_batches += 1
        self.images += images

    def means(self, world_size: int, device: torch.device) -> dict[str, float]:
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys] + [self.micro_batches, self.images],
                              dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(values)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        means = {k: values[i].item() / max(values[-2].item(), 1) for i, k in enumerate(keys)}
        means["images_per_s"] = values[-1].item() / elapsed
        return means


def _resume_or_seed(checkpoints: Checkpoints, model: nn.Module, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, rank: int, world_size: int, resume: bool) -> tuple[int, dict, int | None]:
    """(step, last metrics, step resumed from or None): the newest checkpoint's, or a seeded start."""
    meta = checkpoints.load(model, optimizer, rank, world_size) if resume else None
    if meta is None:
        torch.manual_seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        return 0, {}, None
    changed = [k for k in _RESUME_INVARIANTS if meta["train_config"][k] != getattr(cfg, k)]
    if changed:
        raise ValueError(f"cannot resume {checkpoints.root}: train.{changed[0]} changed "
                         f"({meta['train_config'][changed[0]]} -> {getattr(cfg, changed[0])})")
    return meta["step"], meta.get("metrics", {}), meta["step"]


def _forward_backward(net: nn.Module, batch: dict, device: torch.device, cfg: TrainConfig, alpha: float,
                      use_bf16: bool) -> dict[str, torch.Tensor]:
    """One micro-batch's losses, their gradients accumulated (scaled by 1 / grad_accum)."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = net(pixel_values=batch["pixel_values"].to(device, non_blocking=True),  # [B, 3, S, S]
                  input_ids=batch["input_ids"].to(device),  # [B, T]
                  attention_mask=batch["attention_mask"].to(device),  # [B, T]
                  idx=batch["idx"].to(device), alpha=alpha, itc=cfg.itc, itm=cfg.itm,
                  lm=cfg.lm, lm_prompt_len=batch["lm_prompt_len"])
    (out["loss"] / cfg.grad_accum).backward()
    return out


def _epoch_loader(dataset: ImageTextDataset, collator: Collator, cfg: TrainConfig, step: int, steps_per_epoch: int,
                  rank: int, world_size: int, device: torch.device) -> DataLoader:
    """This rank's micro-batches of the epoch `step` falls in, from `step` on (so a resumed run continues mid-epoch)."""
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed, epoch, rank, world_size,
                                start_batch=step_in_epoch * cfg.grad_accum,
                                num_batches=steps_per_epoch * cfg.grad_accum)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=cfg.num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator())  # keeps the global RNG untouched


def _optimizer_step(optimizer: torch.optim.Optimizer, step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Step `step`'s learning rate set and applied; the gradients cleared. Returns the lr."""
    lr = lr_at(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def train(model: nn.Module, dataset: ImageTextDataset, cfg: TrainConfig, out_dir: str | Path,
          resume: bool = True, tokenizer: Any = None, device: torch.device | str | None = None) -> dict:
    """Train `model` on `dataset`; checkpoints, TensorBoard scalars and train_log.jsonl go to out_dir.

    Returns the final metrics: step, epoch, mean losses over the last logging window, images/s,
    the rows used and those skipped (by reason; "decode" counts the images refused when sampled,
    `decode_reasons` splits them by `ImageError.reason`), shards skipped whole and where it resumed.
    """
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.tensorboard import SummaryWriter

    from .tokenizer import build_tokenizer

    out_dir = Path(out_dir)
    rank, world_size = _world()
    device = torch.device(device) if device is not None else _default_device()
    steps_per_epoch = batches_per_epoch(len(dataset), cfg.batch_size, world_size) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} usable rows cannot fill one step of batch_size {cfg.batch_size} "
                         f"x grad_accum {cfg.grad_accum} x {world_size} processes")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    base_alpha = float(model.cfg.alpha)

    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    checkpoints = Checkpoints(out_dir / "checkpoints", cfg.keep_ckpts)
    if rank == 0:
        checkpoints.root.mkdir(parents=True, exist_ok=True)
        checkpoints.clear_partial()
    _barrier(world_size)
    step, last_metrics, resumed_from = _resume_or_seed(checkpoints, model, optimizer, cfg, rank, world_size, resume)

    # DDP only across processes; buffers (queues, momentum encoders) are kept in step by the
    # model itself, so they are not re-broadcast every forward. Unused parameters (the decoder's
    # self-attention when LM is off, for instance) are expected when a loss is switched off.
    net = model
    if world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False,
                                      find_unused_parameters=not (cfg.itc and cfg.itm and cfg.lm))
    collator = Collator(tokenizer or build_tokenizer(), cfg.max_text_len, cfg.lm_prompt)
    writer = SummaryWriter(out_dir / "tb", purge_step=step + 1 if step else None) if rank == 0 else None
    log_path = out_dir / "train_log.jsonl"
    if rank == 0:
        _truncate_log(log_path, step)
    decode_failed: dict[int, str] = {}  # row -> ImageError.reason, this rank's
    window = _Log()
    run_started, run_images = time.perf_counter(), 0
    use_bf16 = cfg.bf16 and bf16_is_native(device)
    model.train()
    while step < total_steps:
        loader = _epoch_loader(dataset, collator, cfg, step, steps_per_epoch, rank, world_size, device)
        for micro, batch in enumerate(loader):
            decode_failed.update(batch["decode_failed"])
            if cfg.itc and micro % cfg.grad_accum == 0:
                # BLIP moves the momentum encoders once per optimiser step, before its forward
                # (inside forward, without accumulation): here once per step, not per micro-batch.
                model.momentum_update()
            last_micro = (micro + 1) % cfg.grad_accum == 0
            alpha = alpha_at(step, steps_per_epoch, base_alpha, cfg)
            # Gradients are all-reduced only on the micro-batch that ends an optimiser step.
            sync = net.no_sync() if world_size > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                out = _forward_backward(net, batch, device, cfg, alpha, use_bf16)
            if not torch.isfinite(out["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step}: "
                                         f"{ {k: float(v) for k, v in out.items() if k.startswith('loss')} }")
            window.add(out, len(batch["idx"]))
            run_images += len(batch["idx"])
            if not last_micro:
                continue
            lr = _optimizer_step(optimizer, step, total_steps, cfg)
            step += 1
            if step % cfg.log_every == 0 or step == total_steps:
                last_metrics = {**window.means(world_size, device), "lr": lr, "alpha": alpha}
                window = _Log()
                if rank == 0:
                    _report(step, total_steps, step / steps_per_epoch, last_metrics, writer, log_path)
            if step % cfg.ckpt_every == 0 or step == total_steps:
                position = {"epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                            "total_steps": total_steps, "train_config": asdict(cfg), "metrics": last_metrics}
                checkpoints.save(step, model, optimizer, position, rank, world_size)
            if step == total_steps:
                break
    if writer is not None:
        writer.close()
    if world_size > 1:
        _check_ranks_agree(model, device)
    decode_failed = _union_across_ranks(decode_failed, world_size)
    skipped = {**dataset.skipped, "decode": len(decode_failed)}
    elapsed = time.perf_counter() - run_started
    return {**last_metrics, "step": step, "epoch": step / steps_per_epoch, "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch, "rows": len(dataset), "read": dataset.read,
            "skipped": skipped, "decode_reasons": dict(sorted(Counter(decode_failed.values()).items())),
            "shard_problems": dataset.problems, "resumed_from": resumed_from, "world_size": world_size,
            "run_images_per_s": run_images * world_size / elapsed if run_images else 0.0}


@torch.no_grad()
def _check_ranks_agree(model: nn.Module, device: torch.device) -> None:
    """DDP keeps every rank's weights, momentum copies and queues identical; prove it at the end."""
    sums = torch.stack([t.double().sum() for t in model.state_dict().values()]).to(device)  # [n]
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        raise RuntimeError("model states differ across ranks after training (DDP desynchronised)")


def _union_across_ranks(failed: dict[int, str], world_size: int) -> dict[int, str]:
    """Every rank's decode refusals (row -> reason), a row counted once however many ranks met it."""
    if world_size == 1:
        return failed
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, sorted(failed.items()))
    return {row: reason for part in gathered for row, reason in part}


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the step a run resumes from (they belong to the lost future)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    _replace_text(path, "".join(line + "\n" for line in kept))


def _report(step: int, total: int, epoch: float, metrics: dict, writer, log_path: Path) -> None:
    losses = " ".join(f"{k.removeprefix('loss_') if k != 'loss' else 'loss'} {v:.4f}"
                      for k, v in metrics.items() if k.startswith("loss"))
    print(f"step {step}/{total} epoch {epoch:.2f} {losses} lr {metrics['lr']:.2e} "
          f"alpha {metrics['alpha']:.3f} {metrics['images_per_s']:.1f} img/s", flush=True)
    for key, value in metrics.items():
        writer.add_scalar(f"train/{key}", value, step)
    writer.flush()
    with log_path.open("a") as f:
        f.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")

