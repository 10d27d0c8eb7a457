"""`capfilt run`: CapFilt over parquet shards as one Ray Data pipeline; workers carry the rows.

    read units (row groups, tagged _shard/_row; only key, image, caption, status read) -> Prepare
      (CPU tasks, fused with the read) -> CaptionAndFilter (actor pool: decodes its block, captions,
      scores, drops the image bytes) -> KeepPolicy -> StageParts (CPU tasks: rows -> part files)
    (run.resources.fuse_models=false: a Captioner pool and a Filter pool, each decoding the images)
    driver: part names and row ranges only -> commit task per finished shard (parts + the input
      shard's other columns -> 3 files + marker)

The driver reads parquet footers (how many rows each shard has, its row groups, its schema) and
then only metadata: for each part a worker staged, its shard, name and row ranges. When a shard's
parts cover all its rows, the driver starts a commit task that assembles the shard on a worker
(capfilt/commit.py). No row, no image byte passes through the driver, so the driver's cost grows
with the number of shards and blocks, not rows. Blocks flow in whatever order they finish (no
global ordering: a slow block delays only its own shard); each output file is written in input
order, from each row's position in its shard, so a redone shard writes the same bytes.

What crosses the object store, and why (the feed: the CPU a GPU host spends per image around the
models; `benchmarks/bench_feed.py`, figures in docs/benchmarks.md):
- JPEG bytes, not pixels. Decoded at 384 px an image is ~7x its JPEG; sent from a decode task to
  the actors (and from captioner to filter) every hop paid a serialise, copy and map of it, more
  CPU than the decode itself. The model actor decodes its block (`capfilt.images.DecodedImages`,
  the same bounded decoder, a refused image failing its row with the reason) and normalises each
  image once for both models, in place (`capfilt.images.pixel_values`). With
  `run.resources.decode_on_device` a GPU actor decodes whole JPEGs with nvJPEG and resizes them
  there (capfilt/model/device_decode.py); the bounds are still read from the header on the host.
- Narrow rows. Only the columns the prepare stage and the models use are read (key, image,
  caption, img2dataset's status); the actors' output has no image bytes, so the policy and staging
  tasks move scores and texts only; the commit joins the other input columns (the image bytes
  among them) from the input shard, which it reads once (`capfilt.commit.join_input`).
- One actor for both models (the default): the image bytes cross the object store once, each
  image is decoded once, and one GPU is not time-sliced between two processes. With two pools
  the captioner forwards the bytes and the filter decodes them again.
- No page faults per batch. glibc returns a freed buffer over 32 MB to the kernel, so each
  batch's normalised block (1.7 MB per 384-px image) and the models' activations were faulted in
  and zeroed again, batch after batch: ~0.8 core-ms of kernel time per image, more than the
  normalisation's own arithmetic. Model actors start with malloc settings that keep them in the
  heap (`pipelines.ray_env.ACTOR_MALLOC`).
Output is byte-identical to the design that sent pixels (bench_feed compares the files of both);
the object store holds about 1x the JPEG bytes per image (stats.json `last_run.block_bytes`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt import preflight, schema
from capfilt.commit import (MODELS, CommitError, Commits, ConfigMismatch, Coverage, OutputLock, commit_shard,
                            end_staging, model_provenance, new_staging, run_identity, write_shard)
from capfilt.config import FILTER_SCORES, Config, ConfigError, RunConfig, check, model_batch_size, write_resolved
from capfilt.model_folders import check_filter_and_scorers, checked_model_folder, filter_as_scorer
from capfilt.shards import (Shard, inspect_shards, is_text_type, list_shards, read_unit, read_units, text_as_string,
                            unify)
from capfilt.stages.policy import rank_columns
from capfilt.storage import Location, location
from capfilt.storage import configure as configure_storage

from .progress import Progress

log = logging.getLogger("capfilt.run")

__all__ = ["ConfigMismatch", "StageFailed", "run_capfilt", "start_ray"]


class StageFailed(RuntimeError):
    """A pipeline stage failed for good (e.g. its actors kept dying); committed shards stay committed."""


def validate(cfg: RunConfig) -> None:
    """Fail before any work on settings that cannot run, naming the key."""
    check(cfg, "run")  # its ranges and scorer names, for a section built by hand rather than loaded
    if cfg.filter.keep == "auto":
        raise ConfigError("run.filter.keep=auto is decided per round by the audit of `capfilt bootstrap`; "
                          "`capfilt run` needs both, web or synthetic (`capfilt audit --captioner` shows "
                          "what the audit would decide)")
    checked_model_folder("run.caption.model", "--captioner", cfg.caption.model, "captioner")
    if not cfg.filter.model and cfg.scorers:
        if cfg.filter.threshold is not None:
            raise ConfigError(f"run.filter.threshold={cfg.filter.threshold} has no ITM to apply to: run.filter.model "
                              "is empty (no BLIP filter); set it to null, the run.scorers thresholds decide")
        if all(scorer.threshold is None for scorer in cfg.scorers):
            raise ConfigError("run.filter.model is empty and no run.scorers entry has a threshold: nothing would "
                              "decide what is kept; give --filter or a scorer's threshold")
    check_filter_and_scorers(cfg)
    # itm and itc rank only with a BLIP filter (without one, their columns are null)
    ranks_by_blip = cfg.filter.model or not cfg.filter.top_k_synthetic
    names = {name for name in rank_columns(cfg) if ranks_by_blip or name not in FILTER_SCORES}
    if cfg.filter.rank_synthetic_by not in names:
        raise ConfigError(f"run.filter.rank_synthetic_by: {cfg.filter.rank_synthetic_by!r} is not one of "
                          f"{sorted(names)} (itm or itc with a BLIP filter, or a run.scorers name)")


# ---------------------------------------------------------------------------------------------
# The Ray Data pipeline


class ReadUnits:
    """Ray task stage: a batch of read units (one row group of one shard each) -> their rows."""

    def __init__(self, read_schema: pa.Schema):
        self.read_schema = read_schema

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        from capfilt.shards import ReadUnit

        units = [ReadUnit(*fields) for fields in zip(batch["shard"], batch["uri"], batch["row_group"],
                                                     batch["first_row"])]
        return pa.concat_tables([read_unit(unit, self.read_schema) for unit in units])


def _model_actors(res: Any) -> int:
    """Model actors in all: both pools, or the one pool of actors that run both models."""
    return res.captioner_actors if res.fuse_models else res.captioner_actors + res.filter_actors


def _model_gpus(res: Any) -> float:
    """GPUs per model actor: "auto" gives each actor a GPU, or an equal share when they outnumber them."""
    import ray

    if res.gpus_per_actor != "auto":
        return float(res.gpus_per_actor)
    total = ray.cluster_resources().get("GPU", 0)
    share = min(1.0, total / _model_actors(res))
    return math.floor(share * 10_000) / 10_000  # Ray takes fractions to 4 decimals


def _check_resources(cfg: RunConfig, gpus: float) -> None:
    """A pool that can never be placed would hang the job; say which keys to change instead."""
    import ray

    res = cfg.resources
    total = ray.cluster_resources()
    actors = _model_actors(res)
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


def model_input_schema(read_schema: pa.Schema, cfg: RunConfig) -> pa.Schema:
    """The input columns the pipeline reads: the ones the prepare stage and the models use."""
    cols = cfg.columns
    names = (cols.key, cols.image, cols.text, cols.status, "error_message")
    return pa.schema([f for f in read_schema if f.name in names])


def model_inputs(cfg: RunConfig, shards: list[Shard], read_schema: pa.Schema) -> Any:
    """The blocks the model actors take: read units read (only the columns used) and prepared, in
    caption-sized batches so the blocks are the size the actors take."""
    import ray

    from capfilt.stages.prepare import Prepare

    from .ray_env import task_args

    cpu_task = task_args(cfg.resources.decode_cpus)
    units = read_units(shards)
    ds = ray.data.from_items([vars(unit) for unit in units], override_num_blocks=len(units))
    ds = ds.map_batches(ReadUnits(model_input_schema(read_schema, cfg)), batch_size=1, batch_format="numpy",
                        **cpu_task)
    caption_batch = model_batch_size(cfg.caption, _model_gpus(cfg.resources) > 0)
    return ds.map_batches(Prepare(cfg), batch_size=caption_batch, batch_format="pyarrow", **cpu_task)


def build_dataset(cfg: RunConfig, shards: list[Shard], read_schema: pa.Schema, staging: Location) -> Any:
    """The Ray Data pipeline over `shards`; its blocks are `StageParts` metadata (no row data)."""
    import ray

    from capfilt.stages.caption import Captioner
    from capfilt.stages.filter import Filter
    from capfilt.stages.fused import CaptionAndFilter
    from capfilt.stages.policy import KeepPolicy
    from capfilt.stages.write import StageParts

    from .ray_env import map_actor_pool, task_args

    res = cfg.resources
    gpus = _model_gpus(res)
    _check_resources(cfg, gpus)
    caption_batch, filter_batch = model_batch_size(cfg.caption, gpus > 0), model_batch_size(cfg.filter, gpus > 0)
    pools = (f"{res.captioner_actors} captioner+filter" if res.fuse_models else
             f"{res.captioner_actors} captioner, {res.filter_actors} filter")
    log.info("models: %s actors, each on %s", pools, f"{gpus:g} GPU" if gpus else "CPU")
    cpu_task = task_args(res.decode_cpus)
    # Blocks go on as they finish; output order comes from `_row`, not from the order of blocks.
    ray.data.DataContext.get_current().execution_options.preserve_order = False
    ds = model_inputs(cfg, shards, read_schema)
    pool = {"max_restarts": res.max_actor_restarts, "tasks_in_flight": res.max_tasks_in_flight_per_actor}
    # The model actors decode the image bytes themselves; the last one drops them, so the policy
    # and writer tasks get scores and texts only.
    if res.fuse_models:
        ds = map_actor_pool(ds, CaptionAndFilter, {"cfg": cfg}, res.captioner_actors, caption_batch,
                            res.cpus_per_actor, gpus, **pool)
    else:
        ds = map_actor_pool(ds, Captioner, {"cfg": cfg}, res.captioner_actors, caption_batch, res.cpus_per_actor,
                            gpus, **pool)
        ds = map_actor_pool(ds, Filter, {"cfg": cfg}, res.filter_actors, filter_batch, res.cpus_per_actor, gpus,
                            **pool)
    ds = ds.map_batches(KeepPolicy(cfg), batch_size=None, batch_format="pyarrow", **cpu_task)
    return ds.map_batches(StageParts(str(staging)), batch_size=None, batch_format="pyarrow", **cpu_task)


def _stage_failure(err: Exception, cfg: RunConfig, committed: int, total: int) -> StageFailed:
    """Ray's error as one message naming the stage (or the lost work), the limit and how to go on."""
    from ray.exceptions import RayActorError

    text = str(err)
    match = re.search(r"MapBatches\((\w+)\)", text)
    storage = re.search(r"StorageUnavailable: (.*)", text)  # the object and the store's last answer
    cause = storage.group(1)[:700] if storage else next(
        (line.strip()[:300] for line in text.splitlines() if "exit detail" in line.lower()),
        text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__)
    resume = (f"{committed} of {total} shards were committed this run and stay committed; fix the cause and "
              "re-run the same command to resume")
    if isinstance(err, RayActorError):
        names = {"Captioner": "captioner", "Filter": "filter", "CaptionAndFilter": "captioner+filter"}
        stage = names.get(match.group(1), match.group(1)) if match else "a"
        return StageFailed(
            f"the {stage} actor kept dying: it was restarted run.resources.max_actor_restarts="
            f"{cfg.resources.max_actor_restarts} times and died again ({cause}). {resume}")
    where = f"the {match.group(1)} stage" if match else "the pipeline"
    return StageFailed(f"{where} failed and Ray could not recover it ({type(err).__name__}: {cause}). {resume}")


