"""Configuration: frozen dataclasses, loaded from YAML, overridden with `--set a.b=value`.

Every section is a frozen dataclass with a comment on each default. `load_config` builds the
tree from a YAML mapping, applies dotted overrides and rejects unknown keys by their dotted
name, so a typo in a 50-line YAML file is reported as `run.filter.treshold`, not ignored. Every
number is then checked against its allowed range (`RANGES`, one table for all sections, those
of `model/` included), so a bad value fails when the config is loaded, before Ray or a model
starts; every bad setting is a `ConfigError` naming its key.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from capfilt.model.image_config import ImageConfig
from capfilt.model.train_config import TrainConfig
from capfilt.storage import StorageConfig, location


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class ColumnsConfig:
    key: str = "key"  # unique row id (img2dataset writes a zero-padded shard+index string)
    image: str = "jpg"  # encoded image bytes (img2dataset's parquet output stores them in `jpg`)
    text: str = "caption"  # the web (alt-text) caption
    status: str = "status"  # img2dataset download status; rows not equal to "success" are failed


@dataclass(frozen=True)
class CaptionConfig:
    # captioner folder (--captioner): BlipForConditionalGeneration, or any captioner family of
    # capfilt/model/families.py (BLIP-2, LLaVA, Florence-2, ...: docs/models.md)
    model: str = ""
    num_captions: int = 1  # synthetic captions per image (the BLIP paper uses one)
    # decoder prompt, stripped from the returned captions; the one prompt of the captioner's
    # fine-tuning (train.lm_prompt follows it) and of `capfilt eval`'s captioning
    prompt: str = "a picture of "
    top_p: float = 0.9  # nucleus sampling mass, as in BLIP's CapFilt
    # top-k before top-p: transformers' default, which BLIP's CapFilt sampled with; 0 disables
    top_k: int = 50
    repetition_penalty: float = 1.1  # BLIP's sampling setting
    # in tokens, prompt excluded (BLIP counted the prompt: docs/data-format.md); `capfilt eval`
    # decodes with the same limits (BLIP's caption evaluation: 5 and 20 too)
    min_length: int = 5
    max_length: int = 20  # in tokens, prompt excluded, end-of-sequence included
    # decode steps between end-of-caption checks: each is one host sync, after which images with
    # all captions finished leave the batch
    eos_check_every: int = 4
    # torch.compile the decode step (CUDA graphs on GPU); off until a GPU run proves it
    cuda_graphs: bool = False
    beam: bool = False  # beam search instead of nucleus sampling (deterministic, less diverse)
    num_beams: int = 3  # beam width when beam is true (raised to num_captions if smaller)
    batch_size: int = 0  # images per captioner call; 0: model_batch_size's (256 on GPU, 64 on CPU)
    seed: int = 0  # sampling seed, combined with the row key so results do not depend on batching


@dataclass(frozen=True)
class FilterConfig:
    # filter: a BlipForImageTextRetrieval folder (--filter). `capfilt run` takes a CLIP or SigLIP folder
    # here too, as the shorthand for the scorer `filter` of run.scorers with this threshold and no BLIP
    # (capfilt/model_folders.py filter_as_scorer); "" with run.scorers: no BLIP filter, the scorers decide
    model: str = ""
    # keep a text when its ITM P(match) is at least this (a CLIP/SigLIP --filter: its score's);
    # null: ITM is stored, no text is dropped for it (needed without a BLIP filter)
    threshold: float | None = 0.5
    # which texts may be kept; auto (the default of `capfilt bootstrap`/`demo`): each round's audit
    # decides between both and web (capfilt/audit.py synthetic_decision); `capfilt run` alone refuses it
    keep: Literal["both", "web", "synthetic", "auto"] = "both"
    batch_size: int = 0  # images per filter call, each with all of its texts; 0: model_batch_size's
    # texts are truncated to this many tokens (BLIP's retrieval setting), by the filter and by
    # `capfilt eval`'s retrieval alike
    max_text_tokens: int = 35
    # texts whose token counts round up to the same multiple of this run together, padded to the
    # longest of their group, not of the whole batch (capfilt/model/text_pass.py); 0: one group.
    # Changes speed only, not scores beyond float summation order; the model's default
    # (text_pass.BUCKET_TOKENS, a literal here so the config loads without torch)
    bucket_tokens: int = 8
    # keep at most this many of an image's synthetic captions that pass the threshold, best
    # first by rank_synthetic_by (BLIP-2: 10 captions, top 2); 0 keeps every one that passes
    top_k_synthetic: int = 0
    # score that ranks synthetic captions for top_k_synthetic: the filter's "itm" or "itc", or the
    # name of one of run.scorers
    rank_synthetic_by: str = "itm"


@dataclass(frozen=True)
class ScorerConfig:
    """One named scorer beside the BLIP filter (or instead of it: run.filter.model ""): a CLIP or
    SigLIP folder (capfilt.model.scorers), or a BLIP retrieval folder's ITM or ITC
    (capfilt/scoring.py); its family is read from the folder's config.json."""

    # names its columns score_<name> and synthetic_score_<name> (lowercase letters, digits, _)
    name: str = ""
    model: str = ""  # a CLIPModel, SiglipModel, Siglip2Model or BlipForImageTextRetrieval folder
    # which score of the folder: auto is its one score (CLIP cosine, SigLIP probability) and ITM
    # P(match) for a BLIP retrieval folder; itm or itc pick one of a BLIP folder's two
    kind: Literal["auto", "itm", "itc"] = "auto"
    # keep a text only when this score is at least the threshold (CLIP, ITC: cosine in [-1, 1];
    # SigLIP, ITM: probability in [0, 1]); null: the scores are stored, no text is dropped for them
    threshold: float | None = None
    # 0 uses threshold as given; q in (0, 1): `capfilt bootstrap` sets threshold, each round, to the
    # q-quantile of this scorer's scores on the human pairs, as bootstrap.threshold_quantile does
    # for ITM (capfilt/calibrate.py); `capfilt run` alone has no human pairs and uses threshold
    threshold_quantile: float = 0.0


