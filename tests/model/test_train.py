"""model/train.py: losses fall, exact resume after a kill, atomic checkpoints, schedule."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import capfilt.model.train as train_module
from capfilt.model.med import MED
from capfilt.model.tokenizer import build_tokenizer
from capfilt.model.train import Checkpoints, TrainConfig, alpha_at, build_dataset, lr_at, train
from tests.model.test_data import make_input_dir
from tests.tiny_blip import IMAGE_SIZE, tiny_med


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_input_dir(tmp_path_factory.mktemp("train") / "in", 24)


def states_equal(a: dict, b: dict) -> list[str]:
    """Names of tensors that differ (bitwise) between two state dicts."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def adamw(model: MED) -> torch.optim.AdamW:
    return torch.optim.AdamW(train_module.param_groups(model, 0.05))


class Killed(Exception):
    pass


def kill_after(model: MED, forwards: int) -> None:
    """Make the model raise on its `forwards`+1-th forward call, like a process killed mid-step."""
    original, calls = model.forward, [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] > forwards:
            raise Killed
        return original(*args, **kwargs)

    model.forward = forward


def test_lr_schedule_and_alpha_ramp():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert lr_at(0, 1000, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 1000, cfg) == pytest.approx(1e-3)
    assert lr_at(10, 1000, cfg) == pytest.approx(1e-3)
    assert lr_at(505, 1000, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(1000, 1000, cfg) == pytest.approx(1e-5)
    assert lr_at(0, 50, cfg) == pytest.approx(1e-3 / 5)  # warm-up capped at a tenth of a short run
    # BLIP pretrain.py ramps alpha over 2 epochs (the default), its fine-tuning over 1.
    assert alpha_at(0, 100, 0.4, cfg) == 0.0
    assert alpha_at(100, 100, 0.4, cfg) == pytest.approx(0.2)
    assert alpha_at(200, 100, 0.4, cfg) == alpha_at(500, 100, 0.4, cfg) == pytest.approx(0.4)
    assert alpha_at(50, 100, 0.4, replace(cfg, alpha_rampup_epochs=1)) == pytest.approx(0.2)


def test_losses_fall_on_a_tiny_problem(tmp_path, tokenizer):
    """Eight distinct image-caption pairs, one batch each step: all three losses go down.

    A randomly initialised text encoder gives nearly the same [CLS] feature to every caption, so
    ITC and ITM start slowly; a faster-moving momentum encoder and no dropout help them along.
    """
    data = make_input_dir(tmp_path / "in", 8, shards=1)
    cfg = TrainConfig(epochs=30, batch_size=8, lr=2e-3, warmup_steps=4, min_lr=2e-4, log_every=5,
                      ckpt_every=1000, randaug_ops=0)
    model = tiny_med(queue_size=16, momentum=0.9, text_dropout=0.0)
    dataset = build_dataset([data], cfg, model.cfg.image_size)
    metrics = train(model, dataset, cfg, tmp_path / "run", tokenizer=tokenizer)
    assert metrics["step"] == metrics["total_steps"] == 30 and metrics["resumed_from"] is None
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(5, 31, 5))
    first, last = log[0], log[-1]
    assert last["loss_lm"] < 0.75 * first["loss_lm"]
    assert last["loss_itc"] < first["loss_itc"] and last["loss_itm"] < first["loss_itm"]
    assert last["loss"] < 0.8 * first["loss"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any((tmp_path / "run" / "tb").iterdir())  # TensorBoard event file
    assert metrics["rows"] == 8 and metrics["decode_reasons"] == {} and metrics["shard_problems"] == {}
    assert metrics["skipped"] == {"status": 0, "no_image": 0, "bad_text": 0, "no_text": 0, "schema": 0, "decode": 0}


def test_exact_resume_after_kill(tmp_path, data_dir, tokenizer):
    """2k steps straight == k steps, killed mid-step k+1, same command again (bitwise on CPU)."""
    # grad_accum 2 and 2 epochs of 3 steps: the kill and the resume fall mid-epoch, mid-accumulation.
    cfg = TrainConfig(epochs=2, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, log_every=2,
                      ckpt_every=2, keep_ckpts=3)
    image_size = IMAGE_SIZE
    straight = tiny_med(seed=0)
    metrics = train(straight, build_dataset([data_dir], cfg, image_size), cfg, tmp_path / "straight",
                    tokenizer=tokenizer)
    assert metrics["step"] == 6

    killed = tiny_med(seed=0)
    kill_after(killed, forwards=2 * 4 + 1)  # steps 1-4 done (checkpoint at 4), dies inside step 5
    with pytest.raises(Killed):
        train(killed, build_dataset([data_dir], cfg, image_size), cfg, tmp_path / "resumed", tokenizer=tokenizer)
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "step-00000004"

    # A different init (everything must come from the checkpoint), and DataLoader worker
    # processes this time: samples depend on (seed, epoch, row) only, not on who decodes them.
    resumed = tiny_med(seed=123)
    metrics = train(resumed, build_dataset([data_dir], cfg, image_size), replace(cfg, num_workers=2),
                    tmp_path / "resumed", tokenizer=tokenizer)
    assert metrics["resumed_from"] == 4 and metrics["step"] == 6
    assert states_equal(straight.state_dict(), resumed.state_dict()) == []
    # The queues and momentum encoders moved, so the comparison covered them for real.
    assert int(resumed.queue_ptr) != 0
    assert not torch.equal(resumed.vision_m.embeddings.patch_embedding.weight,
                           tiny_med(seed=0).vision_m.embeddings.patch_embedding.weight)
    # The log of the resumed run has no gap and no duplicate.
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_checkpoint_cut_mid_save_is_ignored(tmp_path, data_dir, tokenizer, monkeypatch):
    cfg = TrainConfig(epochs=1, max_steps=4, batch_size=4, lr=1e-3, warmup_steps=0, log_every=1,
                      ckpt_every=2, keep_ckpts=2)
    out = tmp_path / "run"
    dataset = build_dataset([data_dir], cfg, IMAGE_SIZE)

    real_save_model = train_module.save_model

    def save_then_die(model, path):
        """Write half of the model file of the step-4 checkpoint, then the process 'dies'."""
        real_save_model(model, path)
        if "step-00000004" in path:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise Killed

    monkeypatch.setattr(train_module, "save_model", save_then_die)
    with pytest.raises(Killed):
        train(tiny_med(), dataset, cfg, out, tokenizer=tokenizer)
    monkeypatch.undo()
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000002"
    assert (ckpts / ".tmp-step-00000004").is_dir()  # the partial save, never renamed into place

    expected = tiny_med(seed=5)
    assert Checkpoints(ckpts).load(expected, adamw(expected))["step"] == 2
    metrics = train(tiny_med(seed=7), dataset, cfg, out, tokenizer=tokenizer)
    assert metrics["resumed_from"] == 2 and metrics["step"] == 4
    assert not (ckpts / ".tmp-step-00000004").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002", "step-00000004"]


def test_corrupt_newest_checkpoint_falls_back(tmp_path, data_dir, tokenizer):
    cfg = TrainConfig(epochs=1, max_steps=4, batch_size=4, warmup_steps=0, log_every=1, ckpt_every=2)
    out = tmp_path / "run"
    model = tiny_med()
    train(model, build_dataset([data_dir], cfg, IMAGE_SIZE), cfg, out, tokenizer=tokenizer)
    ckpts = out / "checkpoints"
    newest = ckpts / "step-00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # torn write the rename did not protect against
    fresh = tiny_med(seed=3)
    with pytest.warns(UserWarning, match="step-00000004"):
        meta = Checkpoints(ckpts).load(fresh, adamw(fresh))
    assert meta["step"] == 2
    # Every file of a checkpoint is safetensors or JSON: nothing in it can be unpickled.
    assert {p.suffix for p in (ckpts / "step-00000002").iterdir()} == {".safetensors", ".json"}


def test_resume_refuses_a_changed_batch_size(tmp_path, data_dir, tokenizer):
    cfg = TrainConfig(max_steps=1, batch_size=4, warmup_steps=0, log_every=1, ckpt_every=1)
    dataset = build_dataset([data_dir], cfg, IMAGE_SIZE)
    train(tiny_med(), dataset, cfg, tmp_path / "run", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="train.batch_size changed"):
        train(tiny_med(), dataset, replace(cfg, batch_size=8, max_steps=2), tmp_path / "run", tokenizer=tokenizer)


def test_prompt_only_lm_and_too_small_data(tmp_path, data_dir, tokenizer):
    """Captioner fine-tuning settings run; a dataset smaller than one step is a clear error."""
    cfg = TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, log_every=1, itc=False, itm=False,
                      lm_prompt="a picture of ")
    metrics = train(tiny_med(), build_dataset([data_dir], cfg, IMAGE_SIZE), cfg, tmp_path / "cap",
                    tokenizer=tokenizer)
    assert "loss_lm" in metrics and "loss_itc" not in metrics and "loss_itm" not in metrics
    with pytest.raises(ValueError, match="cannot fill one step"):
        train(tiny_med(), build_dataset([data_dir], replace(cfg, batch_size=32), IMAGE_SIZE),
              replace(cfg, batch_size=32), tmp_path / "big", tokenizer=tokenizer)