# ---------------------------------------------------------------------------------------------
# Commits (Ray tasks)


def scorer_names(cfg: RunConfig) -> list[str]:
    """The named scorers of the run, in run.scorers' order: their columns follow capfilt's."""
    return [scorer.name for scorer in cfg.scorers]


def failed_shard_rows(shard: Shard, cfg: RunConfig, batch_rows: int = 4096):
    """The rows of a shard that fails as a whole, each marked failed with the shard's problem."""
    from capfilt.model.utf8 import utf8_text
    from capfilt.stages.policy import KeepPolicy

    policy = KeepPolicy(cfg)
    text = cfg.columns.text
    added = schema.output_schema(pa.schema([]), scorer_names(cfg)).names
    with location(shard.uri).open_input_file() as handle:
        for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows):
            table = pa.Table.from_batches([record_batch])
            # Input columns that collide with capfilt's are dropped here (the problem says so).
            table = table.drop_columns([c for c in table.column_names
                                        if c in added or c in schema.TRANSIENT])
            n = table.num_rows
            nulls = {
                schema.CAPTION_ITM: pa.float32(), schema.CAPTION_ITC: pa.float32(),
                schema.SYNTHETIC: pa.list_(pa.string()), schema.SYNTHETIC_ITM: pa.list_(pa.float32()),
                schema.SYNTHETIC_ITC: pa.list_(pa.float32()),
                **{f.name: f.type for f in schema.scorer_fields(scorer_names(cfg))},
            }
            for name, arrow_type in nulls.items():
                table = table.append_column(name, pa.nulls(n, arrow_type))
            if text not in table.column_names:
                table = table.append_column(text, pa.nulls(n, pa.string()))
            elif is_text_type(table[text].type):  # decoded, invalid UTF-8 replaced: readable text
                table = table.set_column(table.schema.get_field_index(text), text, utf8_text(table[text])[0])
            table = table.append_column(schema.ERROR, pa.array([shard.problem] * n, pa.string()))
            table = policy(table)
            if text not in shard.schema.names:
                table = table.drop_columns([text])
            yield table


