"""The config loader: YAML, dotted overrides, errors that name the key, the resolved config."""

from __future__ import annotations

import pytest
import yaml

from capfilt.config import (AT_MOST, RANGES, Config, ConfigError, Range, load_config, parse_override, parse_scorer,
                            write_resolved)


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.run.filter.threshold == 0.5 and cfg.run.caption.top_p == 0.9
    assert cfg.run.image.formats == ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def test_yaml_then_overrides_later_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  filter:\n    threshold: 0.3\n    keep: web\n  caption:\n    num_captions: 2\n")
    cfg = load_config(path, ["run.filter.threshold=0.7", "run.caption.prompt=a photo of ",
                             "run.resources.gpus_per_actor=0.5", "run.image.formats=[JPEG, PNG]"])
    assert cfg.run.filter.threshold == 0.7 and cfg.run.filter.keep == "web"
    assert cfg.run.caption.num_captions == 2 and cfg.run.caption.prompt == "a photo of"  # YAML strips
    assert cfg.run.resources.gpus_per_actor == 0.5 and cfg.run.image.formats == ("JPEG", "PNG")
    assert load_config(None, ["run.resources.gpus_per_actor=auto"]).run.resources.gpus_per_actor == "auto"
    assert isinstance(load_config(None, ["run.filter.threshold=1"]).run.filter.threshold, float)


@pytest.mark.parametrize("override, key", [
    ("run.filter.treshold=0.3", "run.filter.treshold"),
    ("run.captions.num_captions=2", "run.captions"),
    ("run.filter.keep=all", "run.filter.keep"),
    ("run.caption.num_captions=two", "run.caption.num_captions"),
    ("run.caption.beam=1", "run.caption.beam"),
    ("run.round=true", "run.round"),
    ("run.filter=0.5", "run.filter"),
    ("run.resources.gpus_per_actor=some", "run.resources.gpus_per_actor"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_is_reported_with_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  caption:\n    top_q: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config key run\.caption\.top_q"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_override_syntax():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=") == ("a.b", "")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("a.b")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["run.filter.threshold=0.42", "run.caption.model=/models/cap", "run.round=3",
                             "run.image.formats=[PNG]"])
    path = write_resolved(cfg, tmp_path / "out")
    assert path == tmp_path / "out" / "config.yaml"
    assert yaml.safe_load(path.read_text())["run"]["filter"]["threshold"] == 0.42
    assert load_config(path) == cfg


# --- every range-checked key, through `capfilt run`, before anything starts ----------------------


def _outside(allowed: Range) -> float:
    """A value just outside `allowed`."""
    if allowed.low is None:
        return allowed.high if allowed.open_high else allowed.high + 1
    return allowed.low if allowed.open_low else allowed.low - 1


def _bad(key: str) -> tuple[str, ...]:
    """`--set` text of a value just outside `key`'s allowed range (a `list[].field` key: in a
    one-item list's first item)."""
    if "[]" in key:
        path, field = key.split("[].")
        return (f"{path}=[{{name: a, model: m, {field}: {_outside(RANGES[key])}}}]",)
    if key in dict(AT_MOST):
        large = dict(AT_MOST)[key]
        return f"{key}={RANGES[large].low + 1}", f"{large}={RANGES[large].low}"
    return (f"{key}={_outside(RANGES[key])}",)


@pytest.fixture(scope="module")
def run_args(tmp_path_factory, blip_dirs) -> list[str]:
    """`capfilt run` arguments that would start a real run: a shard and the tiny models."""
    from tests.tiny_blip import shard_rows, write_shard

    shards = tmp_path_factory.mktemp("in")
    write_shard(shards / "00000.parquet", shard_rows("a", 4))
    return ["run", "--input", str(shards), "--captioner", str(blip_dirs["captioner"]),
            "--filter", str(blip_dirs["filter"])]


@pytest.mark.parametrize("key", [*RANGES, *dict(AT_MOST)])
def test_a_value_out_of_range_is_one_error_line_naming_the_key(key, run_args, tmp_path):
    from typer.testing import CliRunner

    from capfilt.cli import app

    sets = [arg for text in _bad(key) for arg in ("--set", text)]
    result = CliRunner().invoke(app, [*run_args, "--out", str(tmp_path / "out"), *sets])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.splitlines()
    named = key.replace("[]", "[0]")  # a list item's key names the item
    assert len(lines) == 1 and lines[0].startswith(f"error: {named} must be "), result.output
    assert ("got" in lines[0]) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["run.caption.max_length=0", "run.filter.bucket_tokens=-1"])