@dataclass(frozen=True)
class ResourcesConfig:
    address: str = ""  # Ray address: "" starts a local in-process Ray; "auto" or "ray://host:10001"
    captioner_actors: int = 1  # captioner actor pool size
    filter_actors: int = 1  # filter actor pool size
    # "auto": a GPU per model actor (an equal share if actors outnumber GPUs), CPU without GPUs;
    # or a number (0 = CPU)
    gpus_per_actor: float | Literal["auto"] = "auto"
    cpus_per_actor: float = 1.0  # CPU slots each model actor reserves (torch threads follow it)
    decode_cpus: float = 0.5  # CPU slots per CPU task (read + prepare, keep policy + staging, commit)
    object_store_memory: int = 0  # bytes for a local Ray's object store; 0 lets Ray choose
    # restarts per model actor (each retries its batch) before the job fails; Ray's default,
    # unbounded, would retry an actor that always dies forever
    max_actor_restarts: int = 3
    # batches queued at each model actor ahead of the one it runs (Ray Data's
    # max_tasks_in_flight_per_actor): their blocks reach the actor's node while the model works,
    # so a GPU does not wait for input; each costs a batch of pixels in the object store
    max_tasks_in_flight_per_actor: int = 4
    # one pool of captioner_actors actors that each run both models on the block they decoded
    # (capfilt/stages/fused.py; filter_actors is then unused); false: a captioner pool and a filter
    # pool, each decoding the images (docs/benchmarks.md: the CPU cost of each)
    fuse_models: bool = True
    # model actors on a GPU decode whole RGB/grey JPEGs there (nvJPEG through torchvision) and
    # resize them there (bicubic, antialiased: within a few levels of PIL's pixels, so a run's
    # identity records it); other images, and every bound, stay on the CPU decoder. Off until a
    # GPU run of tests/model/test_device_decode.py and benchmarks/bench_feed.py decides
    decode_on_device: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    progress_seconds: float = 30.0  # seconds between the driver's progress lines (0: only the last one)


