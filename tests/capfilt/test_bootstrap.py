"""Bootstrap bookkeeping: resume refuses a changed config or inputs, --new-round restarts a round."""

from __future__ import annotations

import json

import pytest

from capfilt.bootstrap import DONE, Bootstrap, BootstrapInputs, ResumeRefused, headline
from capfilt.config import ConfigError, load_config


def _boot(tmp_path, overrides=(), web="web"):
    inputs = BootstrapInputs(human=str(tmp_path / "human"), web=str(tmp_path / web))
    return Bootstrap(tmp_path / "work", inputs, load_config(overrides=list(overrides)), log=lambda _: None)


def test_resume_with_same_config_continues_at_first_unfinished_round(tmp_path):
    assert _boot(tmp_path).open() == 0
    (tmp_path / "work" / "round-0").mkdir()
    (tmp_path / "work" / "round-0" / DONE).write_text("{}")
    assert _boot(tmp_path).open() == 1
    assert (tmp_path / "work" / "config.yaml").is_file()


def test_changed_config_is_refused_naming_the_key(tmp_path):
    _boot(tmp_path).open()
    with pytest.raises(ResumeRefused, match=r"train\.lr"):
        _boot(tmp_path, ["train.lr=0.001"]).open()


def test_changed_inputs_are_refused(tmp_path):
    _boot(tmp_path).open()
    with pytest.raises(ResumeRefused, match="other inputs"):
        _boot(tmp_path, web="web2").open()


def test_new_round_keeps_finished_rounds_and_restarts_the_open_one(tmp_path):
    _boot(tmp_path).open()
    work = tmp_path / "work"
    (work / "round-0").mkdir()
    (work / "round-0" / DONE).write_text("{}")
    (work / "round-1" / "captioner").mkdir(parents=True)  # a half-finished round 1
    assert _boot(tmp_path, ["train.lr=0.001"]).open(new_round=True) == 1
    assert (work / "round-0" / DONE).is_file()
    assert not (work / "round-1").exists()
    assert json.loads((work / "bootstrap.json").read_text())["config"]["train"]["lr"] == 0.001


def test_finetune_roles_take_their_losses_and_budget(tmp_path):
    boot = _boot(tmp_path, ["bootstrap.captioner_epochs=3", "bootstrap.finetune_lr=0.0002",
                            "train.epochs=9"])
    cap, fil = boot.role_config("captioner").train, boot.role_config("filter").train
    assert (cap.lm, cap.itc, cap.itm, cap.epochs, cap.lr) == (True, False, False, 3, 0.0002)
    assert cap.lm_prompt == boot.cfg.run.caption.prompt
    assert (fil.lm, fil.itc, fil.itm, fil.lm_prompt) == (False, True, True, "")
    assert boot.role_config("pretrain").train.epochs == 9


def test_headline_reads_the_evaluation_keys():
    text = headline([{"round": 0, "retrieval": {"itm": {"i2t_r1": 0.25, "t2i_r1": 0.5}},
                      "captioning": {"cider_d": 1.5, "bleu_4": 0.3, "attributes": {"recall": 0.7}}},
                     {"round": 1, "filter": {"precision": 0.8, "recall": 0.6, "roc_auc": 0.9,
                                             "synthetic": {"kept_share": 0.4, "attributes_kept": 0.75}}}])
    assert "round 0: test TR@1 0.250 IR@1 0.500 | CIDEr 1.500 BLEU-4 0.300 attributes 0.700" in text
    assert "round 1: filter precision 0.800 recall 0.600 AUC 0.900; synthetic kept 0.400 (attributes 0.750)" in text


def test_threshold_quantile_is_checked_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="bootstrap.threshold_quantile"):
        _boot(tmp_path, ["bootstrap.threshold_quantile=1.5"]).run(1)
