"""`capfilt run` with captioners beyond BLIP (capfilt.model.families), end to end on local Ray,
and the refusals of a folder that cannot caption before any work."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from capfilt import schema
from capfilt.cli import app
from capfilt.commit import IDENTITY, MODELS
from capfilt.config import load_config
from capfilt.model.captioners import GenerateCaptioner
from capfilt.model.images import decode_image
from capfilt.model.scorers import ContrastiveScorer
from tests.model import tiny_models
from tests.model.test_hub import hub_cache
from tests.pipelines.test_run import RESOURCES, read_dir
from tests.tiny_blip import shard_rows, write_shard


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Two shards of 6 rows: each with 1 failed download and 1 corrupt image."""
    root = tmp_path_factory.mktemp("inputs")
    write_shard(root / "00000.parquet", shard_rows("a", 6, failed=1, seed=1))
    write_shard(root / "00001.parquet", shard_rows("b", 6, failed=1, seed=2))
    return root


def run_args(inputs: Path, captioner: Path, filter_dir: Path, out: Path) -> list[str]:
    args = ["run", "--input", str(inputs), "--captioner", str(captioner), "--filter", str(filter_dir),
            "--out", str(out), "--num-captions", "2", "--threshold", "0.5"]
    for item in RESOURCES:
        args += ["--set", item]
    return args


QWEN_PROMPT = "run.caption.prompt=describe the image in one sentence"  # a chat instruction


def captioner_run(inputs: Path, folder: Path, filter_dir: Path, out: Path, settings: tuple[str, ...] = ()) -> dict:
    """`capfilt run` with the captioner `folder` and `settings` (--set); what the tests read of it."""
    args = run_args(inputs, folder, filter_dir, out) + [a for item in settings for a in ("--set", item)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"out": out, "args": args, "output": result.output, "folder": folder, "settings": settings}


def every_input_once(out: Path, inputs: Path) -> tuple[dict, dict]:
    """Checks that every input key is written once, the stats reconcile (read = kept + rejected +
    failed = 12) and the 4 bad rows failed for their reasons; returns the output tables and stats."""
    tables = {dest: read_dir(out, dest) for dest in schema.OUTPUT_DIRS}
    input_keys = sorted(k for p in sorted(inputs.glob("*.parquet")) for k in pq.read_table(p)["key"].to_pylist())
    assert sorted(k for t in tables.values() for k in t["key"].to_pylist()) == input_keys and len(input_keys) == 12
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == 12
    assert stats["failed_by_reason"] == {"decode": 2, "download": 2}
    return tables, stats


def scored_rows_of_every_input_once(run: dict, inputs: Path) -> list[dict]:
    """Checks `every_input_once` and that each scored row has the captioner's 2 synthetic captions
    with their scores and its folder; returns the scored rows."""
    tables, stats = every_input_once(run["out"], inputs)
    scored = tables[schema.DATA].to_pylist() + tables[schema.REJECTED].to_pylist()
    assert len(scored) == 8 and stats["synthetic_generated"] == 2 * len(scored)
    assert all(len(r[schema.SYNTHETIC]) == 2 and len(r[schema.SYNTHETIC_ITM]) == 2 for r in scored)
    assert all(r[schema.CAPTIONER] == str(run["folder"].resolve()) for r in scored)
    return scored


