"""The demo world: procedural shape scenes with captions, a noisy web split and its ground truth.

A scene is one or two objects (colour, shape, size, position) on a coloured background, drawn
with PIL and captioned from templates with synonyms ("a large red circle on the left of a gray
background"). Three splits are written in img2dataset's parquet layout: `human/` (clean pairs),
`web/` (a share of captions noisy: another image's caption, a one-attribute swap, or alt-text
junk; a few rows failed to download) and `test/` (clean, held out). What each web caption really
is goes only to `truth.parquet`, so CapFilt never sees it.

Everything is a function of `DemoConfig.seed`: each row draws from its own generator seeded by
(seed, split, index, purpose), so the same seed gives byte-identical shards and truth, and a
row's scene does not depend on how many rows come after it.

`parse_caption` reads the attributes a caption names (templates and free model output alike), so
evaluation can score generated captions per attribute; `load_truth` reads the truth file back.
`docs/demo-world.md` is the prose version of this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from capfilt.config import ConfigError, DemoConfig, check
from capfilt.storage import location

# --- the vocabulary of the world: canonical value -> RGB or geometry, and caption synonyms -----

COLOURS = {  # object colours, all far from every background colour
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "pink": (245, 130, 190),
    "turquoise": (40, 200, 220),
}
BACKGROUNDS = {  # a separate palette, so a colour word alone says whether it is the background
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (110, 75, 45),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
SIZES = {"small": 0.09, "large": 0.17}  # radius as a share of the image side
POSITIONS = {  # object centre as (x, y) shares of the image side
    "left": (0.22, 0.5),
    "right": (0.78, 0.5),
    "top": (0.5, 0.22),
    "bottom": (0.5, 0.78),
    "center": (0.5, 0.5),
}
# Two objects never share a position, and the centre is kept for single objects, so two large
# objects never overlap (adjacent centres are 0.4 of the side apart, two large radii 0.34).
PAIR_POSITIONS = ("left", "right", "top", "bottom")

SYNONYMS = {
    "size": {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")},
    "colour": {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")},
    "background": {c: (c,) for c in BACKGROUNDS} | {"gray": ("gray", "grey")},
    "shape": {s: (s,) for s in SHAPES} | {"circle": ("circle", "disc"), "cross": ("cross", "plus"),
                                          "ring": ("ring", "hoop")},
    "position": {
        "left": ("on the left", "to the left"),
        "right": ("on the right", "to the right"),
        "top": ("at the top", "near the top"),
        "bottom": ("at the bottom", "near the bottom"),
        "center": ("in the center", "in the middle", "in the centre"),
    },
}
OBJECT_ATTRIBUTES = ("size", "colour", "shape", "position")
ATTRIBUTES = OBJECT_ATTRIBUTES + ("background",)

# {oN}: "size colour shape", {pN}: position phrase, {bg}: background colour word. Every caption
# fits in 20 BERT tokens, BLIP's caption max_length (tested).
TEMPLATES = {
    1: (
        "a {o1} {p1} of a {bg} background",
        "{bg} background with a {o1} {p1}",
        "there is a {o1} {p1} against a {bg} background",
        "a {o1} {p1}, {bg} background",
        "an image of a {o1} {p1} on {bg}",
    ),
    2: (
        "a {o1} {p1} and a {o2} {p2} on a {bg} background",
        "two shapes on {bg}: a {o1} {p1} and a {o2} {p2}",
        "{bg} background with a {o1} {p1} and a {o2} {p2}",
        "a {o1} {p1}, a {o2} {p2}, {bg} background",
        "a {o1} {p1} and a {o2} {p2} on {bg}",
    ),
}

# Alt-text junk. None of it uses a word of the vocabulary above (checked by a test), so junk
# names no attribute; `{n}` is a random number.
JUNK = (
    "IMG_{n}.JPG", "DSC{n}.jpg", "image", "untitled", "click here for more",
    "best price free shipping", "stock photo 4k wallpaper", "photo {n} of 120",
    "buy now limited offer", "screenshot 2019-{n}", "logo", "banner ad 728x90",
    "product photo #{n}", "home decor ideas", "free download hd wallpapers", "thumbnail",
    "view larger image", "sale 50% off today only", "copyright all rights reserved",
    "image may contain: text",
)

WEB_DOMAINS = ("cdn.example-shop.com", "images.example.net", "static.blog.example.org",
               "media.example-news.com", "i.example-forum.net", "photos.example.com")
DOWNLOAD_ERRORS = (  # messages img2dataset records for URLs it could not fetch
    "HTTP Error 404: Not Found", "HTTP Error 403: Forbidden", "The read operation timed out",
    "<urlopen error [Errno -2] Name or service not known>", "HTTP Error 500: Internal Server Error",
)

SPLITS = ("human", "web", "test")
NOISE_TYPES = ("clean", "mismatch", "swap", "junk", "failed")
STATUS_FAILED = "failed_to_download"
KEY_DIGITS = 9  # img2dataset's keys are 9 digits at its default shard and sample counts

# Per-row generator purposes, so adding a draw for one purpose never shifts another.
_SCENE, _IMAGE, _NOISE, _URL = 0, 1, 2, 3
_STYLE_SLOTS = 1 + 4 * 2 + 1  # template + 4 attributes per object + background

SHARD_SCHEMA = pa.schema([  # img2dataset's parquet layout (input columns first, image last)
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("key", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("sha256", pa.string()),
    pa.field("jpg", pa.binary()),
])
TRUTH_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("split", pa.string()),
    pa.field("clean_caption", pa.string()),  # the true caption of the image
    pa.field("noise", pa.string()),  # what the shard caption is: one of NOISE_TYPES
    pa.field("objects", pa.string()),  # json list of {"size", "colour", "shape", "position"}
    pa.field("background", pa.string()),
    pa.field("num_objects", pa.int32()),
    pa.field("swap_attribute", pa.string()),  # for noise == "swap": the attribute changed
    pa.field("mismatch_key", pa.string()),  # for noise == "mismatch": whose caption it is
])


# --- scenes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    size: str
    colour: str
    shape: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str


def sample_scene(rng: np.random.Generator, two_object_share: float) -> Scene:
    """A random scene: attributes uniform, two objects at distinct non-centre positions."""
    if rng.random() < two_object_share:
        positions = [PAIR_POSITIONS[i] for i in rng.permutation(len(PAIR_POSITIONS))[:2]]
    else:
        positions = [_choice(rng, tuple(POSITIONS))]
    objects = tuple(
        SceneObject(size=_choice(rng, tuple(SIZES)), colour=_choice(rng, tuple(COLOURS)),
                    shape=_choice(rng, SHAPES), position=position)
        for position in positions
    )
    return Scene(objects=objects, background=_choice(rng, tuple(BACKGROUNDS)))


def _choice(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def swap_attribute(scene: Scene, attribute: str, rng: np.random.Generator) -> Scene:
    """The scene with one attribute of one object (or the background) set to another value.

    The result is still a valid scene (two objects keep distinct non-centre positions), so a
    swapped caption is as fluent and as plausible as a true one: only the image can tell.
    """
    if attribute == "background":
        other = [b for b in BACKGROUNDS if b != scene.background]
        return Scene(scene.objects, _choice(rng, tuple(other)))
    if attribute not in OBJECT_ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; known: {list(ATTRIBUTES)}")
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    if attribute == "position" and len(scene.objects) == 2:
        taken = {o.position for o in scene.objects}
        choices = [p for p in PAIR_POSITIONS if p not in taken]
    else:
        values = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
        choices = [v for v in values[attribute] if v != getattr(obj, attribute)]
    new = replace(obj, **{attribute: _choice(rng, tuple(choices))})
    return Scene(scene.objects[:index] + (new,) + scene.objects[index + 1:], scene.background)


def scene_attributes(scene: Scene) -> set[tuple[str, str]]:
    """The (attribute, value) pairs a scene has, in `parse_caption`'s format."""
    pairs = {(a, getattr(o, a)) for o in scene.objects for a in OBJECT_ATTRIBUTES}
    return pairs | {("background", scene.background)}