def commit_whole(out: Location, shard: Shard, cfg: RunConfig, identity_key: str) -> dict:
    """A shard that cannot enter the pipeline (bad schema, or empty): every row to failed/, on a worker."""
    names = scorer_names(cfg)
    added = schema.output_schema(pa.schema([]), names).names + list(schema.TRANSIENT)
    keep = pa.schema([f for f in shard.schema if f.name not in added])
    output_schema = schema.output_schema(text_as_string(keep, cfg.columns.text), names)
    tables = list(failed_shard_rows(shard, cfg)) if shard.problem else []
    table = pa.concat_tables(tables) if tables else output_schema.empty_table()
    return write_shard(out, shard, table, output_schema, identity_key)


class Committer:
    """Starts commit tasks as shards become whole and collects them; the driver's only writes are JSON."""

    def __init__(self, out: Location, staging: Location, identity_key: str, cfg: RunConfig, progress: Progress):
        import ray

        from .ray_env import task_args

        self.out, self.staging, self.identity_key, self.progress = out, staging, identity_key, progress
        options = {**task_args(cfg.resources.decode_cpus), "max_retries": 3, "retry_exceptions": [OSError]}
        self._commit_parts = ray.remote(commit_shard).options(**options)
        self._commit_whole = ray.remote(commit_whole).options(**options)
        self.cfg = cfg
        self.pending: dict[Any, tuple[str, int]] = {}  # ObjectRef -> (shard name, rows not yet in the progress)
        self.committed: list[str] = []
        self.failed: dict[str, str] = {}

    def parts(self, shard: Shard, parts: list[str], output_schema: pa.Schema) -> None:
        ref = self._commit_parts.remote(self.out, self.staging, shard, parts, output_schema, self.identity_key)
        self.pending[ref] = (shard.name, 0)

    def whole(self, shard: Shard) -> None:
        """A shard that skips the pipeline: its rows count as done (all failed) once it is committed."""
        self.pending[self._commit_whole.remote(self.out, shard, self.cfg, self.identity_key)] = (shard.name, shard.rows)

    def collect(self, wait: bool = False) -> None:
        import ray

        while self.pending:
            done, _ = ray.wait(list(self.pending), num_returns=len(self.pending) if wait else 1,
                               timeout=None if wait else 0)
            if not done:
                return
            for ref in done:
                name, rows = self.pending.pop(ref)
                try:
                    ray.get(ref)
                except (CommitError, OSError, ray.exceptions.RayError) as err:
                    self.failed[name] = str(err).splitlines()[-1][:500]
                    log.error("shard %s was not committed: %s", name, self.failed[name])
                    continue
                self.committed.append(name)
                if rows:
                    self.progress.staged(rows, 0, 0, rows)
                self.progress.committed()