def test_a_bad_setting_fails_before_ray_starts(bad, run_args, tmp_path):
    """In a process of its own, so that a Ray it started would leave its session folder behind."""
    import os
    import subprocess
    import sys

    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    result = subprocess.run([sys.executable, "-m", "capfilt.cli", *run_args, "--out", str(tmp_path / "out"),
                             "--set", bad], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    assert result.returncode == 1
    assert result.stdout == "" and result.stderr.startswith(f"error: {bad.split('=')[0]} must be at least")
    assert len(result.stderr.splitlines()) == 1
    assert list(ray_tmp.iterdir()) == [] and not (tmp_path / "out").exists()


# --- named scorers: --scorer, and their names checked at load --------------------------------------


def test_scorer_flag_text_gives_the_scorer_config():
    assert parse_scorer("clip=/m/clip") == parse_scorer("clip = /m/clip")
    scorer = parse_scorer("blipitc=org/blip@main,kind=itc,threshold=0.2,threshold_quantile=0.1")
    assert (scorer.name, scorer.model, scorer.kind, scorer.threshold, scorer.threshold_quantile) == (
        "blipitc", "org/blip@main", "itc", 0.2, 0.1)
    assert parse_scorer("sig=/m/sig,threshold=1").threshold == 1.0 and parse_scorer("a=/m").threshold is None


@pytest.mark.parametrize("text, says", [
    ("clip", "is not of the form NAME=MODEL"),
    ("=/m/clip", "is not of the form NAME=MODEL"),
    ("clip=", "is not of the form NAME=MODEL"),
    ("clip=/m,threshold=high", "threshold: 'high' fits none of"),
    ("clip=/m,kind=cosine", "kind: 'cosine' is not one of"),
    ("clip=/m,treshold=0.2", "unknown config key treshold"),
    ("clip=/m,threshold=0.1,threshold=0.2", "threshold is given twice"),
    ("clip=/m,threshold", "is not of the form key=value"),
])
def test_a_bad_scorer_flag_is_one_error_naming_it(text, says, run_args, tmp_path):
    from typer.testing import CliRunner

    from capfilt.cli import app

    result = CliRunner().invoke(app, [*run_args, "--out", str(tmp_path / "out"), "--scorer", text])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --scorer {text!r}") and says in lines[0], result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scorers, says", [
    ("[{name: Bad-Name, model: m}]", r"run\.scorers\[0\]\.name: 'Bad-Name' must be lowercase"),
    ("[{name: itc, model: m}]", r"run\.scorers\[0\]\.name: 'itc' is taken"),
    ("[{name: a, model: m}, {name: a, model: n}]", r"run\.scorers\[1\]\.name: 'a' is taken"),
    ("[{name: a, model: m}, {name: b, model: n, threshold_quantile: 1}]",
     r"run\.scorers\[1\]\.threshold_quantile must be within \[0, 1\), got 1\.0"),
])
def test_scorer_names_and_ranges_are_checked_at_load(scorers, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, [f"run.scorers={scorers}"])


def test_scorer_flags_follow_the_configured_scorers():
    from capfilt.commands._shared import config_from

    cfg = config_from(None, ["run.scorers=[{name: a, model: m}]"], None, ["b=n,threshold=0.3"])
    assert [(s.name, s.model, s.threshold) for s in cfg.run.scorers] == [("a", "m", None), ("b", "n", 0.3)]
    with pytest.raises(ConfigError, match=r"run\.scorers\[1\]\.name: 'a' is taken"):
        config_from(None, ["run.scorers=[{name: a, model: m}]"], None, ["a=n"])