def test_momentum_update_once_per_optimiser_step_under_accumulation(tmp_path, data_dir, tokenizer):
    """BLIP's EMA runs once per optimiser step (before its forward); with grad_accum 3 a step is
    three forwards, and the momentum encoders still move three times in three steps."""
    cfg = TrainConfig(max_steps=3, batch_size=2, grad_accum=3, warmup_steps=0, log_every=1, ckpt_every=10)
    model = tiny_med()
    calls = []
    real_update = model.momentum_update
    model.momentum_update = lambda: (calls.append(int(model.queue_ptr)), real_update())
    train(model, build_dataset([data_dir], cfg, IMAGE_SIZE), cfg, tmp_path / "run", tokenizer=tokenizer)
    # Before the first forward of each step: the queue has taken 0, 3 and 6 micro-batches of 2.
    assert calls == [0, 6, 12]
    # Without ITC there is nothing to distil: no EMA at all.
    calls.clear()
    train(model, build_dataset([data_dir], cfg, IMAGE_SIZE), replace(cfg, itc=False), tmp_path / "lm",
          tokenizer=tokenizer)
    assert calls == []


def test_weight_decay_reaches_every_trainable_parameter_as_blip():
    model = tiny_med()
    [group] = train_module.param_groups(model, 0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert group["weight_decay"] == 0.05 and len(group["params"]) == len(trainable)
    assert any(p is model.temp for p in group["params"])  # the temperature and 1-d tensors too
    assert not any(p is q for p in group["params"] for q in model.vision_m.parameters())  # momentum copies: no
