"""capfilt/training.py and `capfilt pretrain` / `capfilt finetune`, end to end on tiny parquet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.config import ConfigError
from capfilt.pipelines.train import run_training
from capfilt.training import ROLES, TrainJob, build_model, resolve_config
from capfilt.model.med import MED
from capfilt.model.train import Checkpoints, param_groups
from tests.model.test_data import (
    COLOURS,
    left_right_image,
    make_input_dir,
    png_bytes,
    write_capfilt_shard,
    write_input_shard,
)
from tests.model.test_train import TINY

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A human dir (input shards, one failed download) and a CapFilt output root (texts lists)."""
    root = tmp_path_factory.mktemp("corpus")
    human = make_input_dir(root / "human", 12)
    write_input_shard(human / "zz-failed.parquet",
                      [{"key": "bad", "caption": "lost", "jpg": None, "status": "failed_to_download"}])
    jpg = [png_bytes(left_right_image(c)) for c in COLOURS]
    write_capfilt_shard(root / "capfilt" / "data" / "00000.parquet",
                        [{"key": f"w{i}", "jpg": jpg[i % 8], "texts": [f"web text {i}", f"synthetic {i}"]}
                         for i in range(8)])
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"overrides": TINY},
        "train": {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "log_every": 1, "ckpt_every": 2},
    }))
    return {"human": human, "capfilt": root / "capfilt", "config": config}


def test_roles_config_precedence(tmp_path):
    cfg = resolve_config("captioner")
    assert (cfg.train.itc, cfg.train.itm, cfg.train.lm) == (False, False, True)
    assert cfg.train.lm_prompt == "a picture of " and cfg.train.lr == 1e-5
    assert resolve_config("captioner", None, ['run.caption.prompt="a photo of "']).train.lm_prompt == "a photo of "
    cfg = resolve_config("filter", None, ["train.lr=3e-5"])
    assert (cfg.train.itc, cfg.train.itm, cfg.train.lm) == (True, True, False) and cfg.train.lr == 3e-5
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2.0e-5\n  epochs: 2\n")
    cfg = resolve_config("filter", path, ["train.epochs=3"])
    assert cfg.train.lr == 2e-5 and cfg.train.epochs == 3  # YAML beats the role, --set beats YAML
    pre = resolve_config("pretrain")
    assert pre.train.lr == 3e-4 and pre.train.lm_prompt == "" and pre.train.itc and pre.train.lm
    assert set(ROLES) == {"pretrain", "captioner", "filter"}
    with pytest.raises(ConfigError, match="role"):
        resolve_config("decoder")


def test_bad_model_config_names_the_key(tmp_path):
    job = TrainJob(role="pretrain", data=(), out=str(tmp_path))
    with pytest.raises(ConfigError, match="model.overrides.hidden"):
        build_model(resolve_config("pretrain", None, ["model.overrides.hidden=3"]), job)
    with pytest.raises(ConfigError, match="model.size"):
        build_model(resolve_config("pretrain", None, ["model.size=huge"]), job)
    # The packaged BERT is 384 wide: tiny's 128-wide text transformer cannot take it.
    with pytest.raises(ConfigError, match="model.text_init='packaged'.*text_hidden=128"):
        build_model(resolve_config("pretrain", None, ["model.text_init=packaged"]), job)
    with pytest.raises(ConfigError, match="model.text_init.*config.json"):
        build_model(resolve_config("pretrain", None, ["model.size=small", f"model.text_init={tmp_path}"]), job)


def test_small_model_starts_from_the_packaged_bert(tmp_path):
    from capfilt.model.bert_init import packaged_bert_dir
    from safetensors import safe_open

    job = TrainJob(role="pretrain", data=(), out=str(tmp_path))
    model = build_model(resolve_config("pretrain", None, ["model.size=small", "model.text_init=packaged"]), job)
    with safe_open(str(packaged_bert_dir() / "model.safetensors"), framework="pt") as bert:
        expected = bert.get_tensor("encoder.layer.2.output.dense.weight")
    assert torch.equal(model.text_encoder.encoder.layer[2].output.dense.weight.detach(), expected)


def test_crop_scale_is_checked(tmp_path):
    from capfilt.model.train import TrainConfig, build_dataset

    with pytest.raises(ValueError, match="train.crop_scale_min"):
        build_dataset([tmp_path], TrainConfig(crop_scale_min=0.0), image_size=32)