@dataclass(frozen=True)
class RunConfig:
    input: str = ""  # input shards: a folder of *.parquet or a glob, local or a URI (s3://, gs://, ...) (--input)
    round: int = 0  # bootstrap round recorded in the output provenance
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    image: ImageConfig = field(default_factory=ImageConfig)  # decoding limits, training's too
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    # more scorers, run in the filter's actor on the same pictures and texts; a text is kept when it
    # passes the filter and every scorer with a threshold (docs/models.md)
    scorers: tuple[ScorerConfig, ...] = ()
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0  # the whole world is a function of this seed
    num_human: int = 600  # clean "human-annotated" pairs
    num_web: int = 600  # web pairs, a share of them noisy
    num_test: int = 200  # clean held-out pairs
    noise: float = 0.5  # share of web rows whose caption is noisy
    image_size: int = 64  # side of the square images, in pixels
    rows_per_shard: int = 200  # rows per parquet shard
    failed_share: float = 0.02  # share of web rows that "failed to download" (no image bytes)
    two_object_share: float = 0.5  # share of scenes with two objects instead of one
    # Relative weights of the noise types among noisy web captions (normalised to sum to 1).
    mismatch_weight: float = 0.4  # the caption of another web image
    swap_weight: float = 0.4  # a hard negative: the true caption with one attribute changed
    junk_weight: float = 0.2  # alt-text junk ("IMG_4032.JPG", "click here for more")
    # Attributes a swap may change; "background" is the background colour.
    swap_attributes: tuple[str, ...] = ("colour", "shape", "size", "position", "background")
    jpeg_quality: int = 90  # quality of the JPEG bytes in the `jpg` column
    pixel_noise: float = 4.0  # std of the Gaussian pixel noise, in 0-255 units


@dataclass(frozen=True)
class DownloadConfig:
    image_size: int = 256  # img2dataset resizes to this side
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border"] = "keep_ratio"
    processes: int = 1  # img2dataset processes
    threads: int = 16  # img2dataset threads per process
    timeout: int = 10  # seconds per URL
    retries: int = 0  # img2dataset retries per URL
    rows_per_shard: int = 10_000  # img2dataset number_sample_per_shard
    url_col: str = "url"  # URL column of a .csv/.tsv/.parquet URL list (written as `url`)
    caption_col: str = "caption"  # caption column of a .csv/.tsv/.parquet list (written as `caption`)
    input_format: Literal["auto", "txt", "csv", "tsv", "parquet"] = "auto"  # auto: from the suffix
    schemes: tuple[str, ...] = ("http", "https")  # other URL schemes (file://, ftp://) are refused
    max_pixels: int = 40_000_000  # OpenCV refuses to decode larger images (decompression bombs)
    min_side: int = 0  # images with a shorter side are failed by img2dataset ("image too small")
    encode_quality: int = 95  # JPEG quality of the re-encoded `jpg` bytes
    extract_exif: bool = False  # EXIF can carry GPS positions and camera serials; off by default
    compute_hash: bool = True  # store the sha256 of the downloaded bytes (for dedup across crawls)
    # local folder img2dataset downloads into when the output is an object-store URI; "" uses a
    # temporary one (a kept folder lets a killed download resume its unfinished shards)
    staging: str = ""


@dataclass(frozen=True)
class EvalConfig:
    k: int = 16  # ITM re-ranks this many ITC candidates per query (BLIP: 128 on COCO, 256 on Flickr)
    batch_size: int = 32  # images per vision / captioner call
    itm_batch_size: int = 128  # image-text pairs per ITM call
    # captions are decoded with run.caption's prompt and lengths, texts cut at run.filter.max_text_tokens
    num_beams: int = 3  # BLIP evaluates captioning with beam search, width 3
    max_rows: int = 0  # evaluate only the first N rows by key order; 0 evaluates all
    examples: int = 8  # generated captions copied into the results for a look


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.95  # ITC image cosine at or above this makes two images near-duplicates
    batch_size: int = 64  # images per vision-encoder call
    query_batch: int = 4096  # rows per faiss range search, bounding the memory of its results


