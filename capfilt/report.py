"""`capfilt report`: one static, self-contained HTML page about a CapFilt run or a bootstrap.

Input is either a CapFilt run dir (stats.json, data/, rejected/, failed/) or a bootstrap workdir
whose rounds are `DIR/round-*/capfilt/` run dirs, `DIR/round-*/eval.json` results of
`capfilt eval` and `DIR/round-*/audit.json` results of `capfilt audit` (a run dir's own
`eval.json` and `audit.json` count too). Whatever of these exists is rendered; what is missing
is said, not fatal.

The page: per-round counts and keep rates, histograms of the filter's score (ITM P(match), or
the scorer a run without a BLIP filter decided by) for web and synthetic captions with the
threshold drawn in, evaluation metrics across rounds, the filter audit (held-out
human pairs with their own and with shuffled captions: histograms, keep rate vs threshold, the
label-free estimates, each named scorer's figures, the captioner's warning), and a gallery of
example images with their web and synthetic captions, kept (green) or removed (red, struck
through), as in the CapFilt figure of the BLIP paper.

Everything is inline: CSS in a <style> element, images as data: URIs (re-encoded thumbnails of
bounded decodes, never the raw bytes), charts as SVG. There is no script, and a Content Security
Policy forbids any, as well as any request outside the page: captions are untrusted web text
and every one goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from capfilt import schema, workdir
from capfilt.compare import compare, round_figures, with_se
from capfilt.config import ColumnsConfig, ConfigError, ImageConfig, RunConfig, load_config
from capfilt.images import ImageError, decode_image
from capfilt.storage import location

THUMB = 128  # gallery thumbnail side, in pixels
BINS = 20  # histogram bins over the score's range
HEADLINE = {  # metrics charted across rounds: flattened eval.json name -> label
    "retrieval.itm.mean_recall": "retrieval mean recall (ITM)",
    "retrieval.itc.mean_recall": "retrieval mean recall (ITC)",
    "captioning.bleu_4": "caption BLEU-4",
    "captioning.cider_d": "caption CIDEr-D",
    "captioning.attributes.recall": "caption attribute accuracy",
    "filter.roc_auc": "filter ROC-AUC",
    "filter.precision": "filter precision",
    "filter.recall": "filter recall",
}
WEB_COLOUR, SYNTH_COLOUR, THRESHOLD_COLOUR = "#3b6fb6", "#e08a1e", "#cf222e"

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #1f2328;
       padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px;
  margin-top: 36px; } h3 { margin: 18px 0 6px; }
.muted { color: #656d76; } .note { color: #9a6700; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f6f8fa; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: 12px; }
.card { border: 1px solid #d0d7de; border-radius: 6px; padding: 8px; display: flex; gap: 10px; }
.card img { width: 96px; height: 96px; image-rendering: pixelated; border-radius: 4px; flex: none; }
.card .texts { font-size: 12.5px; overflow-wrap: anywhere; }
.card .key { color: #656d76; font-size: 11px; }
.kept { color: #1a7f37; } .removed { color: #cf222e; text-decoration: line-through; }
.tag { font-size: 10.5px; color: #656d76; text-decoration: none; display: inline-block; margin-right: 4px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.warning { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 6px 10px;
  font-weight: 600; }
svg text { font: 11px system-ui, sans-serif; fill: #1f2328; }
"""


# ---------------------------------------------------------------------------------------------
# What is on disk


@dataclass
class Round:
    name: str
    run_dir: Path | None  # CapFilt output, or None when the round has none
    eval_path: Path | None  # eval.json, or None
    audit_path: Path | None = None  # audit.json, or None
    notes: list[str] = field(default_factory=list)  # what could not be read, shown on the page


def find_rounds(directory: Path) -> list[Round]:
    """A run dir is one round; a bootstrap workdir has `round-*` dirs, in numeric order."""
    def is_run(d: Path) -> bool:
        return (d / "stats.json").is_file() or any((d / sub).is_dir() for sub in schema.OUTPUT_DIRS)

    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if is_run(directory):
        return [Round(directory.name, directory, _if_file(directory / workdir.EVAL),
                      _if_file(directory / workdir.AUDIT))]
    rounds = []
    for d in workdir.round_dirs(directory):
        run = d / workdir.CAPFILT
        rounds.append(Round(d.name, run if is_run(run) else None, _if_file(d / workdir.EVAL),
                            _if_file(d / workdir.AUDIT)))
    if not rounds:
        raise FileNotFoundError(f"{directory}: neither a CapFilt run dir (stats.json, data/, rejected/) "
                                f"nor a bootstrap workdir (round-*/)")
    return rounds


