"""`capfilt run`: CapFilt over parquet shards as one Ray Data pipeline, committed shard by shard.

    read_parquet (explicit schema, source path) -> Decode (CPU tasks) -> Captioner (actor pool)
      -> Filter (actor pool) -> KeepPolicy (CPU tasks) -> driver: per-shard writers

Why the driver writes: outputs must be named after input shards and committed atomically per
shard, so a rerun can skip finished shards exactly. Ray Data's `write_parquet` names files by
task and block and has no notion of "this input shard is complete". So the driver iterates the
final blocks (already small: the transient pixel column is dropped in the policy step), appends
each row to its shard's writer and commits a shard when its row count reaches the count in the
input footer. Order is preserved, so few shards are open at a time and output files are
reproducible. The cost is that every output byte passes the driver
once; at larger scale run several jobs over disjoint shard sets into one output directory's
siblings, or one per node.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from capfilt import schema
from capfilt.config import Config, RunConfig, write_resolved
from capfilt.io import (TMP, ConfigMismatch, Manifest, OutputLock, Shard, ShardWriter, aggregate_stats,
                        inspect_shard, iter_failed_shard, list_shards, run_identity, text_as_string, unify,
                        write_stats)
from capfilt.model.weights import check_safetensors

log = logging.getLogger("capfilt.run")

__all__ = ["ConfigMismatch", "StageFailed", "run_capfilt", "start_ray"]


class StageFailed(RuntimeError):
    """A pipeline stage failed for good (e.g. its actors kept dying); committed shards stay committed."""


def validate(cfg: RunConfig) -> None:
    """Fail before any work on settings that cannot run, naming the key."""
    for key, model, flag in (("run.caption.model", cfg.caption.model, "--captioner"),
                             ("run.filter.model", cfg.filter.model, "--filter")):
        if not model:
            raise ValueError(f"{key} is empty: give the model folder ({flag})")
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{key}: {model} is not a transformers model folder (no config.json); for a "
                             "published checkpoint, download it first (huggingface-cli download ID --local-dir DIR)")
        if not any(folder.glob("*.safetensors")):
            raise ValueError(f"{key}: {model} has no *.safetensors weights (pickled weights are never loaded)")
        for weights in sorted(folder.glob("*.safetensors")):  # torn files fail here, not in an actor
            try:
                check_safetensors(weights)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
    if cfg.caption.num_captions < 1:
        raise ValueError(f"run.caption.num_captions must be at least 1, got {cfg.caption.num_captions}")
    if not 0.0 <= cfg.filter.threshold <= 1.0:
        raise ValueError(f"run.filter.threshold must be within [0, 1], got {cfg.filter.threshold}")
    if cfg.resources.max_actor_restarts < 0:
        raise ValueError("run.resources.max_actor_restarts must be 0 or more (a bound is what stops a "
                         f"dying actor from being retried forever), got {cfg.resources.max_actor_restarts}")
    if cfg.caption.min_length > cfg.caption.max_length:
        raise ValueError("run.caption.min_length is larger than run.caption.max_length")


class AttachShard:
    """Replaces Ray's `path` column with the shard name (`_shard`) that drives per-shard commits."""

    def __init__(self, names: dict[str, str]):
        self.names = names  # absolute input path -> shard name

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch["path"].to_pylist()
        names = [self.names.get(p) or self.names[os.path.abspath(p)] for p in paths]
        return batch.drop_columns(["path"]).append_column(schema.SHARD, pa.array(names, pa.string()))


def _model_gpus(res: Any) -> float:
    """GPUs per model actor: "auto" gives each actor a GPU, or an equal share when they outnumber them."""
    import ray

    if res.gpus_per_actor != "auto":
        return float(res.gpus_per_actor)
    total = ray.cluster_resources().get("GPU", 0)
    share = min(1.0, total / (res.captioner_actors + res.filter_actors))
    return math.floor(share * 10_000) / 10_000  # Ray takes fractions to 4 decimals


def _check_resources(cfg: RunConfig, gpus: float) -> None:
    """A pool that can never be placed would hang the job; say which keys to change instead."""
    import ray

    res = cfg.resources
    total = ray.cluster_resources()
    actors = res.captioner_actors + res.filter_actors
    cpus = actors * res.cpus_per_actor + res.decode_cpus
    if total.get("CPU", 0) < cpus:
        raise ValueError(
            f"the cluster has {total.get('CPU', 0):g} CPUs but {actors} model actors x "
            f"run.resources.cpus_per_actor={res.cpus_per_actor:g} + run.resources.decode_cpus="
            f"{res.decode_cpus:g} need {cpus:g}; lower them or the actor counts")
    if gpus and total.get("GPU", 0) < actors * gpus:
        raise ValueError(
            f"the cluster has {total.get('GPU', 0):g} GPUs but {actors} model actors x "
            f"run.resources.gpus_per_actor={gpus:g} need {actors * gpus:g}")