def _stream(ds: Any, shards: list[Shard], read_schema: pa.Schema, committer: Committer,
            progress: Progress) -> int:
    """Follow the staged parts; commit each shard once its parts cover its rows. Returns rows seen."""
    by_name = {s.name: s for s in shards}
    coverage = {s.name: Coverage(s.rows) for s in shards}
    output_schema = schema.output_schema(read_schema, scorer_names(committer.cfg))
    rows = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for part in batch.to_pylist():
            cover = coverage[part["shard"]]
            was_complete = cover.complete
            cover.add(part["part"], part["ranges"])
            rows += part["rows"]
            progress.staged(part["rows"], part["kept"], part["rejected"], part["failed"])
            if cover.complete and not was_complete:
                committer.parts(by_name[part["shard"]], list(cover.parts), output_schema)
        committer.collect()
    missing = {n: f"{c.covered}/{c.rows}" for n, c in coverage.items() if not c.complete}
    if missing:
        raise RuntimeError(f"rows went missing in the pipeline (staged/read per shard): {missing}")
    return rows


# ---------------------------------------------------------------------------------------------
# The run


def _absolute_models(config: Config) -> Config:
    """Model folders as absolute paths (provenance columns and resumed runs do not depend on cwd)."""
    run = config.run

    def absolute(model: str) -> str:
        return str(Path(model).resolve()) if model and Path(model).is_dir() else model

    run = replace(run, caption=replace(run.caption, model=absolute(run.caption.model)),
                  filter=replace(run.filter, model=absolute(run.filter.model)),
                  scorers=tuple(replace(s, model=absolute(s.model)) for s in run.scorers))
    return replace(config, run=run)