def _if_file(path: Path) -> Path | None:
    return path if path.is_file() else None


def _read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} unreadable: {exc}")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object")
        return None
    return data


@dataclass(frozen=True)
class FilterScore:
    """The score a run's filter decided by, as the page plots it and shows it beside each caption."""

    web: str  # column of the web caption's score
    synthetic: str  # column of the synthetic captions' scores
    label: str  # e.g. "ITM P(match)"
    threshold: float | None  # from the run's config (ITM's also from its threshold column)


ITM = FilterScore(*schema.score_columns("itm"), "ITM P(match)", None)


def filter_score(run: RunConfig) -> FilterScore:
    """BLIP's ITM; a run without a BLIP filter (a CLIP/SigLIP --filter, or run.scorers alone)
    decided by its first scorer with a threshold, whose columns the page shows instead."""
    if run.filter.model or not run.scorers:
        return FilterScore(ITM.web, ITM.synthetic, ITM.label, run.filter.threshold)
    scorer = next((s for s in run.scorers if s.threshold is not None), run.scorers[0])
    return FilterScore(*schema.score_columns(scorer.name), f"{scorer.name} score ({Path(scorer.model).name})",
                       scorer.threshold)


def _run_config(run_dir: Path, notes: list[str]) -> tuple[ColumnsConfig, ImageConfig, FilterScore]:
    """Column names, image bounds and filter score of the run (its config.yaml), defaults otherwise."""
    path = run_dir / "config.yaml"
    if path.is_file():
        try:
            cfg = load_config(path)
            return cfg.run.columns, cfg.run.image, filter_score(cfg.run)
        except (ConfigError, ValueError, TypeError) as exc:
            notes.append(f"config.yaml not loadable ({exc}); default column names used")
    return ColumnsConfig(), ImageConfig(), ITM


def _files(run_dir: Path, sub: str) -> list[Path]:
    return sorted((run_dir / sub).glob("*.parquet")) if (run_dir / sub).is_dir() else []


def _counts(run_dir: Path, stats: dict | None) -> dict[str, int]:
    """read/kept/rejected/failed from stats.json, else counted from the parquet footers."""
    counts = {}
    for name, sub in (("kept", schema.DATA), ("rejected", schema.REJECTED), ("failed", schema.FAILED)):
        value = (stats or {}).get(name)
        counts[name] = int(value) if isinstance(value, (int, float)) else sum(
            pq.ParquetFile(p).metadata.num_rows for p in _files(run_dir, sub))
    read = (stats or {}).get("read")
    counts["read"] = int(read) if isinstance(read, (int, float)) else sum(counts.values())
    for name in ("web_kept", "synthetic_generated", "synthetic_kept"):
        if isinstance((stats or {}).get(name), (int, float)):
            counts[name] = int(stats[name])
    return counts


def run_scores(run_dir: Path, web_column: str = schema.CAPTION_ITM,
               synthetic_column: str = schema.SYNTHETIC_ITM) -> tuple[np.ndarray, np.ndarray, float | None]:
    """ITM P(match) (or the score of the columns named) of the web captions and of the synthetic
    captions scored, and the ITM threshold."""
    web, synth, threshold = [], [], None
    for path in _files(run_dir, schema.DATA) + _files(run_dir, schema.REJECTED):
        names = set(pq.read_schema(path).names)
        cols = [c for c in (web_column, synthetic_column, schema.THRESHOLD) if c in names]
        table = pq.read_table(path, columns=cols)
        if web_column in names:
            web.append(table[web_column].drop_null().to_numpy())
        if synthetic_column in names:
            synth.append(table[synthetic_column].combine_chunks().flatten().drop_null().to_numpy())
        if threshold is None and schema.THRESHOLD in names and table[schema.THRESHOLD].null_count < len(table):
            threshold = float(table[schema.THRESHOLD].drop_null()[0].as_py())
    cat = lambda parts: np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)  # noqa: E731
    return cat(web), cat(synth), threshold


