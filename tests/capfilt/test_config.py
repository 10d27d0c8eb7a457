"""The config loader: YAML, dotted overrides, errors that name the key, the resolved config."""

from __future__ import annotations

import pytest
import yaml

from capfilt.config import Config, ConfigError, load_config, parse_override, write_resolved


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
