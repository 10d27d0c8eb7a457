"""`capfilt eval`: retrieval, captioning and filter quality of BLIP models, as BLIP evaluates them.

Retrieval (filter model, `M/filter/`), image->text and text->image on one split, one caption
per image:
1. ITC features for every image and every text (`capfilt.model.blip_ops`; the texts cleaned and
   cut as BLIP's retrieval evaluation does, to `run.filter.max_text_tokens` tokens), a faiss inner-product
   index (exact, `IndexFlatIP`) gives each query its top-k candidates by ITC cosine.
2. The k candidates are re-ranked by ITM: score = ITM P(match) + ITC cosine. BLIP's own
   evaluation adds the raw match logit to the cosine; P(match) is what the CapFilt filter
   thresholds, so the re-ranking scores the same number the filter uses. Candidates outside the
   top k are never ranked: a correct answer there counts as a miss (so recall@10 needs k >= 10).
Recall@1/5/10 is reported for the ITC ranking alone and for the ITM re-ranking. Images whose
captions are identical (after tokenisation) are interchangeable: a procedural world repeats
captions, and retrieving the other image of "a small red star on the left ..." is right.

Captioning (captioner model, `M/captioner/`): beam search (BLIP: beam 3, 5-20 tokens) from the
prompt "a picture of ", which is cut from the output before scoring BLEU-4 and CIDEr-D against
the split's caption (the reference).

On the demo world (`--truth` given) two more come from capfilt/demo_eval.py: the captions'
attribute accuracy, and with `--capfilt-out` the filter's quality against the truth file. Real
data has no truth file, so its evaluation never reports them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from capfilt import demo_eval, metrics, schema, workdir
from capfilt.config import CaptionConfig, ColumnsConfig, Config
from capfilt.embed import Blip, load_captioner, load_filter
from capfilt.images import ImageError, decode_image
from capfilt.model import blip_ops
from capfilt.model_folders import check_model_folder
from capfilt.storage import parquet_files

# ---------------------------------------------------------------------------------------------
# Reading the split


@dataclass
class Split:
    """The rows of an evaluation split that have an image, in key order."""

    keys: list[str]
    captions: list[str]
    images: list[bytes]
    read: int = 0  # rows in the files
    skipped: Counter = field(default_factory=Counter)  # reason -> rows left out


def read_split(data_dir: str | Path, columns: ColumnsConfig, max_rows: int = 0) -> Split:
    """Rows of all shards under `data_dir`, sorted by key; failed downloads are counted, not read."""
    wanted = {"key": columns.key, "text": columns.text, "image": columns.image}
    tables = []
    for path in parquet_files(data_dir):  # a local folder or a URI
        file_schema = path.read_schema()
        schema.require_columns(file_schema, wanted, str(path))
        cols = list(wanted.values()) + ([columns.status] if columns.status in file_schema.names else [])
        tables.append(path.read_table(columns=cols))
    table = pa.concat_tables(tables, promote_options="permissive")
    split = Split([], [], [], read=table.num_rows)
    records = sorted(table.to_pylist(), key=lambda r: r[columns.key])
    for rec in records:
        if rec.get(columns.status, schema.STATUS_SUCCESS) != schema.STATUS_SUCCESS:
            split.skipped["download"] += 1
        elif rec[columns.image] is None:
            split.skipped["no image"] += 1
        elif not rec[columns.text]:
            split.skipped["no caption"] += 1
        elif max_rows and len(split.keys) >= max_rows:
            split.skipped["beyond eval.max_rows"] += 1
        else:
            split.keys.append(rec[columns.key])
            split.captions.append(rec[columns.text])
            split.images.append(rec[columns.image])
    return split


# ---------------------------------------------------------------------------------------------
# Retrieval


def itc_candidates(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosines [Q, k], corpus ids [Q, k]) of each query's k nearest corpus rows, best first."""
    import faiss

    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus, dtype=np.float32))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, corpus.shape[0]))
    return scores, ids


def rerank(ids: np.ndarray, itc: np.ndarray, pair_score: Callable[[np.ndarray, np.ndarray], np.ndarray]
           ) -> np.ndarray:
    """Candidates [Q, k] re-ordered by pair_score(query ids [P], candidate ids [P]) + ITC cosine."""
    queries = np.repeat(np.arange(ids.shape[0]), ids.shape[1])  # [Q*k]
    scores = pair_score(queries, ids.reshape(-1)).reshape(ids.shape) + itc  # [Q, k]
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1)


def caption_groups(captions: Sequence[str]) -> list[set[int]]:
    """For each row, the rows (itself included) whose caption tokenises identically."""
    by_text: dict[tuple, set[int]] = {}
    for i, text in enumerate(captions):
        by_text.setdefault(tuple(metrics.tokenize(text)), set()).add(i)
    return [by_text[tuple(metrics.tokenize(text))] for text in captions]