def start_ray(cfg: RunConfig) -> bool:
    """Join `run.resources.address`, or start a local Ray with enough CPU slots for the pools;
    True when this call started or joined it (False: the process already had Ray).

    Slots are scheduling units, not cores: on a small machine a local Ray gets as many as the
    configured pools need, so the defaults run anywhere (oversubscribed rather than stuck).
    """
    from .ray_env import init_ray

    res = cfg.resources
    need = _model_actors(res) * res.cpus_per_actor + res.decode_cpus
    return init_ray(res.address, num_cpus=None if res.address else max(os.cpu_count() or 1, math.ceil(need)),
                    object_store_memory=res.object_store_memory)


@dataclass(frozen=True)
class _Plan:
    todo: list[Shard]  # input shards not committed with this identity
    unreadable: list[Shard]  # no footer: reported, not committed
    whole: list[Shard]  # committed without the models: every row failed (a shard-level problem) or none
    streamed: list[Shard]  # through the Ray Data pipeline


def _plan(shards: list[Shard], commits: Commits, identity_key: str) -> _Plan:
    """What this run does with each shard."""
    todo = [s for s in shards if not commits.is_committed(s, identity_key)]
    for shard in todo:
        commits.forget(shard.name)  # an input that changed since it was committed
    unreadable = [s for s in todo if s.schema is None]
    whole = [s for s in todo if s.schema is not None and (s.problem or s.rows == 0)]
    streamed = [s for s in todo if s.schema is not None and not s.problem and s.rows > 0]
    for shard in unreadable:
        log.error("shard %s skipped: %s", shard.name, shard.problem)
    for shard in whole:
        if shard.problem:
            log.warning("shard %s: all %d rows failed: %s", shard.name, shard.rows, shard.problem)
    return _Plan(todo, unreadable, whole, streamed)