def test_pretrain_then_finetune_cli(tmp_path, corpus):
    out = tmp_path / "pre"
    args = ["pretrain", "--data", str(corpus["human"]), "--data", str(corpus["capfilt"]), "--out", str(out),
            "--config", str(corpus["config"]), "--set", "train.seed=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["rows"] == 20 and metrics["read"] == 21
    assert metrics["skipped"]["status"] == 1
    assert metrics["formats"] == ["capfilt", "input"]
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss_itc", "loss_itm", "loss_lm"))
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["seed"] == 1 and resolved["model"]["overrides"]["image_size"] == 32
    med = MED.load(out / "med")
    assert med.cfg.image_size == 32 and int(med.queue_ptr) != 0  # trained, queues included

    # The same command again resumes at the end: nothing is trained twice, the model is unchanged.
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == 3
    reloaded = MED.load(out / "med").state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in med.state_dict().items())
    # Another job into the same folder is refused instead of resuming the wrong checkpoints.
    other = runner.invoke(app, ["pretrain", "--data", str(corpus["human"]), "--out", str(out),
                                "--config", str(corpus["config"])])
    assert other.exit_code == 2 and "another job" in other.output

    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    cap_out = tmp_path / "cap"
    result = runner.invoke(app, ["finetune", "--role", "captioner", "--data", str(corpus["human"]),
                                 "--init", str(out / "med"), "--out", str(cap_out),
                                 "--config", str(corpus["config"]), "--set", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((cap_out / "metrics.json").read_text())
    assert "loss_lm" in metrics and "loss_itc" not in metrics and "loss_itm" not in metrics
    assert yaml.safe_load((cap_out / "config.yaml").read_text())["train"]["lm_prompt"] == "a picture of "
    captioner = BlipForConditionalGeneration.from_pretrained(cap_out / "captioner")
    assert captioner.config.vision_config.image_size == 32
    assert (cap_out / "med" / "model.safetensors").is_file()

    fil_out = tmp_path / "fil"
    result = runner.invoke(app, ["finetune", "--role", "filter", "--data", str(corpus["capfilt"]),
                                 "--init", str(out / "med"), "--out", str(fil_out),
                                 "--config", str(corpus["config"]), "--set", "train.max_steps=1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((fil_out / "metrics.json").read_text())
    assert "loss_itc" in metrics and "loss_itm" in metrics and "loss_lm" not in metrics
    BlipForImageTextRetrieval.from_pretrained(fil_out / "filter")

    # The exported transformers folders are valid --init-blip inputs (as published BLIP ones are).
    blip_out = tmp_path / "blip"
    result = runner.invoke(app, ["finetune", "--role", "filter", "--data", str(corpus["human"]),
                                 "--init-blip", str(cap_out / "captioner"), str(fil_out / "filter"),
                                 "--out", str(blip_out), "--config", str(corpus["config"]),
                                 "--set", "train.max_steps=1"])
    assert result.exit_code == 0, result.output
    assert json.loads((blip_out / "job.json").read_text())["init_blip"] == [str(cap_out / "captioner"),
                                                                            str(fil_out / "filter")]
    assert MED.load(blip_out / "med").cfg.vision_hidden == TINY["vision_hidden"]


def test_finetune_needs_a_pretrained_model_and_a_known_role(tmp_path, corpus):
    result = runner.invoke(app, ["finetune", "--role", "filter", "--data", str(corpus["human"]),
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--init" in result.output
    result = runner.invoke(app, ["finetune", "--role", "decoder", "--data", str(corpus["human"]),
                                 "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "captioner or filter" in result.output


def test_ray_train_two_gloo_workers(tmp_path, corpus, ray_restarted_after):
    """Two DDP workers on CPU: ranks end identical (checked inside train), losses finite, exported."""
    cfg = resolve_config("pretrain", corpus["config"], ["train_resources.workers=2", "train.max_steps=2",
                                                         "train.batch_size=2"])
    job = TrainJob(role="pretrain", data=(str(corpus["human"]), str(corpus["capfilt"])), out=str(tmp_path / "ddp"))
    metrics = run_training(job, cfg)
    assert metrics["world_size"] == 2 and metrics["step"] == 2
    assert metrics["steps_per_epoch"] == 20 // (2 * 2)  # the data is sharded across the two ranks
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss", "loss_itc", "loss_itm", "loss_lm"))
    assert MED.load(Path(job.out) / "med").cfg.image_size == 32
    meta = json.loads((Path(job.out) / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= set(meta["files"])


# Runs `capfilt pretrain ARGS` in a process that SIGKILLs itself in the middle of its second
# checkpoint save: the optimizer file is written, meta.json is not, nothing is renamed yet.
KILLED_MID_SAVE = """
import os, signal, sys
import capfilt.model.train as train
real_save_file = train.save_file
def save_then_die(tensors, path, *args, **kwargs):
    real_save_file(tensors, path, *args, **kwargs)
    if os.path.basename(str(path)) == "optimizer.safetensors" and ".tmp-step-00000002" not in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
train.save_file = save_then_die
from capfilt.cli import app
app(args=sys.argv[1:], prog_name="capfilt")
"""


def test_pretrain_killed_mid_save_keeps_its_checkpoint_and_resumes(tmp_path, corpus):
    args = ["pretrain", "--data", str(corpus["human"]), "--config", str(corpus["config"]),
            "--set", "train.max_steps=4", "--set", "train.seed=2"]
    reference = runner.invoke(app, [*args, "--out", str(tmp_path / "ref")])
    assert reference.exit_code == 0, reference.output

    out = tmp_path / "killed"
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, *args, "--out", str(out)], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000002"
    [torn] = ckpts.glob(".tmp-step-*")  # the cut save, never renamed into place
    assert (torn / "optimizer.safetensors").is_file() and not (torn / "meta.json").exists()
    # The previous checkpoint still loads as it is ...
    fresh = build_model(resolve_config("pretrain", corpus["config"]), TrainJob(role="pretrain", data=(), out=str(out)))
    assert Checkpoints(ckpts).load(fresh, torch.optim.AdamW(param_groups(fresh, 0.05)))["step"] == 2
    # ... and the same command resumes from it to the weights of the uninterrupted run.
    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == 2
    assert not torn.exists()
    want, got = MED.load(tmp_path / "ref" / "med").state_dict(), MED.load(out / "med").state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