def scene_to_json(scene: Scene) -> str:
    return json.dumps([asdict(o) for o in scene.objects], sort_keys=True)


def scene_from_json(objects: str, background: str) -> Scene:
    return Scene(tuple(SceneObject(**o) for o in json.loads(objects)), background)


# --- images ----------------------------------------------------------------------------------


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> tuple:
    return tuple(int(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in rgb)


def _polygon(shape: str, r: float) -> list[tuple[float, float]]:
    """Unrotated outline of `shape` around (0, 0) with outer radius about `r`."""
    if shape == "square":
        h = 0.82 * r  # a square's area then matches a circle's of radius ~0.92 r
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [(1.1 * r * math.cos(a), 1.1 * r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [((r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5))
                for i in range(10)]
    if shape == "cross":
        w = 0.32 * r
        return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
                (-r, w), (-r, -w), (-w, -w)]
    raise ValueError(f"{shape!r} is not a polygon shape")


def render_image(scene: Scene, size: int, rng: np.random.Generator,
                 pixel_noise: float) -> Image.Image:
    """Draw `scene` as a `size` x `size` RGB image with colour, place, scale and angle jitter."""
    scale = 4  # draw 4x larger and downsample: anti-aliased edges, like a resized photo
    side = size * scale
    img = Image.new("RGB", (side, side), _jitter(BACKGROUNDS[scene.background], rng, 10))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        fx, fy = POSITIONS[obj.position]
        cx = (fx + rng.uniform(-0.025, 0.025)) * side
        cy = (fy + rng.uniform(-0.025, 0.025)) * side
        r = SIZES[obj.size] * rng.uniform(0.92, 1.08) * side
        angle = math.radians(rng.uniform(-15, 15))
        colour = _jitter(COLOURS[obj.colour], rng, 15)
        if obj.shape == "circle":
            draw.ellipse((cx - 0.92 * r, cy - 0.92 * r, cx + 0.92 * r, cy + 0.92 * r), fill=colour)
        elif obj.shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=round(0.4 * r))
        else:
            cos, sin = math.cos(angle), math.sin(angle)
            draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos)
                          for x, y in _polygon(obj.shape, r)], fill=colour)
    small = img.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float32)  # [H, W, 3]
    # A faint light gradient and sensor noise, so no two images of a scene are identical.
    direction = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gradient = (math.cos(direction) * ramp[None, :] + math.sin(direction) * ramp[:, None])  # [H, W]
    pixels = pixels + rng.uniform(-8, 8) * gradient[..., None]
    pixels = pixels + rng.normal(0, pixel_noise, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --- captions --------------------------------------------------------------------------------

CaptionStyle = tuple[float, ...]  # uniform draws picking the template and each synonym


def caption_style(rng: np.random.Generator) -> CaptionStyle:
    return tuple(float(u) for u in rng.random(_STYLE_SLOTS))


def _pick(options: tuple, u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def render_caption(scene: Scene, style: CaptionStyle) -> str:
    """Caption `scene` with the template and synonyms `style` picks.

    The same style on a scene with one attribute swapped gives the same sentence with one
    phrase changed, which is what makes a swap a hard negative.
    """
    templates = TEMPLATES[len(scene.objects)]
    slots = {"bg": _pick(SYNONYMS["background"][scene.background], style[-1])}
    for i, obj in enumerate(scene.objects):
        u = style[1 + 4 * i: 5 + 4 * i]
        words = [_pick(SYNONYMS[a][getattr(obj, a)], u[j])
                 for j, a in enumerate(("size", "colour", "shape"))]
        slots[f"o{i + 1}"] = " ".join(words)
        slots[f"p{i + 1}"] = _pick(SYNONYMS["position"][obj.position], u[3])
    return _pick(templates, style[0]).format(**slots)


def junk_caption(rng: np.random.Generator) -> str:
    return _choice(rng, JUNK).format(n=int(rng.integers(1000, 10000)))


def _word_index() -> dict[str, tuple[str, str]]:
    """Every single word that names a value -> (attribute, canonical value)."""
    index = {}
    for attribute, table in SYNONYMS.items():
        for value, phrases in table.items():
            for phrase in phrases:
                word = phrase.split()[-1]  # a position phrase by its last word: "to the left"
                index[word] = (attribute, value)
    return index


_WORDS = _word_index()


def parse_scene(text: str) -> Scene | None:
    """Read a caption back into a scene; None unless every object and the background are named.

    Size and colour words attach to the next shape word, a position word to the shape before
    it (the order all templates use).
    """
    objects: list[dict] = []
    pending: dict[str, str] = {}
    background = None
    for word in re.findall(r"[a-z]+", text.lower()):
        if word not in _WORDS:
            continue
        attribute, value = _WORDS[word]
        if attribute == "background":
            background = background or value
        elif attribute == "shape":
            objects.append(pending | {"shape": value})
            pending = {}
        elif attribute == "position" and objects and "position" not in objects[-1]:
            objects[-1]["position"] = value
        else:
            pending.setdefault(attribute, value)
    if not objects or background is None or any(set(o) != set(OBJECT_ATTRIBUTES) for o in objects):
        return None
    return Scene(tuple(SceneObject(**o) for o in objects), background)


def parse_caption(text: str) -> set[tuple[str, str]]:
    """The (attribute, value) pairs a caption names, e.g. {("colour", "red"), ("shape", "star")}.

    Attributes: size, colour, shape, position, background; values are canonical (synonyms
    mapped: "big" -> "large", "violet" -> "purple", "in the middle" -> "center"). Works on any
    text, so it scores free-form model captions as well as template ones; binding of attributes
    to objects is not kept (use `parse_scene` for that).
    """
    return {_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in _WORDS}


# --- the world -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    split: str
    index: int  # position within the split; with the seed it picks the row's generators
    scene: Scene
    style: CaptionStyle
    clean_caption: str
    caption: str  # what the shard says: clean_caption, or noise
    noise: str
    swap_attribute: str | None = None
    mismatch_key: str | None = None


@dataclass(frozen=True)
class TruthRow:
    key: str
    split: str
    clean_caption: str
    noise: str
    scene: Scene
    swap_attribute: str | None
    mismatch_key: str | None


def _rng(cfg: DemoConfig, split: str, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, SPLITS.index(split), index, purpose])


def validate(cfg: DemoConfig) -> None:
    """Raise ConfigError naming the `demo.*` key whose value cannot make a world: its range
    (capfilt.config.RANGES), then what depends on the world's attributes."""
    check(cfg, "demo")
    weights = {n: getattr(cfg, n) for n in ("mismatch_weight", "swap_weight", "junk_weight")}
    if cfg.noise > 0 and sum(weights.values()) <= 0:
        raise ConfigError("demo.mismatch_weight, swap_weight, junk_weight: all 0, demo.noise > 0")
    if cfg.swap_weight > 0 and not cfg.swap_attributes:
        raise ConfigError("demo.swap_attributes: empty but demo.swap_weight > 0")
    for attribute in cfg.swap_attributes:
        if attribute not in ATTRIBUTES:
            raise ConfigError(f"demo.swap_attributes: {attribute!r} is not in {list(ATTRIBUTES)}")


def _apportion(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` by `weights` into integers that sum to `total` (largest remainder)."""
    norm = sum(weights.values())
    if total == 0 or norm <= 0:
        return {name: 0 for name in weights}
    exact = {name: total * w / norm for name, w in weights.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(weights, key=lambda n: (counts[n] - exact[n], list(weights).index(n)))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def web_noise_plan(cfg: DemoConfig) -> list[str]:
    """The noise type of each web row: exact counts, in a seeded random order."""
    failed = round(cfg.failed_share * cfg.num_web)
    noisy = round(cfg.noise * (cfg.num_web - failed))
    counts = _apportion(noisy, {"mismatch": cfg.mismatch_weight, "swap": cfg.swap_weight,
                                "junk": cfg.junk_weight})
    labels = ["failed"] * failed
    labels += [noise for noise in ("mismatch", "swap", "junk") for _ in range(counts[noise])]
    labels += ["clean"] * (cfg.num_web - len(labels))
    order = np.random.default_rng([cfg.seed, len(SPLITS)]).permutation(len(labels))
    return [labels[i] for i in order]


def plan_rows(cfg: DemoConfig) -> list[Row]:
    """Every row of the world (scenes and captions, no pixels), in key order."""
    validate(cfg)
    rows: list[Row] = []
    counts = {"human": cfg.num_human, "web": cfg.num_web, "test": cfg.num_test}
    for split in SPLITS:
        for i in range(counts[split]):
            rng = _rng(cfg, split, i, _SCENE)
            scene = sample_scene(rng, cfg.two_object_share)
            style = caption_style(rng)
            caption = render_caption(scene, style)
            rows.append(Row(key=f"{len(rows):0{KEY_DIGITS}d}", split=split, index=i, scene=scene,
                            style=style, clean_caption=caption, caption=caption, noise="clean"))
    web = [i for i, row in enumerate(rows) if row.split == "web"]
    for i, noise in zip(web, web_noise_plan(cfg)):
        row = rows[i]
        rng = _rng(cfg, "web", row.index, _NOISE)
        if noise == "swap":
            attribute = _choice(rng, cfg.swap_attributes)
            caption = render_caption(swap_attribute(row.scene, attribute, rng), row.style)
            rows[i] = replace(row, caption=caption, noise=noise, swap_attribute=attribute)
        elif noise == "mismatch":
            other = rows[_mismatch_source(rows, web, i, rng)]
            rows[i] = replace(row, caption=other.clean_caption, noise=noise, mismatch_key=other.key)
        elif noise == "junk":
            rows[i] = replace(row, caption=junk_caption(rng), noise=noise)
        elif noise == "failed":  # img2dataset keeps the caption of a URL it could not fetch
            rows[i] = replace(row, noise=noise)
    return rows


def _mismatch_source(rows: list[Row], web: list[int], i: int, rng: np.random.Generator) -> int:
    """Another web row whose scene differs from row i's, so its caption is really wrong."""
    for _ in range(1000):  # scenes repeat rarely, so this ends after a draw or two
        j = web[int(rng.integers(len(web)))]
        if j != i and rows[j].scene != rows[i].scene:
            return j
    raise ConfigError("demo.num_web: a mismatched caption needs at least two distinct web scenes")


def _shard_table(cfg: DemoConfig, rows: list[Row]) -> pa.Table:
    """img2dataset-layout rows; images are drawn here, one shard at a time, to bound memory."""
    columns: dict[str, list] = {field.name: [] for field in SHARD_SCHEMA}
    for row in rows:
        meta = _rng(cfg, row.split, row.index, _URL)
        if row.split == "web":
            url = (f"https://{_choice(meta, WEB_DOMAINS)}/"
                   f"{int(meta.integers(2009, 2024))}/{meta.bytes(6).hex()}.jpg")
        else:
            url = f"https://{row.split}-set.example.org/images/{row.key}.jpg"
        columns["url"].append(url)
        columns["caption"].append(row.caption)
        columns["key"].append(row.key)
        if row.noise == "failed":
            columns["status"].append(STATUS_FAILED)
            columns["error_message"].append(_choice(meta, DOWNLOAD_ERRORS))
            for name in ("width", "height", "original_width", "original_height", "sha256", "jpg"):
                columns[name].append(None)
            continue
        image = render_image(row.scene, cfg.image_size, _rng(cfg, row.split, row.index, _IMAGE),
                             cfg.pixel_noise)
        data = encode_jpeg(image, cfg.jpeg_quality)
        columns["status"].append("success")
        columns["error_message"].append(None)
        for name in ("width", "height", "original_width", "original_height"):
            columns[name].append(cfg.image_size)
        columns["sha256"].append(hashlib.sha256(data).hexdigest())
        columns["jpg"].append(data)
    return pa.table(columns, schema=SHARD_SCHEMA)


def truth_table(rows: list[Row]) -> pa.Table:
    return pa.table({
        "key": [r.key for r in rows],
        "split": [r.split for r in rows],
        "clean_caption": [r.clean_caption for r in rows],
        "noise": [r.noise for r in rows],
        "objects": [scene_to_json(r.scene) for r in rows],
        "background": [r.scene.background for r in rows],
        "num_objects": [len(r.scene.objects) for r in rows],
        "swap_attribute": [r.swap_attribute for r in rows],
        "mismatch_key": [r.mismatch_key for r in rows],
    }, schema=TRUTH_SCHEMA)


def existing_outputs(out: Path) -> list[Path]:
    """Files of a world already in `out` (what `write_world(..., overwrite=True)` replaces)."""
    found = [p for split in SPLITS for p in sorted((out / split).glob("*.parquet"))]
    return found + ([out / "truth.parquet"] if (out / "truth.parquet").exists() else [])


def write_world(cfg: DemoConfig, out: str | Path, overwrite: bool = False) -> dict[str, Counter]:
    """Write `out/{human,web,test}/NNNNN.parquet` and `out/truth.parquet`; counts per split/noise.

    A folder that already holds a world is refused unless `overwrite`, which removes only that
    world's parquet files first, so a smaller world never leaves stale shards behind.
    """
    out = Path(out)
    rows = plan_rows(cfg)
    old = existing_outputs(out)
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds a demo world ({old[0]}); "
                              "pass overwrite=True (--overwrite) to replace it")
    for path in old:
        path.unlink()
    for split in SPLITS:
        split_rows = [r for r in rows if r.split == split]
        (out / split).mkdir(parents=True, exist_ok=True)
        for shard, start in enumerate(range(0, len(split_rows), cfg.rows_per_shard)):
            table = _shard_table(cfg, split_rows[start:start + cfg.rows_per_shard])
            location(out / split / f"{shard:05d}.parquet").write_table(table)
    location(out / "truth.parquet").write_table(truth_table(rows))
    return {split: Counter(r.noise for r in rows if r.split == split) for split in SPLITS}


def load_truth(path: str | Path) -> dict[str, TruthRow]:
    """Read `truth.parquet` into {key: TruthRow} (scene parsed back from the json)."""
    table = pq.read_table(path)
    missing = [name for name in TRUTH_SCHEMA.names if name not in table.column_names]
    if missing:
        raise KeyError(f"{path}: not a demo-world truth file, columns {missing} are missing")
    truth = {}
    for rec in table.to_pylist():
        truth[rec["key"]] = TruthRow(
            key=rec["key"], split=rec["split"], clean_caption=rec["clean_caption"],
            noise=rec["noise"], scene=scene_from_json(rec["objects"], rec["background"]),
            swap_attribute=rec["swap_attribute"], mismatch_key=rec["mismatch_key"])
    return truth