def assert_captions_are_the_captioners(run: dict, inputs: Path) -> None:
    """The actor's captions are GenerateCaptioner's on the row's own picture, seeded by its key:
    neither the block, the batch nor the BLIP filter in the same actor changes them."""
    cfg = load_config(None, [f"run.caption.model={run['folder']}", "run.caption.num_captions=2", *run["settings"],
                             *RESOURCES]).run
    captioner = GenerateCaptioner(run["folder"], cfg.caption, torch.device("cpu"))
    source = {r["key"]: r for p in sorted(inputs.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    out = run["out"]
    scored = read_dir(out, schema.DATA).to_pylist() + read_dir(out, schema.REJECTED).to_pylist()
    for row in scored:
        picture = decode_image(source[row["key"]]["jpg"], cfg.image)
        assert row[schema.SYNTHETIC] == captioner.caption([picture], [row["key"]])[0]


def assert_a_rerun_skips_committed_shards(run: dict) -> None:
    result = CliRunner().invoke(app, run["args"])
    assert result.exit_code == 0, result.output
    last = json.loads((run["out"] / "stats.json").read_text())["last_run"]
    assert last["shards_skipped"] == 2 and last["shards_processed"] == 0 and last["rows_through_models"] == 0


@pytest.fixture(scope="module")
def blip2_run(ray_local, inputs, blip_dirs, tmp_path_factory) -> dict:
    folder = tiny_models.blip2_dir(tmp_path_factory.mktemp("models") / "blip2")
    return captioner_run(inputs, folder, blip_dirs["filter"], tmp_path_factory.mktemp("run") / "out")


def test_blip2_captions_every_row_once_and_stats_reconcile(blip2_run, inputs):
    scored_rows_of_every_input_once(blip2_run, inputs)
    assert "read 12" in blip2_run["output"]


def test_blip2_captions_equal_the_captioner_on_each_decoded_picture(blip2_run, inputs):
    assert_captions_are_the_captioners(blip2_run, inputs)


def test_blip2_rerun_skips_committed_shards(blip2_run):
    assert_a_rerun_skips_committed_shards(blip2_run)


# Image-text-to-text families through `capfilt run` besides BLIP-2: an encoder-decoder with a task
# prompt (Florence-2), dynamic resolution (Qwen2-VL) and tiles (SmolVLM), both left-padded chat turns.
VLMS = ("florence2", "qwen2_vl", "smolvlm")


@pytest.fixture(scope="module", params=VLMS)
def vlm_run(request, ray_local, inputs, blip_dirs, tmp_path_factory) -> dict:
    build, prompt = tiny_models.CAPTIONERS[request.param]
    folder = build(tmp_path_factory.mktemp("models") / request.param)
    return captioner_run(inputs, folder, blip_dirs["filter"], tmp_path_factory.mktemp("run") / "out",
                         (f"run.caption.prompt={prompt}",))


def test_vlm_captions_every_row_once_and_resume_skips_committed_shards(vlm_run, inputs):
    scored = scored_rows_of_every_input_once(vlm_run, inputs)
    assert all(len(c.split()) <= 6 for r in scored for c in r[schema.SYNTHETIC])  # RESOURCES' max_length
    assert len({c for r in scored for c in r[schema.SYNTHETIC]}) > 2  # captions differ between rows and draws
    assert_a_rerun_skips_committed_shards(vlm_run)


def test_vlm_captions_equal_the_captioner_on_each_decoded_picture(vlm_run, inputs):
    assert_captions_are_the_captioners(vlm_run, inputs)


def test_a_scorer_or_remote_code_as_captioner_is_refused_before_any_work(inputs, blip_dirs, tmp_path):
    clip = tiny_models.clip_dir(tmp_path / "clip")
    remote = tmp_path / "remote"
    remote.mkdir()
    for name in ("model.safetensors",):  # weights a check would accept: only the family refuses it
        (remote / name).write_bytes((clip / name).read_bytes())
    (remote / "config.json").write_text(json.dumps({"model_type": "my_vlm", "auto_map": {"AutoModel": "m.M"}}))
    for folder, flag, says in ((clip, "--captioner", "a CLIPModel folder; the captioner must be"),
                               (remote, "--captioner", "remote code"),
                               (blip_dirs["captioner"], "--filter", "a BlipForConditionalGeneration folder; the filter "
                                                                    "must be a BlipForImageTextRetrieval")):
        out = tmp_path / f"out_{folder.name}_{flag[2:]}"
        captioner, filter_dir = (folder, blip_dirs["filter"]) if flag == "--captioner" else (blip_dirs["captioner"],
                                                                                             folder)
        result = CliRunner().invoke(app, run_args(inputs, captioner, filter_dir, out))
        assert result.exit_code == 1, result.output
        error = result.output.strip().splitlines()[-1]
        assert error.startswith(f"error: {flag} {folder}: ") and says in error, error
        assert not out.exists()


@pytest.fixture(scope="module")
def scorers_run(ray_local, inputs, blip_dirs, tmp_path_factory) -> dict:
    """BLIP captioner and filter, plus a tiny CLIP scorer with a threshold (it drops texts) and a
    tiny SigLIP one without (scores kept only) that ranks the synthetic captions for top-1."""
    models = tmp_path_factory.mktemp("scorers")
    clip, siglip = tiny_models.clip_dir(models / "clip"), tiny_models.siglip_dir(models / "siglip")
    out = tmp_path_factory.mktemp("run") / "out"
    scorers = (f"run.scorers=[{{name: clip, model: {clip}, threshold: {CLIP_THRESHOLD}}}, "
               f"{{name: sig, model: {siglip}}}]")
    args = run_args(inputs, blip_dirs["captioner"], blip_dirs["filter"], out) + [
        "--num-captions", "3", "--threshold", str(ITM_THRESHOLD), "--set", scorers,
        "--set", "run.filter.top_k_synthetic=1", "--set", "run.filter.rank_synthetic_by=sig"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"out": out, "clip": clip, "siglip": siglip}


CLIP_THRESHOLD = 0.0
ITM_THRESHOLD = 0.3


def test_named_scorers_add_their_columns_equal_to_the_scorer_on_each_picture(scorers_run, inputs):
    out = scorers_run["out"]
    data = pq.read_table(out / "data" / "00000.parquet")
    names = data.schema.names
    assert names[-4:] == [schema.score_column("clip"), schema.synthetic_score_column("clip"),
                          schema.score_column("sig"), schema.synthetic_score_column("sig")]
    for dest in schema.OUTPUT_DIRS:  # one schema in every file of the run, failed rows' included
        assert all(pq.read_schema(p).names == names for p in (out / dest).glob("*.parquet"))
    image_cfg = load_config(None, []).run.image
    source = {r["key"]: r for p in sorted(inputs.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    scored = read_dir(out, schema.DATA).to_pylist() + read_dir(out, schema.REJECTED).to_pylist()
    assert len(scored) == 8
    for name, folder in (("clip", scorers_run["clip"]), ("sig", scorers_run["siglip"])):
        scorer = ContrastiveScorer(folder, torch.device("cpu"))
        for row in scored:
            picture = decode_image(source[row["key"]]["jpg"], image_cfg)
            expected = scorer.score([picture], [[row["caption"], *row[schema.SYNTHETIC]]])[0]
            got = [row[schema.score_column(name)], *row[schema.synthetic_score_column(name)]]
            assert got == pytest.approx(expected, abs=1e-4), (name, row["key"])
    for row in read_dir(out, schema.FAILED).to_pylist():
        assert row[schema.score_column("clip")] is None and row[schema.synthetic_score_column("sig")] is None


def test_a_text_is_kept_when_it_passes_every_thresholded_scorer_and_top_k_ranks_by_name(scorers_run):
    out = scorers_run["out"]
    scored = read_dir(out, schema.DATA).to_pylist() + read_dir(out, schema.REJECTED).to_pylist()
    dropped_by_clip = kept = 0
    for row in scored:
        web_passes = row[schema.CAPTION_ITM] >= ITM_THRESHOLD and row[schema.score_column("clip")] >= CLIP_THRESHOLD
        assert row[schema.CAPTION_KEEP] == web_passes
        passing = [itm >= ITM_THRESHOLD and clip >= CLIP_THRESHOLD for itm, clip in
                   zip(row[schema.SYNTHETIC_ITM], row[schema.synthetic_score_column("clip")])]
        dropped_by_clip += sum(itm >= ITM_THRESHOLD and not ok for itm, ok in
                               zip([row[schema.CAPTION_ITM], *row[schema.SYNTHETIC_ITM]], [web_passes, *passing]))
        sig = row[schema.synthetic_score_column("sig")]
        candidates = [i for i, ok in enumerate(passing) if ok and row[schema.SYNTHETIC][i].strip()
                      not in ({row["caption"].strip()} if web_passes else set())]
        best = max(candidates, key=lambda i: (sig[i], -i)) if candidates else None
        assert row[schema.SYNTHETIC_KEEP] == [i == best for i in range(3)], row["key"]
        kept += web_passes + (best is not None)
    assert dropped_by_clip > 0 and kept > 0  # the CLIP threshold decided something either way
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == 12
    assert stats["kept"] == read_dir(out, schema.DATA).num_rows
    assert stats["synthetic_kept"] == sum(sum(r[schema.SYNTHETIC_KEEP]) for r in scored)


def test_hub_ids_run_from_the_cache_offline(inputs, blip_dirs, tmp_path):
    """--captioner (a tiny LLaVA), --filter and a scorer as hub ids, in a fresh process with HF_HOME
    and HF_HUB_OFFLINE as a node would have them: its own local Ray's actors resolve them there too."""
    home = tmp_path / "hf"
    repos = {"captioner": "tiny-org/llava", "filter": "tiny-org/blip-filter", "clip": "tiny-org/clip"}
    snapshots = {"captioner": hub_cache(home, tiny_models.llava_dir(tmp_path / "llava"), repos["captioner"]),
                 "filter": hub_cache(home, blip_dirs["filter"], repos["filter"]),
                 "clip": hub_cache(home, tiny_models.clip_dir(tmp_path / "clip"), repos["clip"])}
    out = tmp_path / "out"
    args = run_args(inputs, repos["captioner"], repos["filter"], out) + [
        "--set", f"run.scorers=[{{name: clip, model: {repos['clip']}@main, threshold: 0.0}}]",
        "--set", "run.resources.object_store_memory=268435456"]
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    for name in ("HF_HUB_CACHE", "RAY_ADDRESS"):  # the cache from HF_HOME; a Ray of its own
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", "from capfilt.cli import app; app()", *args], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == 12
    scored = read_dir(out, schema.DATA).to_pylist() + read_dir(out, schema.REJECTED).to_pylist()
    assert len(scored) == 8 and all(r[schema.score_column("clip")] is not None for r in scored)
    assert all(len(r[schema.SYNTHETIC]) == 2 for r in scored)
    assert {(r[schema.CAPTIONER], r[schema.FILTER]) for r in scored} == {(repos["captioner"], repos["filter"])}
    identity = json.loads((out / IDENTITY).read_text())
    assert identity["captioner"]["id"] == str(snapshots["captioner"].resolve())
    assert identity["scorers"]["clip"]["id"] == str(snapshots["clip"].resolve())
    # Provenance: each model as given, the snapshot it resolved to, SHA-256 of its config and weights.
    models = json.loads((out / MODELS).read_text())
    clip = models["scorers"]["clip"]
    assert (clip["model"], clip["folder"]) == (f"{repos['clip']}@main", str(snapshots["clip"].resolve()))
    for role in (models["captioner"], models["filter"], clip):
        folder = Path(role["folder"])
        assert role["config_sha256"] == hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
        assert role["weights_sha256"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                          for p in folder.glob("*.safetensors")} != {}


def test_a_hub_id_not_in_the_cache_offline_is_refused_before_any_work(inputs, blip_dirs, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, run_args(inputs, "tiny-org/absent", blip_dirs["filter"], out))
    assert result.exit_code == 1, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: run.caption.model (--captioner): tiny-org/absent: not in the hub cache"), error
    assert not out.exists()


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("scorer_dirs")
    dirs = {"clip": tiny_models.clip_dir(root / "clip"), "siglip": tiny_models.siglip_dir(root / "siglip")}
    # A CLIP folder whose weights lack the text projection: it would load with a random one.
    torn = tiny_models.clip_dir(root / "torn")
    weights = load_file(torn / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "text_projection.weight"}, torn / "model.safetensors",
              metadata={"format": "pt"})
    return dirs | {"torn": torn}


@pytest.mark.parametrize("scorers, extra, says", [
    ("[{name: Bad-Name, model: CLIP}]", [], r"run.scorers\[0\].name: 'Bad-Name' must be lowercase"),
    ("[{name: itm, model: CLIP}]", [], r"run.scorers\[0\].name: 'itm' is taken"),
    ("[{name: a, model: CLIP}, {name: a, model: SIGLIP}]", [], r"run.scorers\[1\].name: 'a' is taken"),
    ("[{name: a, model: CAPTIONER}]", [], r"run.scorers\[0\].model .*: a BlipForConditionalGeneration folder; "
                                          r"the scorer must be"),
    ("[{name: a, model: TORN}]", [], r"run.scorers\[0\].model .*: its weights do not load whole into a CLIPModel: "
                                     r"1 missing \(text_projection.weight\)"),
    ("[{name: a, model: CLIP, kind: itc}]", [], r"run.scorers\[0\].kind: itc is a BLIP retrieval folder's score"),
    ("[{name: a, model: CLIP, threshold: 1.5}]", [], r"run.scorers\[0\].threshold must be within \[-1, 1\]"),
    ("[{name: a, model: SIGLIP, threshold: -0.1}]", [], r"run.scorers\[0\].threshold must be within \[0, 1\]"),
    ("[{name: a, model: FILTER, threshold: -0.1}]", [], r"run.scorers\[0\].threshold must be within \[0, 1\]"),
    ("[{name: a, model: CLIP}]", ["run.filter.rank_synthetic_by=b"],
     r"run.filter.rank_synthetic_by: 'b' is not one of \['a', 'itc', 'itm'\]"),
    ("[{name: a, model: CLIP, threshold: 0.2}]", ["run.filter.model="],
     r"run.filter.threshold=0.5 has no ITM to apply to: run.filter.model is empty"),
    ("[{name: a, model: CLIP}]", ["run.filter.model=", "run.filter.threshold=null"],
     r"run.filter.model is empty and no run.scorers entry has a threshold"),
    ("[{name: a, model: CLIP, threshold: 0.2}]", ["run.filter.model=", "run.filter.threshold=null",
                                                  "run.filter.top_k_synthetic=1", "run.filter.rank_synthetic_by=itm"],
     r"run.filter.rank_synthetic_by: 'itm' is not one of \['a'\]"),
])
def test_scorer_settings_that_cannot_run_are_named(scorers, extra, says, blip_dirs, scorer_dirs):
    from capfilt.pipelines.run import validate

    scorers = (scorers.replace("SIGLIP", str(scorer_dirs["siglip"])).replace("CLIP", str(scorer_dirs["clip"]))
               .replace("TORN", str(scorer_dirs["torn"]))
               .replace("FILTER", str(blip_dirs["filter"])).replace("CAPTIONER", str(blip_dirs["captioner"])))
    with pytest.raises(ValueError, match=says):  # a name when the config loads, the rest before Ray starts
        validate(load_config(None, [f"run.caption.model={blip_dirs['captioner']}",
                                    f"run.filter.model={blip_dirs['filter']}", f"run.scorers={scorers}",
                                    *extra]).run)


def test_select_refilters_stored_scores_as_run_would(scorers_run, inputs, blip_dirs, tmp_path):
    """`capfilt select` with new thresholds and top-k gives the files, rows and identity that
    `capfilt run` with those settings gives; a second select skips the committed shards."""
    out = scorers_run["out"]
    scorers = (f"run.scorers=[{{name: clip, model: {scorers_run['clip']}, threshold: 0.1}}, "
               f"{{name: sig, model: {scorers_run['siglip']}, threshold: 0.4}}]")
    new = ["run.filter.threshold=0.6", "run.filter.top_k_synthetic=0", "run.filter.rank_synthetic_by=itm", scorers]
    rerun = tmp_path / "rerun"
    # --threshold (a flag wins over --set) as run_args gives it, then the other new settings
    args = run_args(inputs, blip_dirs["captioner"], blip_dirs["filter"], rerun) + ["--num-captions", "3",
                                                                                  "--threshold", "0.6"]
    for item in new[1:]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    selected = tmp_path / "selected"
    select_args = ["select", str(out), "--to", str(selected)] + [a for item in new for a in ("--set", item)]
    result = CliRunner().invoke(app, select_args)
    assert result.exit_code == 0, result.output
    for dest in schema.OUTPUT_DIRS:
        for name in ("00000.parquet", "00001.parquet"):
            assert pq.read_table(selected / dest / name).equals(pq.read_table(rerun / dest / name)), (dest, name)
    assert json.loads((selected / IDENTITY).read_text()) == json.loads((rerun / IDENTITY).read_text())
    assert json.loads((selected / MODELS).read_text()) == json.loads((out / MODELS).read_text())  # the scores' models
    stats = json.loads((selected / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] + stats["failed"] == 12
    assert read_dir(selected, schema.DATA).num_rows != read_dir(out, schema.DATA).num_rows or \
        stats["synthetic_kept"] != json.loads((out / "stats.json").read_text())["synthetic_kept"]
    again = CliRunner().invoke(app, select_args)
    assert again.exit_code == 0 and "0 shards selected, 2 skipped" in again.output, again.output


def test_select_refuses_a_setting_that_needs_the_models(scorers_run, tmp_path):
    result = CliRunner().invoke(app, ["select", str(scorers_run["out"]), "--to", str(tmp_path / "s"),
                                      "--set", "run.caption.num_captions=5"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(
        "error: run.caption.num_captions: was 3, now 5: capfilt select changes only"), result.output
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def clip_filter_run(ray_local, inputs, blip_dirs, scorer_dirs, tmp_path_factory) -> dict:
    """`--filter` a CLIP folder: no BLIP filter; the CLIP score decides (scorer `filter`), a BLIP
    retrieval folder's ITM rides along as `--scorer blip=...` without a threshold."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = run_args(inputs, blip_dirs["captioner"], scorer_dirs["clip"], out) + [
        "--threshold", str(CLIP_THRESHOLD), "--scorer", f"blip={blip_dirs['filter']}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"out": out}


def test_a_clip_filter_runs_without_blip_and_decides_by_its_threshold(clip_filter_run, inputs, scorer_dirs):
    out = clip_filter_run["out"]
    tables, stats = every_input_once(out, inputs)
    assert stats["kept"] == tables[schema.DATA].num_rows
    names = tables[schema.DATA].schema.names
    assert names[-4:] == [schema.score_column("filter"), schema.synthetic_score_column("filter"),
                          schema.score_column("blip"), schema.synthetic_score_column("blip")]
    for table in tables.values():  # no BLIP filter: its columns are null, and so is its threshold
        for column in (schema.CAPTION_ITM, schema.CAPTION_ITC, schema.SYNTHETIC_ITM, schema.SYNTHETIC_ITC,
                       schema.THRESHOLD):
            assert table[column].null_count == table.num_rows, column
        assert set(table[schema.FILTER].to_pylist()) <= {""}
    resolved = load_config(out / "config.yaml").run
    assert resolved.filter.model == "" and resolved.filter.threshold is None
    assert [(s.name, s.model, s.threshold) for s in resolved.scorers] == [
        ("filter", str(scorer_dirs["clip"].resolve()), CLIP_THRESHOLD), ("blip", resolved.scorers[1].model, None)]
    assert json.loads((out / IDENTITY).read_text())["filter"] is None
    clip = ContrastiveScorer(scorer_dirs["clip"], torch.device("cpu"))
    image_cfg = load_config(None, []).run.image
    source = {r["key"]: r for p in sorted(inputs.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    scored = tables[schema.DATA].to_pylist() + tables[schema.REJECTED].to_pylist()
    assert len(scored) == 8
    kept = dropped = 0
    for row in scored:
        picture = decode_image(source[row["key"]]["jpg"], image_cfg)
        expected = clip.score([picture], [[row["caption"], *row[schema.SYNTHETIC]]])[0]
        got = [row[schema.score_column("filter")], *row[schema.synthetic_score_column("filter")]]
        assert got == pytest.approx(expected, abs=1e-4), row["key"]
        passes = [score >= CLIP_THRESHOLD for score in got]
        assert [row[schema.CAPTION_KEEP], *row[schema.SYNTHETIC_KEEP]] == passes, row["key"]
        assert row[schema.score_column("blip")] is not None and len(row[schema.synthetic_score_column("blip")]) == 2
        kept, dropped = kept + sum(passes), dropped + len(passes) - sum(passes)
    assert kept > 0 and dropped > 0  # the CLIP threshold decided both ways