@dataclass(frozen=True)
class ExportConfig:
    format: Literal["webdataset", "hf", "parquet"] = "webdataset"  # what the files are (--format)
    # one sample (tar sample, row) per kept text instead of one per image, the image repeated (--explode)
    explode: bool = False
    # samples per output file (tar, parquet or arrow), as img2dataset's number_sample_per_shard
    # default; the last file holds the rest. 0: one file per data/ shard (its sizes follow the keep rate)
    samples_per_shard: int = 10_000
    address: str = ""  # Ray address: "" starts a local in-process Ray; "auto" or "ray://host:10001"
    cpus_per_task: float = 1.0  # CPU slots each export task (one output file) reserves
    max_retries: int = 3  # retries of an export task whose worker died or whose storage call failed
    progress_seconds: float = 30.0  # seconds between the driver's progress lines (0: only the last one)


@dataclass(frozen=True)
class ModelConfig:
    size: str = "tiny"  # MED preset when training from scratch: tiny | small | base | large
    # MEDConfig fields that replace the preset's, e.g. {image_size: 384, queue_size: 4096}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Text transformer start when training from scratch: "" random, "packaged" the offline
    # 6-layer MiniLM BERT (needs text_hidden 384, 12 heads, 1536 intermediate), or a BERT folder
    # with model.safetensors (bert-base-uncased for base/large, as BLIP; model/bert_init.py).
    text_init: str = ""
    # Vision transformer start when training from scratch: "" random, or a transformers ViT
    # (ViTModel / ViTForImageClassification, e.g. facebook/deit-base-patch16-224) or DeiT
    # folder with model.safetensors, as BLIP starts from DeiT / ViT-ImageNet (model/vision_init.py).
    vision_init: str = ""


@dataclass(frozen=True)
class FinetuneConfig:
    # Input side of the captioner and filter fine-tunings: the vision position grid is
    # interpolated bicubically to it first (BLIP's interpolate_pos_embed: pre-trained at 224,
    # fine-tuned at 384). 0 = 384 for the base/large presets, the model's own size otherwise
    # (tiny/small: the demo's pre-training size; --init-blip: the checkpoint's).
    image_size: int = 0
    captioner_epochs: int = 5  # captioner fine-tuning passes (BLIP's COCO captioning: 5)
    filter_epochs: int = 6  # filter fine-tuning passes (BLIP's COCO retrieval: 6)
    lr: float = 1e-5  # peak lr of both fine-tunings, cosine to 0 without warm-up (BLIP: 1e-5)
    max_steps: int = 0  # optimiser steps of a fine-tuning; 0 = its epochs (a cap for smoke runs)


@dataclass(frozen=True)
class TrainResourcesConfig:
    workers: int = 1  # DDP processes; above 1 runs a Ray Train TorchTrainer (gloo on CPU, nccl on GPU)
    gpu: bool = False  # one GPU per worker (a single process uses CUDA whenever it is present)
    address: str = ""  # Ray address for workers > 1: "" starts a local Ray on loopback


@dataclass(frozen=True)
class BootstrapConfig:
    rounds: int = 1  # CapFilt rounds after round 0 (the BLIP paper runs one)
    # 0 uses run.filter.threshold as given; q in (0, 1) sets each round's threshold to the
    # q-quantile of its filter's P(match) on the human pairs (capfilt/calibrate.py), for filters
    # too under-confident to pass BLIP's 0.5.
    threshold_quantile: float = 0.0
    # share of the human pairs (by a stable hash of the row key) held out of both fine-tunings and
    # the threshold calibration, for each round's filter audit (capfilt/audit.py); 0: no audit
    audit_holdout: float = 0.1


@dataclass(frozen=True)
class AuditConfig:
    target_keep_rate: float = 0.9  # the audit reports the threshold that keeps this share of clean pairs
    seed: int = 0  # seed of the derangement that gives each held-out image another pair's caption