def build_dataset(cfg: RunConfig, shards: list[Shard], read_schema: pa.Schema) -> Any:
    """The Ray Data pipeline over `shards`; its blocks are policy-stage tables with `_shard`."""
    import ray

    from capfilt.images import load_image_spec
    from capfilt.stages.caption import Captioner
    from capfilt.stages.decode import Decode
    from capfilt.stages.filter import Filter
    from capfilt.stages.policy import KeepPolicy
    from .ray_env import actor_pool_args

    res = cfg.resources
    gpus = _model_gpus(res)
    _check_resources(cfg, gpus)
    caption_batch = cfg.caption.gpu_batch_size if gpus else cfg.caption.batch_size
    filter_batch = cfg.filter.gpu_batch_size if gpus else cfg.filter.batch_size
    names = {s.path: s.name for s in shards}
    cpu_task = {"batch_format": "pyarrow", "num_cpus": res.decode_cpus}
    # Rows reach the driver in input order: few shards are open at a time, and a redone shard's
    # files equal the originals.
    ray.data.DataContext.get_current().execution_options.preserve_order = True

    ds = ray.data.read_parquet([s.path for s in shards], schema=read_schema, include_paths=True,
                               partitioning=None, file_extensions=None, num_cpus=res.decode_cpus)
    ds = ds.map_batches(AttachShard(names), batch_size=None, **cpu_task)
    # Decode in caption-sized batches, so blocks of pixels stay the size the actors take.
    ds = ds.map_batches(Decode(cfg, load_image_spec(cfg.caption.model).size), batch_size=caption_batch,
                        **cpu_task)
    ds = ds.map_batches(Captioner, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow",
                        **actor_pool_args(res.captioner_actors, caption_batch, res.cpus_per_actor, gpus,
                                          max_restarts=res.max_actor_restarts))
    ds = ds.map_batches(Filter, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow",
                        **actor_pool_args(res.filter_actors, filter_batch, res.cpus_per_actor, gpus,
                                          max_restarts=res.max_actor_restarts))
    return ds.map_batches(KeepPolicy(cfg), batch_size=None, **cpu_task)


def _stage_failure(err: Exception, cfg: RunConfig, committed: int, total: int) -> StageFailed:
    """Ray's actor-death error as one message naming the stage, the limit and how to go on."""
    stages = {"Captioner": "captioner", "Filter": "filter"}
    match = re.search(r"MapBatches\((\w+)\)", str(err))
    stage = stages.get(match.group(1), match.group(1)) if match else "a pipeline"
    cause = next((line.strip() for line in str(err).splitlines() if "exit detail" in line.lower()),
                 str(err).splitlines()[0])
    return StageFailed(
        f"the {stage} actor kept dying: it was restarted run.resources.max_actor_restarts="
        f"{cfg.resources.max_actor_restarts} times and died again ({cause[:300]}). {committed} of {total} "
        "shards were committed this run and stay committed; fix the cause and re-run the same command "
        "to resume")


def _split_by_shard(batch: pa.Table) -> list[tuple[str, pa.Table]]:
    import pyarrow.compute as pc

    names = batch[schema.SHARD]
    return [(name, batch.filter(pc.equal(names, name)).drop_columns([schema.SHARD]))
            for name in pc.unique(names).to_pylist()]


def _write_stream(blocks: Any, shards: list[Shard], read_schema: pa.Schema, out: Path, manifest: Manifest,
                  identity: dict) -> int:
    """Route each row to its shard's writer; commit a shard once all of its rows are in."""
    from capfilt.stages.policy import route

    by_name = {s.name: s for s in shards}
    output_schema = schema.output_schema(read_schema)
    writers: dict[str, ShardWriter] = {}
    rows = 0
    try:
        for batch in blocks:
            for name, part in _split_by_shard(batch):
                writer = writers.get(name)
                if writer is None:
                    writer = writers[name] = ShardWriter(out, by_name[name], output_schema)
                for dest, table in route(part).items():
                    writer.write(dest, table)
                rows += part.num_rows
                if writer.complete:
                    manifest.record(name, writers.pop(name).commit(), identity)
                    log.info("committed shard %s (%d rows)", name, by_name[name].rows)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if writers:
        missing = {n: f"{w.counts.read}/{w.shard.rows}" for n, w in writers.items()}
        for writer in writers.values():
            writer.abort()
        raise RuntimeError(f"rows went missing in the pipeline (written/read per shard): {missing}")
    return rows