def retrieval_scores(image_feats: np.ndarray, text_feats: np.ndarray, positives: list[set[int]], k: int,
                     itm: Callable[[np.ndarray, np.ndarray], np.ndarray] | None) -> dict[str, Any]:
    """Recall@1/5/10 both ways for ITC alone and, given `itm(image ids, text ids)`, ITM re-ranked.

    Row i of `image_feats` and of `text_feats` belong together; `positives[i]` are the ids that
    count as right for query i (in either direction, as captions pair images one to one).
    """
    n = image_feats.shape[0]
    k_itc = min(n, max(k, 10))
    out: dict[str, Any] = {"n": n, "k": min(k, n)}
    i2t_itc, i2t_ids = itc_candidates(image_feats, text_feats, k_itc)
    t2i_itc, t2i_ids = itc_candidates(text_feats, image_feats, k_itc)
    out["itc"] = _both_ways(metrics.first_hit_ranks(i2t_ids, positives),
                            metrics.first_hit_ranks(t2i_ids, positives))
    if itm is not None:
        kk = min(k, n)
        i2t = rerank(i2t_ids[:, :kk], i2t_itc[:, :kk], lambda q, c: itm(q, c))
        t2i = rerank(t2i_ids[:, :kk], t2i_itc[:, :kk], lambda q, c: itm(c, q))
        out["itm"] = _both_ways(metrics.first_hit_ranks(i2t, positives), metrics.first_hit_ranks(t2i, positives))
    return out


def _both_ways(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> dict[str, float]:
    i2t = {f"i2t_{name}": v for name, v in metrics.recall_at_k(i2t_ranks).items()}
    t2i = {f"t2i_{name}": v for name, v in metrics.recall_at_k(t2i_ranks).items()}
    mean = float(np.mean(list(i2t.values()) + list(t2i.values())))
    return i2t | t2i | {"mean_recall": mean}


# ---------------------------------------------------------------------------------------------
# Captioning


@torch.no_grad()
def generate_captions(blip: Blip, images: list, caption: CaptionConfig, num_beams: int) -> list[str]:
    """Beam-search (or greedy with num_beams 1) captions with CapFilt's prompt and lengths, the prompt cut off."""
    prompt = blip.tokenizer(caption.prompt, return_tensors="pt")["input_ids"].to(blip.device)  # [1, P+2]
    prompt_len = prompt.shape[1] - 1  # generate swaps [CLS] for [DEC] and drops the final [SEP]
    ids = blip.model.generate(pixel_values=blip.pixels(images), input_ids=prompt.repeat(len(images), 1),
                              num_beams=num_beams, max_new_tokens=caption.max_length,
                              min_new_tokens=caption.min_length, do_sample=False)  # [B, P+1+new]
    return [t.strip() for t in blip.tokenizer.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)]


def caption_scores(generated: Sequence[str], references: Sequence[str],
                   parse: demo_eval.Parse | None) -> dict[str, Any]:
    refs = [[r] for r in references]
    bleu = metrics.bleu(generated, refs)
    out: dict[str, Any] = {f"bleu_{n + 1}": b for n, b in enumerate(bleu)}
    out["cider_d"], per_image = metrics.cider_d(generated, refs)
    # the standard error of that per-image mean: the test split is small (docs/results.md)
    out["cider_d_se"] = float(np.std(per_image, ddof=1) / np.sqrt(len(per_image))) if len(per_image) > 1 else None
    if parse is not None:
        out["attributes"] = demo_eval.attribute_scores(generated, references, parse)
    return out


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def _model_dirs(model_dir: Path) -> tuple[Path | None, Path | None]:
    """(captioner dir, filter dir) under `model_dir`; a bare BLIP directory counts by its class."""
    captioner, filt = model_dir / workdir.CAPTIONER, model_dir / workdir.FILTER
    found = (captioner if (captioner / "config.json").is_file() else None,
             filt if (filt / "config.json").is_file() else None)
    if found == (None, None) and (model_dir / "config.json").is_file():
        archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
        if "BlipForConditionalGeneration" in archs:
            return model_dir, None
        if "BlipForImageTextRetrieval" in archs:
            return None, model_dir
    if found == (None, None):
        raise FileNotFoundError(f"{model_dir}: has neither captioner/ nor filter/ with a config.json")
    return found