@dataclass(frozen=True)
class Config:
    # torch device of the work a command does in its own process (eval, dedup, calibration,
    # audit): "auto" is CUDA when present, else the CPU; or e.g. "cuda:1". Ray actors and
    # workers take theirs from run.resources / train_resources.
    device: str = "auto"
    run: RunConfig = field(default_factory=RunConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)  # `capfilt bootstrap`
    demo: DemoConfig = field(default_factory=DemoConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # `capfilt eval`
    audit: AuditConfig = field(default_factory=AuditConfig)  # `capfilt audit`, every bootstrap round
    dedup: DedupConfig = field(default_factory=DedupConfig)  # `capfilt dedup`
    export: ExportConfig = field(default_factory=ExportConfig)  # `capfilt export`
    model: ModelConfig = field(default_factory=ModelConfig)  # `capfilt pretrain` from scratch
    # `capfilt pretrain`, and what the fine-tunings share (capfilt/training.py role_config)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # `capfilt finetune`, bootstrap's fine-tunings
    train_resources: TrainResourcesConfig = field(default_factory=TrainResourcesConfig)  # DDP workers
    storage: StorageConfig = field(default_factory=StorageConfig)  # retries of object-store calls, every command


# ---------------------------------------------------------------------------------------------
# Allowed values


@dataclass(frozen=True)
class Range:
    """The values a number may take: `low` to `high` (None: unbounded), each end included unless open."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def allows(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low, high = (f"{v:g}" if isinstance(v, float) else str(v) for v in (self.low, self.high))
        if self.high is None:
            return f"{'above' if self.open_low else 'at least'} {low}"
        if self.low is None:
            return f"{'below' if self.open_high else 'at most'} {high}"
        return f"within {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"


NON_NEGATIVE, POSITIVE, SHARE = Range(0), Range(1), Range(0.0, 1.0)
# Every range-checked key and its allowed values. Keys missing here take any value of their type.
RANGES: dict[str, Range] = {
    "run.round": NON_NEGATIVE,
    "run.image.max_pixels": POSITIVE,
    "run.image.max_bytes": POSITIVE,
    "run.image.min_side": NON_NEGATIVE,
    "run.caption.num_captions": POSITIVE,
    "run.caption.top_p": Range(0.0, 1.0, open_low=True),
    "run.caption.top_k": NON_NEGATIVE,  # 0 disables top-k
    "run.caption.repetition_penalty": Range(0.0, open_low=True),
    "run.caption.min_length": NON_NEGATIVE,
    "run.caption.max_length": POSITIVE,
    "run.caption.eos_check_every": POSITIVE,
    "run.caption.num_beams": POSITIVE,
    "run.caption.batch_size": NON_NEGATIVE,  # 0: model_batch_size's
    "run.filter.threshold": SHARE,
    "run.filter.batch_size": NON_NEGATIVE,
    "run.filter.max_text_tokens": Range(2),  # [CLS] (or [ENC]) and [SEP] at least
    "run.filter.bucket_tokens": NON_NEGATIVE,  # 0: one group
    "run.filter.top_k_synthetic": NON_NEGATIVE,  # 0: every caption that passes
    # `[]`: every item of the list; a cosine or a probability (the family's own range: validate)
    "run.scorers[].threshold": Range(-1.0, 1.0),
    "run.scorers[].threshold_quantile": Range(0.0, 1.0, open_high=True),  # 0: threshold as given
    "run.resources.captioner_actors": POSITIVE,
    "run.resources.filter_actors": POSITIVE,
    "run.resources.gpus_per_actor": Range(0.0),  # or "auto"
    "run.resources.cpus_per_actor": Range(0.0),
    "run.resources.decode_cpus": Range(0.0),
    "run.resources.object_store_memory": NON_NEGATIVE,
    # a bound is what stops a dying actor from being retried forever
    "run.resources.max_actor_restarts": NON_NEGATIVE,
    "run.resources.max_tasks_in_flight_per_actor": POSITIVE,
    "run.resources.progress_seconds": Range(0.0),
    "demo.num_human": NON_NEGATIVE,
    "demo.num_web": NON_NEGATIVE,
    "demo.num_test": NON_NEGATIVE,
    "demo.noise": SHARE,
    "demo.image_size": Range(16),  # shapes need room to be drawn
    "demo.rows_per_shard": POSITIVE,
    "demo.failed_share": SHARE,
    "demo.two_object_share": SHARE,
    "demo.mismatch_weight": Range(0.0),
    "demo.swap_weight": Range(0.0),
    "demo.junk_weight": Range(0.0),
    "demo.jpeg_quality": Range(1, 95),
    "demo.pixel_noise": Range(0.0),
    "download.image_size": POSITIVE,
    "download.processes": POSITIVE,
    "download.threads": POSITIVE,
    "download.timeout": POSITIVE,
    "download.retries": NON_NEGATIVE,
    "download.rows_per_shard": POSITIVE,
    "download.max_pixels": POSITIVE,
    "download.min_side": NON_NEGATIVE,
    "download.encode_quality": Range(0, 100),
    "eval.k": POSITIVE,
    "eval.batch_size": POSITIVE,
    "eval.itm_batch_size": POSITIVE,
    "eval.num_beams": POSITIVE,
    "eval.max_rows": NON_NEGATIVE,
    "eval.examples": NON_NEGATIVE,
    "dedup.threshold": Range(-1.0, 1.0),  # a cosine
    "dedup.batch_size": POSITIVE,
    "dedup.query_batch": POSITIVE,
    "export.samples_per_shard": NON_NEGATIVE,  # 0: one file per data/ shard
    "export.cpus_per_task": Range(0.0),
    "export.max_retries": NON_NEGATIVE,
    "export.progress_seconds": Range(0.0),
    "finetune.image_size": NON_NEGATIVE,
    "finetune.captioner_epochs": NON_NEGATIVE,
    "finetune.filter_epochs": NON_NEGATIVE,
    "finetune.lr": Range(0.0),
    "finetune.max_steps": NON_NEGATIVE,
    "train_resources.workers": POSITIVE,
    "bootstrap.rounds": NON_NEGATIVE,
    "bootstrap.threshold_quantile": Range(0.0, 1.0, open_high=True),  # 0: run.filter.threshold as given
    "bootstrap.audit_holdout": Range(0.0, 1.0, open_high=True),  # 0: no audit
    "audit.target_keep_rate": Range(0.0, 1.0, open_low=True),
    "train.epochs": NON_NEGATIVE,
    "train.max_steps": NON_NEGATIVE,
    "train.batch_size": POSITIVE,
    "train.grad_accum": POSITIVE,
    "train.lr": Range(0.0),
    "train.min_lr": Range(0.0),
    "train.warmup_steps": NON_NEGATIVE,
    "train.weight_decay": Range(0.0),
    "train.alpha_rampup_epochs": NON_NEGATIVE,
    "train.crop_scale_min": Range(0.0, 1.0, open_low=True),
    "train.randaug_ops": NON_NEGATIVE,
    "train.randaug_magnitude": Range(0, 10),
    "train.max_words": POSITIVE,
    "train.max_text_len": Range(2),  # [CLS] and [SEP] at least
    "train.num_workers": NON_NEGATIVE,
    "train.log_every": POSITIVE,
    "train.ckpt_every": POSITIVE,
    "train.keep_ckpts": POSITIVE,
    "storage.attempts": POSITIVE,
    "storage.backoff_s": Range(0.0),
    "storage.max_backoff_s": Range(0.0),
    "storage.max_total_s": Range(0.0, open_low=True),
    "storage.request_attempts": POSITIVE,
    "storage.connect_timeout_s": Range(0.0, open_low=True),
    "storage.request_timeout_s": Range(0.0, open_low=True),
}
# (a, b): key a may not exceed key b.
AT_MOST: tuple[tuple[str, str], ...] = (("run.caption.min_length", "run.caption.max_length"),)
# A scorer's name names its columns (score_<name>); itm and itc name the BLIP filter's scores
# (run.filter.rank_synthetic_by), so no scorer may take them.
SCORER_NAME = re.compile(r"[a-z][a-z0-9_]*")
FILTER_SCORES = ("itm", "itc")


def _value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _values(cfg: Any, dotted: str, name: str = "") -> list[tuple[str, Any]]:
    """(key, value) of each field `dotted` names in `cfg`, a `name[]` part standing for every item
    of the list `name` (keys `name[0]`, `name[1]`, ...)."""
    head, _, rest = dotted.partition(".")
    if not head.endswith("[]"):
        value, key = getattr(cfg, head), name + head
        return _values(value, rest, key + ".") if rest else [(key, value)]
    items = [(f"{name}{head[:-2]}[{i}]", item) for i, item in enumerate(getattr(cfg, head[:-2]))]
    return [pair for key, item in items for pair in (_values(item, rest, key + ".") if rest else [(key, item)])]


def _check_scorers(run: Any) -> None:
    """run.scorers' names: each one a column name part, none taken twice or by the filter's scores."""
    seen: set[str] = set()
    for i, scorer in enumerate(run.scorers):
        key = f"run.scorers[{i}].name"
        if not SCORER_NAME.fullmatch(scorer.name):
            raise ConfigError(f"{key}: {scorer.name!r} must be lowercase letters, digits and _ (it names the "
                              "columns score_<name> and synthetic_score_<name>)")
        if scorer.name in seen or scorer.name in FILTER_SCORES:
            raise ConfigError(f"{key}: {scorer.name!r} is taken (itm and itc are the BLIP filter's scores; "
                              "names are unique)")
        seen.add(scorer.name)


def check(cfg: Any, section: str = "") -> Any:
    """`cfg` once every number in it is within its `RANGES` entry (and `AT_MOST` holds, and
    run.scorers' names are usable); else a ConfigError naming the key and its allowed range. `cfg`
    is the whole config, or the section that `section` names ("run", "demo"), for code that is
    handed a section built by hand.
    """
    prefix = section + "." if section else ""
    for dotted, allowed in RANGES.items():
        if dotted.startswith(prefix):
            for key, value in _values(cfg, dotted[len(prefix):], prefix):
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not allowed.allows(value):
                    raise ConfigError(f"{key} must be {allowed}, got {value!r}")
    for small, large in AT_MOST:
        if small.startswith(prefix) and large.startswith(prefix):
            low, high = _value(cfg, small[len(prefix):]), _value(cfg, large[len(prefix):])
            if low > high:
                raise ConfigError(f"{small} must be at most {large} ({high}), got {low}")
    if "run.".startswith(prefix):
        _check_scorers(_value(cfg, "run") if not section else cfg)
    return cfg


def model_batch_size(section: CaptionConfig | FilterConfig, on_gpu: bool) -> int:
    """Images per model call of the captioner or filter: its batch_size, or for 0 one that fills the device."""
    return section.batch_size or (256 if on_gpu else 64)


# ---------------------------------------------------------------------------------------------
# Loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting the few safe cases (int -> float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} fits none of {tp}")
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-5` (no dot) as a string
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known under {prefix or 'top level'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as YAML so `3`, `0.5`, `true` get types."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def parse_scorer(text: str) -> ScorerConfig:
    """`--scorer NAME=MODEL[,key=value...]` -> a ScorerConfig; the keys are ScorerConfig's other
    fields (kind, threshold, threshold_quantile), values read as YAML. ConfigError naming the flag."""
    where = f"--scorer {text!r}"
    name, sep, spec = text.partition("=")
    model, *options = spec.split(",")
    if not sep or not name.strip() or not model.strip():
        raise ConfigError(f"{where} is not of the form NAME=MODEL[,threshold=T][,kind=itm|itc]"
                          "[,threshold_quantile=Q]")
    fields: dict[str, Any] = {"name": name.strip(), "model": model.strip()}
    try:
        for option in options:
            key, value = parse_override(option)
            if key in fields:
                raise ConfigError(f"{key} is given twice")
            fields[key] = value
        return _build(ScorerConfig, fields)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = Config) -> Any:
    """Build `cls` from an optional YAML file and `key=value` overrides (later ones win)."""
    tree: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(cls, tree)
    return check(cfg) if cls is Config else cfg


def replace_key(cfg: Any, dotted: str, value: Any) -> Any:
    """cfg with the field at `dotted` (e.g. "run.caption.model") replaced, frozen dataclasses kept.

    For command-line flags typer has typed already (strings such as globs must not be re-read as YAML).
    """
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: replace_key(getattr(cfg, head), rest, value)})


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def write_resolved(cfg: Any, directory: Any, name: str = "config.yaml") -> Any:
    """Write the resolved config next to an output (a folder or URI), so every output says how it was made.

    Returns where it went: a Path for a local folder, the `Location` of an object-store one.
    """
    target = location(directory) / name
    target.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
    return Path(target.path) if target.local else target