def _commit_whole(shard: Shard, out: Path, manifest: Manifest, identity: dict, cfg: RunConfig) -> None:
    """A shard that cannot enter the pipeline (bad schema, or empty): committed without Ray."""
    keep = pa.schema([f for f in shard.schema if f.name not in schema.ADDED_NAMES + list(schema.TRANSIENT)])
    keep = text_as_string(keep, cfg.columns.text)
    writer = ShardWriter(out, shard, schema.output_schema(keep))
    if shard.problem:
        for table in iter_failed_shard(shard, cfg):
            writer.write(schema.FAILED, table)
    manifest.record(shard.name, writer.commit(), identity)


def _discard(out: Path) -> None:
    """--force: remove the outputs of earlier runs (only what capfilt writes)."""
    for name in (*schema.OUTPUT_DIRS, TMP):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("manifest.json", "stats.json"):
        (out / name).unlink(missing_ok=True)


def _absolute_models(config: Config) -> Config:
    """Model folders as absolute paths (provenance columns and resumed runs do not depend on cwd)."""
    run = config.run

    def absolute(model: str) -> str:
        return str(Path(model).resolve()) if model and Path(model).is_dir() else model

    run = replace(run, caption=replace(run.caption, model=absolute(run.caption.model)),
                  filter=replace(run.filter, model=absolute(run.filter.model)))
    return replace(config, run=run)


def start_ray(cfg: RunConfig) -> bool:
    """Join `run.resources.address`, or start a local Ray with enough CPU slots for the pools;
    True when this call started or joined it (False: the process already had Ray).

    Slots are scheduling units, not cores: on a small machine a local Ray gets as many as the
    configured pools need, so the defaults run anywhere (oversubscribed rather than stuck).
    """
    from .ray_env import init_ray

    res = cfg.resources
    need = (res.captioner_actors + res.filter_actors) * res.cpus_per_actor + res.decode_cpus
    return init_ray(res.address, num_cpus=None if res.address else max(os.cpu_count() or 1, math.ceil(need)),
                    object_store_memory=res.object_store_memory)


def run_capfilt(config: Config, out: str | Path, force: bool = False) -> dict:
    """Run CapFilt on `config.run.input` into `out`; returns the stats written to `out/stats.json`.

    Committed shards whose input is unchanged are skipped: with nothing left to do, no Ray and no
    model is started (`stats["last_run"]["pipeline_started"]` is False).
    """
    config = _absolute_models(config)
    cfg = config.run
    validate(cfg)
    out = Path(out)
    start = time.time()
    with OutputLock(out):
        shards = [inspect_shard(p, cfg.columns) for p in list_shards(cfg.input)]
        if force:
            _discard(out)
        manifest = Manifest(out)
        identity = run_identity(cfg)
        manifest.check_identity(identity)
        shutil.rmtree(out / TMP, ignore_errors=True)  # leftovers of a crashed run
        write_resolved(config, out)

        read_schema, shards = unify(shards)
        todo = [s for s in shards if not manifest.is_committed(s)]
        for shard in todo:
            manifest.forget(shard.name)  # an input that changed since it was committed
        unreadable = [s for s in todo if s.schema is None]
        whole = [s for s in todo if s.schema is not None and (s.problem or s.rows == 0)]
        streamed = [s for s in todo if s.schema is not None and not s.problem and s.rows > 0]
        for shard in unreadable:
            log.error("shard %s skipped: %s", shard.name, shard.problem)
        for shard in whole:
            if shard.problem:
                log.warning("shard %s: all %d rows failed: %s", shard.name, shard.rows, shard.problem)
            _commit_whole(shard, out, manifest, identity, cfg)

        rows = 0
        if streamed:
            import ray
            from ray.exceptions import RayActorError

            started_ray = start_ray(cfg)
            try:
                ds = build_dataset(cfg, streamed, read_schema)
                rows = _write_stream(ds.iter_batches(batch_format="pyarrow", batch_size=None), streamed,
                                     text_as_string(read_schema, cfg.columns.text), out, manifest, identity)
            except RayActorError as err:
                committed = sum(manifest.is_committed(shard) for shard in streamed)
                raise _stage_failure(err, cfg, committed, len(streamed)) from err
            finally:
                if started_ray:  # a Ray this run started goes with it: its idle workers would slow the next stage
                    ray.shutdown()
        seconds = time.time() - start
        last_run = {
            "shards_listed": len(shards),
            "shards_skipped": len(shards) - len(todo),
            "shards_processed": len(todo) - len(unreadable),
            "shards_failed_whole": {s.name: s.problem for s in whole if s.problem},
            "shards_unreadable": {s.name: s.problem for s in unreadable},
            "pipeline_started": bool(streamed),
            "rows_through_models": rows,
            "seconds": round(seconds, 3),
            "images_per_second": round(rows / seconds, 3) if rows else 0.0,
        }
        stats = aggregate_stats(manifest, last_run)
        write_stats(out, stats)
        shutil.rmtree(out / TMP, ignore_errors=True)
    return stats