def evaluate_models(model_dir: str | Path, data_dir: str | Path, cfg: Config,
                    parse: demo_eval.Parse | None = None) -> dict[str, Any]:
    """Retrieval (when there is a filter) and captioning (when there is a captioner) on a split."""
    ecfg = cfg.eval
    device, dtype = blip_ops.pick_device(dtype="float32", device=cfg.device)  # models measured in fp32
    captioner_dir, filter_dir = _model_dirs(Path(model_dir))
    for folder, role in ((captioner_dir, "captioner"), (filter_dir, "filter")):
        if folder:
            check_model_folder(folder, role, "--model")
    split = read_split(data_dir, cfg.run.columns, ecfg.max_rows)
    filt = load_filter(filter_dir, device, dtype) if filter_dir else None
    captioner = load_captioner(captioner_dir, device, dtype) if captioner_dir else None

    ok: list[int] = []  # rows whose image decoded
    embeds, feats, generated = [], [], []
    for start in range(0, len(split.keys), ecfg.batch_size):
        images, rows = [], []
        for i in range(start, min(start + ecfg.batch_size, len(split.keys))):
            try:
                images.append(decode_image(split.images[i], cfg.run.image))
                rows.append(i)
            except ImageError as exc:
                split.skipped[f"decode: {exc}"] += 1
        if not images:
            continue
        ok += rows
        if filt is not None:
            e, f = filt.image_features(images)
            embeds.append(e)
            feats.append(f)
        if captioner is not None:
            generated += generate_captions(captioner, images, cfg.run.caption, ecfg.num_beams)
    keys = [split.keys[i] for i in ok]
    captions = [split.captions[i] for i in ok]
    results: dict[str, Any] = {
        "model": str(model_dir), "data": str(data_dir),
        "rows": {"read": split.read, "evaluated": len(ok), "skipped": dict(split.skipped)},
    }
    if not ok:
        raise ValueError(f"{data_dir}: no row has a usable image and caption ({dict(split.skipped)})")
    if filt is not None:
        image_embeds = torch.cat(embeds)  # [N, L, D]
        # [N, T], cleaned as BLIP's retrieval evaluation
        ids, mask = filt.tokenize(captions, cfg.run.filter.max_text_tokens)
        buckets = cfg.run.filter.bucket_tokens  # as the filter stage groups texts
        text_feats = torch.cat([blip_ops.text_features(filt.towers, ids[s:s + ecfg.batch_size],
                                                       mask[s:s + ecfg.batch_size], buckets)
                                for s in range(0, len(captions), ecfg.batch_size)])

        def itm(image_ids: np.ndarray, text_ids: np.ndarray) -> np.ndarray:
            out = []
            for s in range(0, len(image_ids), ecfg.itm_batch_size):
                im = image_ids[s:s + ecfg.itm_batch_size].tolist()  # host ints: the text pass groups by image
                tx = torch.as_tensor(text_ids[s:s + ecfg.itm_batch_size], device=device)
                out.append(blip_ops.itm_match(filt.towers, image_embeds, im, ids[tx], mask[tx],
                                              filt.enc_token_id, buckets).cpu())
            return torch.cat(out).numpy()

        results["retrieval"] = retrieval_scores(torch.cat(feats).float().cpu().numpy(),
                                                text_feats.float().cpu().numpy(), caption_groups(captions),
                                                ecfg.k, itm)
    if captioner is not None:
        results["captioning"] = caption_scores(generated, captions, parse)
        results["captioning"]["examples"] = [
            {"key": k, "reference": r, "generated": g}
            for k, r, g in list(zip(keys, captions, generated))[:ecfg.examples]]
    return results


def evaluate(cfg: Config, model_dir: str | Path | None = None, data_dir: str | Path | None = None,
             truth: str | Path | None = None, capfilt_out: str | Path | None = None) -> dict[str, Any]:
    """Everything the arguments allow: models on a split, and/or a CapFilt run against the truth;
    `truth` (the demo world's truth file) adds the demo world's attribute accuracy."""
    if (model_dir is None) != (data_dir is None):
        raise ValueError("--model and --data go together (models are evaluated on a data split)")
    if capfilt_out is not None and truth is None:
        raise ValueError("--capfilt-out needs --truth (filter quality is measured against the demo world's truth)")
    if model_dir is None and capfilt_out is None:
        raise ValueError("nothing to evaluate: give --model and --data, and/or --truth and --capfilt-out")
    parse = None
    if truth is not None:
        if not Path(truth).is_file():
            raise FileNotFoundError(f"--truth {truth}: no such file")
        parse = demo_eval.parse_caption
    results: dict[str, Any] = {}
    if model_dir is not None:
        results |= evaluate_models(model_dir, data_dir, cfg, parse)
    if capfilt_out is not None:
        results["filter"] = demo_eval.filter_quality(capfilt_out, truth, cfg.run.columns.key)
    return results


def format_table(results: dict[str, Any]) -> str:
    """The numbers of `results` as aligned `section  metric  value` lines."""
    lines = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                walk(f"{prefix}.{name}" if prefix else name, value)
        elif isinstance(node, bool) or not isinstance(node, (int, float)) or node is None:
            return
        else:
            lines.append((prefix, f"{node:.4f}" if isinstance(node, float) else str(node)))

    walk("", {k: v for k, v in results.items() if k not in ("model", "data")})
    width = max((len(name) for name, _ in lines), default=0)
    return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in lines)