def _process(cfg: RunConfig, plan: _Plan, read_schema: pa.Schema, out: Location, staging: Location,
             identity_key: str) -> tuple[int, Committer | None, dict[str, int]]:
    """Start Ray (if there is work), run the pipeline and commit every shard: (rows through the models,
    committer, bytes each pipeline operator put in the object store)."""
    if not (plan.streamed or plan.whole):
        return 0, None, {}
    progress = Progress(sum(s.rows for s in plan.streamed + plan.whole), len(plan.streamed) + len(plan.whole),
                        cfg.resources.progress_seconds, log)
    import ray
    from ray.exceptions import RayError

    started_ray = start_ray(cfg)
    progress.start()
    rows, block_bytes = 0, {}
    committer = Committer(out, staging, identity_key, cfg, progress)
    try:
        for shard in plan.whole:
            committer.whole(shard)
        if plan.streamed:
            from .ray_env import operator_output_bytes

            ds = build_dataset(cfg, plan.streamed, read_schema, staging)
            rows = _stream(ds, plan.streamed, text_as_string(read_schema, cfg.columns.text), committer, progress)
            block_bytes = operator_output_bytes(ds)
        committer.collect(wait=True)
    except RayError as err:  # actors that kept dying, a lost node, a task that kept failing
        committer.collect(wait=True)
        raise _stage_failure(err, cfg, len(committer.committed), len(plan.streamed) + len(plan.whole)) from err
    finally:
        progress.stop()
        if started_ray:  # a Ray this run started goes with it: its idle workers would slow the next stage
            ray.shutdown()
    return rows, committer, block_bytes


def run_capfilt(config: Config, out: str | Path | Location, force: bool = False) -> dict:
    """Run CapFilt on `config.run.input` into `out` (a folder or URI); returns the stats in `out/stats.json`.

    Committed shards whose input is unchanged are skipped: with nothing left to do, no Ray and no
    model is started (`stats["last_run"]["pipeline_started"]` is False).
    """
    import time

    config = filter_as_scorer(_absolute_models(config))
    cfg = config.run
    validate(cfg)
    configure_storage(config.storage)
    preflight.check(inputs={"--input": cfg.input}, outputs={"--out": str(out)})  # before Ray and the models
    out = location(out)
    start = time.time()
    with OutputLock(out):
        shards = inspect_shards(list_shards(cfg.input), cfg.columns)
        commits = Commits(out)
        if force:
            commits.discard()
        identity = run_identity(cfg)
        commits.check_identity(identity)
        identity_key = commits.begin(identity)
        staging = new_staging(out)
        write_resolved(config, out)
        (out / MODELS).write_json(model_provenance(cfg, identity))

        read_schema, shards = unify(shards)
        plan = _plan(shards, commits, identity_key)
        log.info("input: %d shards, %s rows in %s; %d to process, %d committed before", len(shards),
                 f"{sum(s.rows for s in shards):,}", cfg.input, len(plan.todo) - len(plan.unreadable),
                 len(shards) - len(plan.todo))
        rows, committer, block_bytes = _process(cfg, plan, read_schema, out, staging, identity_key)
        seconds = time.time() - start
        last_run = {
            "shards_listed": len(shards),
            "shards_skipped": len(shards) - len(plan.todo),
            "shards_processed": len(plan.todo) - len(plan.unreadable),
            "shards_failed_whole": {s.name: s.problem for s in plan.whole if s.problem},
            "shards_unreadable": {s.name: s.problem for s in plan.unreadable},
            "shards_uncommitted": dict(committer.failed) if committer else {},
            "pipeline_started": bool(plan.streamed),
            "rows_through_models": rows,
            "seconds": round(seconds, 3),
            "images_per_second": round(rows / seconds, 3) if rows else 0.0,
            "block_bytes": block_bytes,  # what each pipeline operator put in the object store
        }
        stats = commits.stats(identity_key, last_run)
        commits.write_stats(stats)
        end_staging(staging)
    return stats