def _gallery_rows(run_dir: Path, columns: ColumnsConfig, score: FilterScore, examples: int) -> list[dict]:
    """Up to `examples` rows, half from rejected/ and the rest from data/, in key order."""
    wanted = [columns.key, columns.text, columns.image, score.web, schema.CAPTION_KEEP,
              schema.SYNTHETIC, score.synthetic, schema.SYNTHETIC_KEEP]
    picked: list[dict] = []
    for sub, quota in ((schema.REJECTED, examples // 2), (schema.DATA, examples)):
        for path in _files(run_dir, sub):
            room = min(quota, examples - len(picked))
            if room <= 0:
                break
            names = set(pq.read_schema(path).names)
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=room, columns=[c for c in wanted if c in names]),
                         None)
            rows = batch.to_pylist() if batch is not None else []
            picked += rows
            quota -= len(rows)
    return sorted(picked, key=lambda r: str(r.get(columns.key)))


# ---------------------------------------------------------------------------------------------
# HTML pieces


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "–" if value is None else esc(value)


def thumbnail(data: bytes | None, cfg: ImageConfig) -> str | None:
    """A PNG data: URI of a bounded decode, at most THUMB pixels a side; None when undecodable."""
    try:
        image = decode_image(data, cfg)
    except ImageError:
        return None
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def svg_histogram(first: np.ndarray, second: np.ndarray, threshold: float | None, width: int = 540,
                  height: int = 230, labels: tuple[str, str] = ("web", "synthetic"), axis: str = "ITM P(match)") -> str:
    """Side-by-side bars of two samples of a score (`axis`: ITM P(match)) counted in 20 bins over
    [0, 1], or [-1, 1] when a score is negative (a cosine: CLIP, ITC), threshold dashed."""
    left, right, top, bottom = 44, 12, 40, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    low = -1.0 if any(v.size and float(v.min()) < 0 for v in (first, second)) else 0.0
    edges = np.linspace(low, 1.0, BINS + 1)
    series = [(np.histogram(np.clip(v, low, 1), edges)[0], c, label)
              for v, c, label in zip((first, second), (WEB_COLOUR, SYNTH_COLOUR), labels)]
    peak = max(1, *(int(h.max()) if h.size else 0 for h, _, _ in series))
    bar = plot_w / BINS / 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(axis)} histogram">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafbfc" stroke="#d0d7de"/>']
    for s, (counts, colour, label) in enumerate(series):
        for i, count in enumerate(counts):
            h = plot_h * count / peak
            x = left + i * plot_w / BINS + s * bar
            parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar - 0.5:.1f}" height="{h:.1f}" '
                         f'fill="{colour}"><title>{esc(label)} {edges[i]:.2f}-{edges[i + 1]:.2f}: {count}'
                         '</title></rect>')
    span = 1.0 - low
    for tick in np.linspace(low, 1, 6):
        x = left + (tick - low) / span * plot_w
        parts.append(f'<text x="{x:.1f}" y="{height - bottom + 14}" text-anchor="middle">{tick:.1f}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">{esc(axis)}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak}</text>'
                 f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>')
    if threshold is not None:
        parts.append(_threshold_line(left + (min(max(threshold, low), 1.0) - low) / span * plot_w, top, plot_h,
                                     threshold))
    x = left
    for counts, colour, label in series:
        parts.append(f'<rect x="{x}" y="6" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="15">{esc(label)} ({int(counts.sum())})</text>')
        x += 40 + 7 * len(label)
    parts.append("</svg>")
    return "".join(parts)


def _threshold_line(x: float, top: float, plot_h: float, threshold: float) -> str:
    return (f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{top + plot_h}" stroke="{THRESHOLD_COLOUR}" '
            f'stroke-width="2" stroke-dasharray="5 3"/>'
            f'<text x="{x:.1f}" y="{top - 8}" text-anchor="middle" fill="{THRESHOLD_COLOUR}">'
            f'threshold {threshold:.2f}</text>')


def svg_curves(xs: list[float], series: list[tuple[str, list[float | None], str]], title: str,
               x_ticks: list[tuple[float, str]], threshold: float | None = None, dots: bool = False,
               width: int = 270, height: int = 150) -> str:
    """Lines of (label, y values, colour) over the numbers `xs`, with a legend when there are several,
    tick labels at `x_ticks` and a dashed threshold line at x = `threshold`."""
    legend = 16 * len(series) if len(series) > 1 else 0
    left, right, top, bottom = 40, 28, 22 + (14 if threshold is not None else 0), 26 + legend
    plot_w, plot_h = width - left - right, height - top - bottom
    known = [v for _, values, _ in series for v in values if v is not None]
    # Zero-based axes; rates share the [0, 1] scale so rounds and metrics compare by eye.
    lo = min(0.0, *known)
    hi = 1.0 if max(known) <= 1.0 else max(known) * 1.1
    x_lo, x_hi = min(xs), max(xs)

    def at_x(x: float) -> float:
        return left + plot_w * ((x - x_lo) / (x_hi - x_lo) if x_hi > x_lo else 0.5)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}">',
             f'<text x="{left}" y="14" font-weight="bold">{esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafbfc" stroke="#d0d7de"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{hi:.2f}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{lo:.2f}</text>']
    for _label, values, colour in series:
        pts = [(at_x(x), top + plot_h * (1 - (v - lo) / (hi - lo)), v) for x, v in zip(xs, values) if v is not None]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if dots:
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"><title>{v:.4f}</title></circle>'
                      for x, y, v in pts]
    for x, label in x_ticks:
        parts.append(f'<text x="{at_x(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{esc(label)}</text>')
    if threshold is not None:
        parts.append(_threshold_line(at_x(threshold), top, plot_h, threshold))
    if legend:
        for i, (label, _, colour) in enumerate(series):
            y = height - legend + 16 * i + 4
            parts.append(f'<rect x="{left}" y="{y}" width="10" height="10" fill="{colour}"/>'
                         f'<text x="{left + 14}" y="{y + 9}">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_line(values: list[float | None], labels: list[str], title: str, width: int = 270, height: int = 150) -> str:
    """One metric across rounds: a line through the rounds that have it."""
    return svg_curves(list(range(len(values))), [(title, values, WEB_COLOUR)], title, list(enumerate(labels)),
                      dots=True, width=width, height=height)


def flatten(node: Any, prefix: str = "") -> dict[str, float]:
    """Rates and scores of a nested eval.json as {"a.b.c": value}. Only float leaves: counts are
    integers in eval.json and stay there; lists (caption examples) are skipped."""
    out: dict[str, float] = {}
    if isinstance(node, dict):
        for name, value in node.items():
            out |= flatten(value, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(node, float):
        out[prefix] = node
    return out


def _caption_line(text: Any, keep: Any, score: Any, tag: str) -> str:
    state = "kept" if keep else "removed"
    score_txt = f" ({score:.2f})" if isinstance(score, (int, float)) else ""
    return (f'<div><span class="tag">{tag}{score_txt}</span>'
            f'<span class="{state}" title="{state}">{esc(text)}</span></div>')


def _card(row: dict, columns: ColumnsConfig, image_cfg: ImageConfig, score: FilterScore) -> str:
    uri = thumbnail(row.get(columns.image), image_cfg)
    image = (f'<img src="{uri}" alt="image {esc(row.get(columns.key))}">' if uri
             else '<div class="muted" style="width:96px">image not decodable</div>')
    lines = [_caption_line(row.get(columns.text, ""), row.get(schema.CAPTION_KEEP), row.get(score.web), "web")]
    synth = row.get(schema.SYNTHETIC) or []
    scores = row.get(score.synthetic) or [None] * len(synth)
    keeps = row.get(schema.SYNTHETIC_KEEP) or [False] * len(synth)
    lines += [_caption_line(t, k, s, "synthetic") for t, k, s in zip(synth, keeps, scores)]
    return (f'<div class="card">{image}<div class="texts"><div class="key">{esc(row.get(columns.key))}</div>'
            f'{"".join(lines)}</div></div>')


# ---------------------------------------------------------------------------------------------
# The page


def _round_section(rnd: Round, examples: int) -> tuple[str, dict | None, dict | None]:
    """One round's HTML (histogram, failures, gallery, audit, notes), its counts and its eval.json."""
    section = [f"<h2>{esc(rnd.name)}</h2>"]
    counts = data = None
    if rnd.run_dir is None:
        section.append('<p class="note">no CapFilt output in this round</p>')
    else:
        stats_path = rnd.run_dir / "stats.json"
        stats = _read_json(stats_path, rnd.notes) if stats_path.is_file() else None
        if stats is None and not rnd.notes:
            rnd.notes.append("no stats.json; counts read from the parquet files")
        columns, image_cfg, score = _run_config(rnd.run_dir, rnd.notes)
        counts = _counts(rnd.run_dir, stats)
        web, synth, threshold = run_scores(rnd.run_dir, score.web, score.synthetic)
        if threshold is None or score.web != schema.CAPTION_ITM:  # the threshold column is ITM's
            threshold = score.threshold
        section.append(f"<h3>{esc(score.label)} of the captions scored</h3>")
        section.append(svg_histogram(web, synth, threshold, axis=score.label))
        reasons = (stats or {}).get("failed_by_reason")
        if isinstance(reasons, dict) and reasons:
            section.append("<h3>Failed rows by reason</h3><table><tr><th>reason</th><th>rows</th></tr>" + "".join(
                f"<tr><td>{esc(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in reasons.items()) + "</table>")
        gallery = _gallery_rows(rnd.run_dir, columns, score, examples)
        if gallery:
            section.append('<h3>Examples <span class="muted">(<span class="kept">kept</span>, '
                           f'<span class="removed">removed</span>; {esc(score.label)} in parentheses)</span></h3>')
            section.append('<div class="gallery">' + "".join(_card(r, columns, image_cfg, score) for r in gallery)
                           + "</div>")
    if rnd.audit_path is not None:
        audit = _read_json(rnd.audit_path, rnd.notes)
        if audit is not None:
            try:
                section.append(audit_section(audit))
            except (KeyError, TypeError, ValueError) as exc:
                rnd.notes.append(f"audit.json not in the form capfilt audit writes ({exc!r})")
    if rnd.eval_path is not None:
        data = _read_json(rnd.eval_path, rnd.notes) or {}
        captioner = data.get("captioner")  # the bootstrap's record of the round's captioner
        if isinstance(captioner, dict) and captioner.get("fine_tuned") is False:
            section.append(f'<p class="note">Synthetic captions by the external captioner '
                           f'{esc(str(captioner.get("model")))}, used as it is (not fine-tuned)</p>')
    section += [f'<p class="note">{esc(n)}</p>' for n in rnd.notes]
    return "".join(section), counts, data


def _counts_table(count_rows: list[tuple[str, dict]]) -> str:
    head = ["round", "read", "kept", "rejected", "failed", "keep rate", "web kept", "synthetic kept"]
    rows = []
    for name, c in count_rows:
        rate = c["kept"] / c["read"] if c["read"] else None
        synth = (f'{_fmt(c["synthetic_kept"])} / {_fmt(c["synthetic_generated"])}'
                 if "synthetic_kept" in c and "synthetic_generated" in c else "–")
        rows.append([esc(name), _fmt(c["read"]), _fmt(c["kept"]), _fmt(c["rejected"]), _fmt(c["failed"]),
                     _fmt(rate), _fmt(c.get("web_kept")), synth])
    return "<h2>Counts per round</h2>" + _table(head, rows)


def _noise_table(results: list[tuple[str, dict]]) -> str:
    """The test figures of each round ± their standard errors, and each later round's difference
    from the first with its noise verdict (capfilt/compare.py)."""
    names = list(dict.fromkeys(k for _, res in results for k in round_figures(res)))
    if not names:
        return ""
    rows = [[esc(name)] + [esc(with_se(*round_figures(res).get(name, (None, None)))) for _, res in results]
            for name in names]
    out = _table(["figure (± SE)"] + [n for n, _ in results], rows)
    first_name, first = results[0]
    for name, res in results[1:]:
        diffs = [[esc(row["figure"]),
                  esc(f'{row["difference"]:+.3f}' + (f' ± {row["se"]:.3f}' if row["se"] is not None else "")),
                  "–" if row["noise"] is None else "within noise" if row["noise"] else
                  "gain" if row["difference"] > 0 else "loss"] for row in compare(res, first)]
        out += (f"<h3>{esc(name)} vs {esc(first_name)}</h3>"
                + _table(["figure", "difference (± SE)", "verdict (within noise: |difference| < 2 SE)"], diffs))
    return out


def _evaluation_section(evals: list[tuple[str, dict]], results: list[tuple[str, dict]]) -> str:
    """The test figures with their standard errors, the headline metrics charted across rounds,
    then every metric in a table."""
    out = ["<h2>Evaluation across rounds</h2>", _noise_table(results)]
    labels = [name for name, _ in evals]
    charts = [svg_line([m.get(key) for _, m in evals], labels, title)
              for key, title in HEADLINE.items() if any(key in m for _, m in evals)]
    if charts:
        out.append('<div class="charts">' + "".join(charts) + "</div>")
    natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]  # noqa: E731
    names = sorted({k for _, m in evals for k in m}, key=natural)  # r1, r5, r10 in that order
    out.append(_table(["metric"] + labels, [[esc(k)] + [_fmt(m.get(k)) for _, m in evals] for k in names]))
    return "".join(out)


def render(directory: str | Path, examples: int = 12) -> str:
    """The report of `directory` as one HTML string."""
    directory = Path(directory)
    rounds = find_rounds(directory)
    count_rows, evals, results, round_sections = [], [], [], []
    for rnd in rounds:
        section, counts, data = _round_section(rnd, examples)
        round_sections.append(section)
        if counts is not None:
            count_rows.append((rnd.name, counts))
        if data is not None:
            evals.append((rnd.name, flatten(data)))
            results.append((rnd.name, data))
    body = ([_counts_table(count_rows)] if count_rows else [])
    body += [_evaluation_section(evals, results)] if evals else []
    body += round_sections
    title = f"CapFilt report: {directory.resolve().name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(directory.resolve())} · {len(rounds)} "
            f"round{'s' if len(rounds) != 1 else ''}</p>" + "".join(body) + "</body></html>\n")


AUDIT_ROWS = [  # (label, key in an `estimates_at` dict)
    ("clean keep rate (human pairs, own caption)", "clean_keep_rate"),
    ("mismatch keep rate (human pairs, shuffled caption)", "mismatch_keep_rate"),
    ("est. removal recall (share of noise removed)", "recall"),
    ("est. removal precision (share of removed that is noise)", "precision"),
    ("web captions removed: observed", "web_removed_observed"),
    ("web captions removed: the mixture's estimate", "web_removed_predicted"),
]


def audit_section(audit: dict) -> str:
    """A round's filter audit (`capfilt audit`'s JSON): warnings, estimates, histograms, keep-rate
    curves, each named scorer's figures, the captioner's."""
    at, target = audit["at_threshold"], audit["at_target"]
    share = audit.get("noise_share") or {}
    # the filter's score: BLIP's ITM, or a CLIP or SigLIP --filter's (audit.json before it said so: ITM)
    itm = audit.get("filter_score", schema.CAPTION_ITM) == schema.CAPTION_ITM
    score = "ITM P(match)" if itm else f"filter score ({audit['filter_score']})"
    parts = ['<h3>Filter audit <span class="muted">(held-out human pairs with their own and with shuffled '
             f'captions; label-free estimates{"" if itm else "; by " + esc(score)})</span></h3>']
    parts += [f'<p class="warning">WARNING: {esc(w)}</p>' for w in audit.get("warnings", [])]
    parts += [f'<p class="note">{esc(figure)}: not applicable: {esc(why)}</p>'
              for figure, why in (audit.get("not_applicable") or {}).items()]
    decision, policy = audit.get("synthetic_decision"), audit.get("keep_policy") or {}
    if decision:
        applied = (f"run.filter.keep=auto → {policy.get('run')}" if policy.get("configured") == "auto"
                   else f"not applied: run.filter.keep={policy.get('configured', 'not recorded')}")
        parts.append(f'<p class="note"><b>Synthetic captions ({esc(applied)})</b>: {esc(decision["reason"])}. '
                     f'Rule: {esc(decision["rule"])} (capfilt/audit.py).</p>')
    rows = [["threshold", _fmt(at["threshold"]), _fmt(target["threshold"])]]
    rows += [[esc(label), _fmt(at.get(key)), _fmt(target.get(key))] for label, key in AUDIT_ROWS]
    parts.append(_table(["", "at the run's threshold",
                         f"at the threshold keeping {audit['target_keep_rate']:.0%} of clean pairs"], rows))
    pairs = audit.get("pairs", {})
    parts.append(f'<p class="muted">ROC-AUC clean vs shuffled {_fmt(audit.get("roc_auc"))} on '
                 f'{_fmt(pairs.get("clean"))} pairs; est. noise share of the web captions '
                 f'{_fmt(share.get("estimate"))} (unclipped {_fmt(share.get("unclipped"))}, from the means of '
                 f'{_fmt(share.get("web_scored"))} web scores). Shuffled captions are easy negatives: recall is '
                 'over-estimated where web noise is subtler (capfilt/audit.py).</p>')
    scores, curve = audit["scores"], audit["curve"]
    series = [("clean", curve["clean_keep_rate"], WEB_COLOUR), ("shuffled", curve["mismatch_keep_rate"], SYNTH_COLOUR)]
    if "web_keep_rate" in curve:
        series.append(("web", curve["web_keep_rate"], "#6e7781"))
    ticks = [(t, f"{t:.1f}") for t in np.linspace(0, 1, 6)]
    parts.append('<div class="charts">'
                 + svg_histogram(np.asarray(scores["clean"]), np.asarray(scores["mismatch"]), at["threshold"],
                                 labels=("own caption", "shuffled caption"), axis=score)
                 + svg_curves(curve["threshold"], series, "keep rate vs threshold", ticks, at["threshold"],
                              width=330, height=230)
                 + "</div>")
    if audit.get("scorers"):
        parts.append(scorers_table(audit["scorers"]))
    cap = audit.get("captioner")
    if cap:
        rows = [["CIDEr-D vs the human caption", _fmt(cap["cider_d"]), "–"],
                ["BLEU-4 vs the human caption", _fmt(cap["bleu_4"]), "–"],
                [f"mean {'filter P(match)' if itm else esc(score)}", _fmt(cap["synthetic_mean_itm"]),
                 _fmt(cap["human_mean_itm"])],
                ["kept at the run's threshold", _fmt(cap["synthetic_keep_rate"]), _fmt(cap["human_keep_rate"])]]
        for label, key in ((f"{'P(match)' if itm else 'score'} gap per image, synthetic - human (± SE)", "score_gap"),
                           ("CIDEr-D gain over another image's caption (± SE)", "description_gain")):
            if cap.get(key):
                rows.append([esc(label), esc(with_se(cap[key]["mean"], cap[key]["se"])), "–"])
        parts.append(f'<h3>Captioner audit <span class="muted">({_fmt(cap["captions"])} sampled captions of '
                     f'{_fmt(cap["images"])} held-out images)</span></h3>'
                     + _table(["", "synthetic", "human"], rows))
    return "".join(parts)


def scorers_table(scorers: dict) -> str:
    """Each named scorer's audit (`audit.json` `scorers`): ROC-AUC, its threshold and clean keep
    rate there, and the threshold keeping the target share of clean pairs."""
    target = next(iter(scorers.values()))["target_keep_rate"]
    rows = []
    for name, figures in scorers.items():
        at, best = figures["at_threshold"] or {}, figures["at_target"]
        rows.append([esc(name), esc(figures.get("model", "–")), _fmt(figures["roc_auc"]), _fmt(figures["threshold"]),
                     _fmt(at.get("clean_keep_rate")), _fmt(best["threshold"]), _fmt(best["clean_keep_rate"])])
    return ('<h3>Named scorers <span class="muted">(the same held-out pairs, each by its own score)</span></h3>'
            + _table(["scorer", "model", "ROC-AUC clean vs shuffled", "its threshold", "clean keep rate at it",
                      f"threshold keeping {target:.0%} of clean pairs", "clean keep rate at that"], rows))


def _table(head: list[str], rows: list[list[str]]) -> str:
    """An HTML table from already-escaped cells."""
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def write_report(directory: str | Path, out: str | Path, examples: int = 12) -> Path:
    """Render the report of `directory` into `out` (atomically: a reader sees no half page)."""
    out = Path(out)
    location(out).write_text(render(directory, examples))
    return out
