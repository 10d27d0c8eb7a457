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
from capfilt.config import ConfigError, load_config
from capfilt.pipelines.train import run_training
from capfilt.training import ROLES, TrainJob, build_model, role_config
from capfilt.model.med import MED
from capfilt.model.train import Checkpoints, param_groups
from tests.model.test_data import (
    COLOURS,
    left_right_image,
    make_input_dir,
    write_capfilt_shard,
)
from tests.tiny_blip import TINY_MED, bert_config, encode, med_scores, row, vit_config, write_shard

runner = CliRunner()


def resolve_config(role, path=None, overrides=()):
    """What `capfilt pretrain|finetune --config PATH --set ...` trains `role` with."""
    return role_config(load_config(path, overrides), role)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A human dir (input shards, one failed download) and a CapFilt output root (texts lists)."""
    root = tmp_path_factory.mktemp("corpus")
    human = make_input_dir(root / "human", 12)
    write_shard(human / "zz-failed.parquet", [row("bad", "lost", None)])
    jpg = [encode(left_right_image(c)) for c in COLOURS]
    write_capfilt_shard(root / "capfilt" / "data" / "00000.parquet",
                        [{"key": f"w{i}", "jpg": jpg[i % 8], "texts": [f"web text {i}", f"synthetic {i}"]}
                         for i in range(8)])
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"overrides": TINY_MED},
        "train": {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "log_every": 1, "ckpt_every": 2},
    }))
    return {"human": human, "capfilt": root / "capfilt", "config": config}


def test_roles_config_precedence(tmp_path):
    cfg = resolve_config("captioner")
    assert (cfg.train.itc, cfg.train.itm, cfg.train.lm) == (False, False, True)
    assert cfg.train.lm_prompt == "a picture of " and cfg.train.lr == 1e-5
    assert resolve_config("captioner", None, ['run.caption.prompt="a photo of "']).train.lm_prompt == "a photo of "
    cfg = resolve_config("filter", None, ["finetune.lr=3e-5"])
    assert (cfg.train.itc, cfg.train.itm, cfg.train.lm) == (True, True, False) and cfg.train.lr == 3e-5
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  lr: 2.0e-5\n  filter_epochs: 2\n")
    cfg = resolve_config("filter", path, ["finetune.filter_epochs=3"])
    assert cfg.train.lr == 2e-5 and cfg.train.epochs == 3  # --set beats YAML
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


def test_crop_scale_is_checked():
    with pytest.raises(ConfigError, match=r"train.crop_scale_min must be within \(0, 1\], got 0"):
        load_config(None, ["train.crop_scale_min=0.0"])


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
    assert other.exit_code == 1 and "another job" in other.output

    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    cap_out = tmp_path / "cap"
    result = runner.invoke(app, ["finetune", "--role", "captioner", "--data", str(corpus["human"]),
                                 "--init", str(out / "med"), "--out", str(cap_out),
                                 "--config", str(corpus["config"]), "--set", "finetune.max_steps=2"])
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
                                 "--config", str(corpus["config"]), "--set", "finetune.max_steps=1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((fil_out / "metrics.json").read_text())
    assert "loss_itc" in metrics and "loss_itm" in metrics and "loss_lm" not in metrics
    BlipForImageTextRetrieval.from_pretrained(fil_out / "filter")

    # The exported transformers folders are valid --init-blip inputs (as published BLIP ones are).
    blip_out = tmp_path / "blip"
    result = runner.invoke(app, ["finetune", "--role", "filter", "--data", str(corpus["human"]),
                                 "--init-blip", str(cap_out / "captioner"), str(fil_out / "filter"),
                                 "--out", str(blip_out), "--config", str(corpus["config"]),
                                 "--set", "finetune.max_steps=1"])
    assert result.exit_code == 0, result.output
    assert json.loads((blip_out / "job.json").read_text())["init_blip"] == [str(cap_out / "captioner"),
                                                                            str(fil_out / "filter")]
    assert MED.load(blip_out / "med").cfg.vision_hidden == TINY_MED["vision_hidden"]


def test_finetune_needs_a_pretrained_model_and_a_known_role(tmp_path, corpus):
    result = runner.invoke(app, ["finetune", "--role", "filter", "--data", str(corpus["human"]),
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--init" in result.output
    result = runner.invoke(app, ["finetune", "--role", "decoder", "--data", str(corpus["human"]),
                                 "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and "captioner or filter" in result.output


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


def test_pretrain_from_published_layout_folders(tmp_path, corpus, published_blip_dirs):
    """--init-blip on folders laid out as the published ones (their tokenizer has neither [DEC] nor
    [ENC]): MED takes BLIP's ids 30522/30523, scores as the published filter does with [ENC] first,
    and pre-trains with all three losses."""
    from transformers import BlipForImageTextRetrieval

    cap, fil = str(published_blip_dirs["captioner"]), str(published_blip_dirs["filter"])
    med = MED.from_blip(cap, fil).eval()
    assert (med.cfg.dec_token_id, med.cfg.enc_token_id, med.cfg.vocab_size) == (30522, 30523, 30524)
    stock = BlipForImageTextRetrieval.from_pretrained(fil, use_safetensors=True).eval()
    pixels = torch.randn(2, 3, med.cfg.image_size, med.cfg.image_size)
    ids = torch.tensor([[101, 1037, 2417, 3608, 102], [101, 2048, 8870, 102, 0]])
    mask = (ids != 0).long()
    enc_ids = ids.clone()
    enc_ids[:, 0] = 30523
    with torch.no_grad():
        expected = stock(input_ids=enc_ids, attention_mask=mask, pixel_values=pixels).itm_score.softmax(-1)[:, 1]
    # MED's own attention code against stock's: fp32 sums in another order (2.4e-6 here, a quarter of
    # the old 1e-5; [CLS] instead of [ENC] first moves a score by ~0.04).
    torch.testing.assert_close(med_scores(med, pixels, ids, mask)["itm"], expected, atol=1e-4, rtol=0)

    out = tmp_path / "pub"
    result = runner.invoke(app, ["pretrain", "--data", str(corpus["human"]), "--init-blip", cap, fil,
                                 "--out", str(out), "--config", str(corpus["config"]), "--set", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and all(torch.isfinite(torch.tensor(metrics[k]))
                                        for k in ("loss_itc", "loss_itm", "loss_lm"))
    trained = MED.load(out / "med")
    assert (trained.cfg.dec_token_id, trained.cfg.enc_token_id, trained.cfg.image_size) == (30522, 30523, 32)


# --- training as BLIP did -----------------------------------------------------------------------


def test_roles_take_blips_crop_text_length_and_alpha_ramp():
    pre, cap, fil = (resolve_config(role).train for role in ("pretrain", "captioner", "filter"))
    assert (pre.crop_scale_min, pre.max_text_len, pre.alpha_rampup_epochs) == (0.2, 30, 2)  # pretrain.py
    assert (cap.crop_scale_min, cap.max_text_len, cap.alpha_rampup_epochs) == (0.5, 40, 1)  # train_caption.py
    assert (fil.crop_scale_min, fil.max_text_len, fil.alpha_rampup_epochs) == (0.5, 35, 1)  # train_retrieval.py
    # The demo's deliberate settings hold in the fine-tunings too.
    demo = resolve_config("captioner", DEMO_CONFIG).train
    assert (demo.crop_scale_min, demo.randaug_ops) == (0.9, 0)


def test_finetune_image_size_defaults_to_blips_384_for_base_and_large():
    from capfilt.model.med import med_config
    from capfilt.training import finetune_image_size

    cfg = resolve_config("filter")
    assert finetune_image_size(cfg, med_config("base")) == finetune_image_size(cfg, med_config("large")) == 384
    assert finetune_image_size(cfg, med_config("small")) == med_config("small").image_size  # the demo's
    assert finetune_image_size(resolve_config("filter", None, ["finetune.image_size=448"]), med_config("base")) == 448


def test_finetune_at_a_larger_size_exports_folders_at_that_size(tmp_path, corpus):
    """A tiny MED pre-trained at 32 px fine-tuned at 48 px: the position grid is BLIP's bicubic
    interpolation of the pre-trained one (lr 0 keeps it as interpolated), the exported folders say
    48 px, load with plain from_pretrained and run at 48 px, and the pipeline reads 48 from them."""
    import torch.nn.functional as F
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.images import load_image_spec

    pre = tmp_path / "pre"
    assert runner.invoke(app, ["pretrain", "--data", str(corpus["human"]), "--out", str(pre),
                               "--config", str(corpus["config"]), "--set", "train.max_steps=1"]).exit_code == 0
    grid = MED.load(pre / "med").vision.embeddings.position_embedding.detach()  # [1, 1 + 4*4, D]
    expected_grid = F.interpolate(grid[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 6),
                                  mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, -1)
    assert grid.shape[1] == 1 + 16
    for role in ("captioner", "filter"):
        out = tmp_path / role
        result = runner.invoke(app, ["finetune", "--role", role, "--data", str(corpus["human"]), "--init",
                                     str(pre / "med"), "--out", str(out), "--config", str(corpus["config"]),
                                     "--set", "finetune.max_steps=1", "--set", "finetune.lr=0", "--set",
                                     "finetune.image_size=48"])
        assert result.exit_code == 0, result.output
        med = MED.load(out / "med")
        assert med.cfg.image_size == 48
        positions = med.vision.embeddings.position_embedding.detach()  # [1, 1 + 6*6, D]
        torch.testing.assert_close(positions[:, :1], grid[:, :1], rtol=0, atol=0)  # class token kept
        torch.testing.assert_close(positions[:, 1:], expected_grid, rtol=0, atol=1e-6)
        folder = out / role
        assert json.loads((folder / "config.json").read_text())["vision_config"]["image_size"] == 48
        assert load_image_spec(folder).size == 48  # preprocessor_config.json: what the pipeline decodes at
        pixels = torch.randn(1, 3, 48, 48)
        if role == "captioner":
            hf = BlipForConditionalGeneration.from_pretrained(folder, use_safetensors=True).eval()
            torch.testing.assert_close(hf.vision_model.embeddings.position_embedding.detach(),
                                       med.vision.embeddings.position_embedding.detach())
            assert hf.generate(pixel_values=pixels, max_new_tokens=3).shape[0] == 1
        else:
            hf = BlipForImageTextRetrieval.from_pretrained(folder, use_safetensors=True).eval()
            ids = torch.tensor([[101, 2023, 102]])
            assert hf(input_ids=ids, pixel_values=pixels).itm_score.shape == (1, 2)


def test_model_vision_init_and_text_init_from_folders(tmp_path):
    """`model.vision_init` (a ViT folder) and `model.text_init` (a BertForMaskedLM folder, laid out as
    bert-base-uncased) start a fresh MED; a folder that does not fit is refused naming the key."""
    from safetensors import safe_open
    from transformers import BertForMaskedLM, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(vit_config())
    vit.save_pretrained(tmp_path / "vit", safe_serialization=True)
    bert = BertForMaskedLM(bert_config())
    bert.save_pretrained(tmp_path / "bert", safe_serialization=True)
    settings = [f"model.overrides.{k}={v}" for k, v in TINY_MED.items()]
    job = TrainJob(role="pretrain", data=(), out=str(tmp_path / "out"))
    model = build_model(resolve_config("pretrain", None, [*settings, f"model.vision_init={tmp_path / 'vit'}",
                                                          f"model.text_init={tmp_path / 'bert'}"]), job)
    with safe_open(str(tmp_path / "vit" / "model.safetensors"), framework="pt") as saved:
        torch.testing.assert_close(model.vision.encoder.layers[1].mlp.fc2.weight.detach(),
                                   saved.get_tensor("vit.encoder.layer.1.output.dense.weight"))
    with safe_open(str(tmp_path / "bert" / "model.safetensors"), framework="pt") as saved:
        torch.testing.assert_close(model.text_encoder.encoder.layer[1].output.dense.weight.detach(),
                                   saved.get_tensor("bert.encoder.layer.1.output.dense.weight"))
    with pytest.raises(ConfigError, match=r"model.vision_init=.*MEDConfig.vision_hidden=192 but the ViT's "
                                          r"hidden_size is 64"):
        build_model(resolve_config("pretrain", None, [f"model.vision_init={tmp_path / 'vit'}"]), job)


DEMO_CONFIG = Path(__file__).resolve().parents[2] / "capfilt" / "configs" / "demo.yaml"


def test_pretrain_on_the_bad_input_corpus(tmp_path, monkeypatch):
    """Round 0 trains on raw web shards: the hostile corpus of tests/bad_input.py goes through
    `capfilt pretrain` decoded by the pipeline's decoder with the run's limits. No crash, every
    row accounted for, every refused image counted with its reason, and PIL's EPS plugin (which
    would start Ghostscript) never touched."""
    import collections
    import subprocess

    from PIL import EpsImagePlugin

    from capfilt.images import ImageError, decode_image
    from tests.bad_input import IMAGE_CONFIG, IMAGE_SETTINGS, PROCESSED, image_cases, write_corpus

    expected = write_corpus(tmp_path / "input")
    eps_opened, ghostscript = [], []

    def eps_open(self):
        eps_opened.append(True)
        raise SyntaxError("the EPS plugin must not be reached")

    real_popen = subprocess.Popen

    def popen(args, *rest, **kwargs):
        if any("gs" == Path(str(a)).name for a in (args if isinstance(args, (list, tuple)) else [args])):
            ghostscript.append(args)
        return real_popen(args, *rest, **kwargs)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", eps_open)
    monkeypatch.setattr(subprocess, "Popen", popen)
    refused = {}
    for name, (data, outcome) in image_cases().items():
        if outcome is not PROCESSED:
            with pytest.raises(ImageError) as err:
                decode_image(data, IMAGE_CONFIG)
            refused[name] = err.value.reason
    assert eps_opened == []  # the decoder itself never offers EPS bytes to the plugin

    # One epoch of batch 1: every row is sampled, so every bad image is met once.
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": {"overrides": TINY_MED},
                                      "train": {"epochs": 1, "batch_size": 1, "warmup_steps": 0,
                                                "log_every": 1000, "ckpt_every": 1000}}))
    args = ["pretrain", "--data", str(tmp_path / "input"), "--out", str(tmp_path / "out"), "--config", str(config)]
    for item in IMAGE_SETTINGS:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["read"] == len(expected)
    skipped = metrics["skipped"]
    assert metrics["read"] == metrics["rows"] + sum(v for k, v in skipped.items() if k != "decode")
    assert skipped["status"] == 1 and skipped["schema"] == 2 and skipped["bad_text"] == 2
    assert skipped["decode"] == len(refused)
    assert metrics["decode_reasons"] == dict(collections.Counter(refused.values()))
    assert list(metrics["shard_problems"]) == [str(tmp_path / "input" / "08_missing_image_column.parquet")]
    assert "images refused by reason" in result.output and "08_missing_image_column" in result.output
    assert eps_opened == [] and ghostscript == []


def test_pretrain_reads_object_storage_as_it_reads_folders(tmp_path, corpus, s3):
    """`--data s3://...` (input shards, and a CapFilt output root resolved to its data/ part) trains
    on the same rows in the same order as the local folders: the same weights, bit for bit."""
    from capfilt.storage import location

    bucket = s3.bucket()
    for path in sorted(corpus["human"].glob("*.parquet")) + sorted((corpus["capfilt"] / "data").glob("*.parquet")):
        relative = path.relative_to(corpus["human"].parent)
        (location(f"s3://{bucket}") / str(relative)).write_bytes(path.read_bytes())
    common = ["--config", str(corpus["config"]), "--set", "train.max_steps=2", "--set", "train.ckpt_every=100"]
    local = runner.invoke(app, ["pretrain", "--data", str(corpus["human"]), "--data", str(corpus["capfilt"]),
                                "--out", str(tmp_path / "local"), *common])
    assert local.exit_code == 0, local.output
    remote = runner.invoke(app, ["pretrain", "--data", f"s3://{bucket}/human", "--data", f"s3://{bucket}/capfilt",
                                 "--out", str(tmp_path / "remote"), *common])
    assert remote.exit_code == 0, remote.output
    got, want = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("remote", "local"))
    assert (got["rows"], got["read"], got["skipped"]) == (want["rows"], want["read"], want["skipped"])
    assert json.loads((tmp_path / "remote" / "job.json").read_text())["data"] == [
        f"s3://{bucket}/human", f"s3://{bucket}/capfilt"]
    a, b = MED.load(tmp_path / "local" / "med").state_dict(), MED.load(tmp_path / "remote" / "med").state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
