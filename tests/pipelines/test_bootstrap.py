"""Bootstrap bookkeeping (resume refuses a changed config or inputs, --new-round restarts a round),
and `capfilt demo` / `capfilt bootstrap` end to end on a tiny world."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from capfilt.pipelines.bootstrap import DONE, Bootstrap, BootstrapInputs, ResumeRefused, headline
from capfilt import schema
from capfilt.cli import app
from capfilt.commands.bootstrap import DEMO_CONFIG
from capfilt.config import ConfigError, load_config
from capfilt.training import role_config
from tests.tiny_blip import TINY_MED

runner = CliRunner()


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


class Captured(Exception):
    """Stops a training at its start, carrying the config it was given."""


def _capture_training(monkeypatch) -> list:
    """Record the (job, config) every training is started with, instead of training."""
    import capfilt.pipelines.train

    seen = []

    def record(job, cfg):
        seen.append((job, cfg))
        raise Captured()

    monkeypatch.setattr(capfilt.pipelines.train, "run_training", record)
    return seen


def test_finetune_roles_take_their_losses_and_budget(tmp_path):
    cfg = load_config(overrides=["finetune.captioner_epochs=3", "finetune.lr=0.0002", "train.epochs=9"])
    cap, fil = role_config(cfg, "captioner").train, role_config(cfg, "filter").train
    assert (cap.lm, cap.itc, cap.itm, cap.epochs, cap.lr) == (True, False, False, 3, 0.0002)
    assert cap.lm_prompt == cfg.run.caption.prompt
    assert (fil.lm, fil.itc, fil.itm, fil.lm_prompt, fil.epochs) == (False, True, True, "", 6)
    assert role_config(cfg, "pretrain").train.epochs == 9
    # BLIP's settings per role where the config leaves them: pretrain.py, train_caption.py,
    # train_retrieval.py (crop scale, text length, alpha ramp) ...
    pre = role_config(cfg, "pretrain").train
    assert (pre.crop_scale_min, pre.max_text_len, pre.alpha_rampup_epochs) == (0.2, 30, 2)
    assert (cap.crop_scale_min, cap.max_text_len, cap.alpha_rampup_epochs) == (0.5, 40, 1)
    assert (fil.crop_scale_min, fil.max_text_len, fil.alpha_rampup_epochs) == (0.5, 35, 1)
    # ... and the config's own values where it sets them (the demo's 0.9).
    demo = load_config(DEMO_CONFIG)
    for role in ("captioner", "filter"):
        assert (role_config(demo, role).train.crop_scale_min, role_config(demo, role).train.randaug_ops) == (0.9, 0)


def test_finetune_and_bootstrap_train_a_role_alike_from_one_yaml(tmp_path, monkeypatch):
    """`capfilt finetune --config X` and the bootstrap's fine-tuning with the same X start the
    same training: one rule, whatever the YAML sets."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"lr": 0.002, "epochs": 7, "warmup_steps": 5, "crop_scale_min": 0.7,
                                                "batch_size": 3},
                                      "finetune": {"captioner_epochs": 2, "lr": 3.0e-5},
                                      "run": {"caption": {"prompt": "a photo of "}}}))
    seen = _capture_training(monkeypatch)
    for role in ("captioner", "filter"):
        result = runner.invoke(app, ["finetune", "--role", role, "--data", str(tmp_path), "--init", str(tmp_path),
                                     "--out", str(tmp_path / "cli"), "--config", str(config)])
        assert isinstance(result.exception, Captured), result.output
        boot = Bootstrap(tmp_path / "work", BootstrapInputs(human="h", web="w"), load_config(config), log=print)
        with pytest.raises(Captured):
            boot._train(role, [str(tmp_path)], tmp_path / role, init=str(tmp_path))
    (_, cli_cap), (_, boot_cap), (_, cli_fil), (_, boot_fil) = seen
    assert cli_cap.train == boot_cap.train and cli_fil.train == boot_fil.train
    assert (cli_cap.train.epochs, cli_cap.train.lr, cli_cap.train.warmup_steps) == (2, 3e-5, 0)
    assert (cli_cap.train.crop_scale_min, cli_cap.train.batch_size, cli_cap.train.lm_prompt) == (0.7, 3, "a photo of ")
    assert (cli_fil.train.epochs, cli_fil.train.max_text_len) == (6, 35)


def test_a_second_prompt_is_refused():
    with pytest.raises(ConfigError, match="run.caption.prompt"):
        role_config(load_config(overrides=['train.lm_prompt="a photo of "']), "captioner")


def test_headline_reads_the_evaluation_keys():
    text = headline([{"round": 0, "retrieval": {"itm": {"i2t_r1": 0.25, "t2i_r1": 0.5}},
                      "captioning": {"cider_d": 1.5, "bleu_4": 0.3, "attributes": {"recall": 0.7}}},
                     {"round": 1, "filter": {"precision": 0.8, "recall": 0.6, "roc_auc": 0.9,
                                             "synthetic": {"kept_share": 0.4, "attributes_kept": 0.75}}}])
    assert "round 0: test TR@1 0.250 IR@1 0.500 | CIDEr 1.500 BLEU-4 0.300 attributes 0.700" in text
    assert "round 1: filter precision 0.800 recall 0.600 AUC 0.900; synthetic kept 0.400 (attributes 0.750)" in text
    text = headline([{"round": 1, "audit": {"at_threshold": {"clean_keep_rate": 0.9, "precision": 0.7, "recall": 0.8},
                                            "roc_auc": 0.95, "noise_share": {"estimate": 0.4},
                                            "warnings": ["the captioner's captions score below ..."]}}])
    assert ("round 1: audit (label-free, held-out human pairs): clean kept 0.900 AUC 0.950 noise share 0.400 "
            "precision 0.700 recall 0.800") in text
    assert "\n  WARNING: the captioner's captions score below ..." in text
    scorers = {"clip": {"at_threshold": {"clean_keep_rate": 0.85}, "threshold": 0.25, "roc_auc": 0.9},
               "sig": {"at_threshold": None, "threshold": None, "roc_auc": 0.8}}
    text = headline([{"round": 1, "audit": {"at_threshold": {"clean_keep_rate": 0.9, "precision": 0.7, "recall": 0.8},
                                            "roc_auc": 0.95, "scorers": scorers}}])
    assert "\n  audit scorer clip: clean kept 0.850 at threshold 0.250 AUC 0.900" in text
    assert "\n  audit scorer sig: clean kept n/a at threshold n/a AUC 0.800" in text


def test_human_split_is_done_once_and_redone_when_the_share_changes(tmp_path):
    from tests.tiny_blip import shard_rows, write_shard

    write_shard(tmp_path / "human" / "00000.parquet", shard_rows("h", 40, failed=0, corrupt=0))
    logs = []
    boot = Bootstrap(tmp_path / "work", BootstrapInputs(human=str(tmp_path / "human"), web=str(tmp_path / "web")),
                     load_config(overrides=["bootstrap.audit_holdout=0.25"]), log=logs.append)
    boot._split_human()
    boot._split_human()
    assert logs[0].startswith("[run ]") and logs[2].startswith("[skip]")
    held = pq.read_table(tmp_path / "work" / "human-split" / "audit").num_rows
    assert boot._finetune_human() == str(tmp_path / "work" / "human-split" / "finetune")
    boot.cfg = load_config(overrides=["bootstrap.audit_holdout=0.5"])  # as --new-round would bring it
    boot._split_human()
    assert "bootstrap.audit_holdout changed from 0.25" in logs[3]
    assert pq.read_table(tmp_path / "work" / "human-split" / "audit").num_rows > held
    boot.cfg = load_config(overrides=["bootstrap.audit_holdout=0"])
    assert boot._finetune_human() == str(tmp_path / "human")  # no audit: fine-tune on every pair


def test_round_audit_reads_the_held_out_slice_and_logs_every_warning(tmp_path, monkeypatch):
    import capfilt.audit

    calls = []
    monkeypatch.setattr(capfilt.audit, "audit", lambda *args, **kwargs: calls.append((args, kwargs))
                        or {"warnings": ["w1", "w2"]})
    logs = []
    boot = Bootstrap(tmp_path / "work", BootstrapInputs(human=str(tmp_path / "human"), web=str(tmp_path / "web")),
                     load_config(), log=logs.append)
    boot._audit(2, tmp_path / "cap", tmp_path / "filt")
    args, kwargs = calls[0]
    assert args[1:] == (tmp_path / "filt", tmp_path / "work" / "human-split" / "audit", tmp_path / "cap")
    assert kwargs == {"threshold": 0.5}  # before the CapFilt run, at the threshold it will use
    assert logs == ["WARNING round 2: w1", "WARNING round 2: w2"]


def _planted_audit(keep: str) -> dict:
    """An audit result as capfilt.audit.audit returns it, with a planted synthetic decision."""
    return {"threshold": 0.3125, "warnings": [],
            "synthetic_decision": {"keep": keep, "keep_synthetic": keep == "both", "reason": f"planted: {keep}"}}


@pytest.mark.parametrize("keep", ["both", "web"])
def test_keep_auto_runs_capfilt_with_the_audits_decision(tmp_path, monkeypatch, keep):
    import capfilt.audit

    monkeypatch.setattr(capfilt.audit, "audit", lambda *args, **kwargs: _planted_audit(keep))
    logs = []
    boot = Bootstrap(tmp_path / "work", BootstrapInputs(human=str(tmp_path / "human"), web=str(tmp_path / "web")),
                     load_config(overrides=["run.filter.keep=auto"]), log=logs.append)
    audit = boot._audit(1, tmp_path / "cap", tmp_path / "filt")
    assert logs == [f"round 1: run.filter.keep=auto -> {keep}: planted: {keep}"]
    run = boot._run_config(1, tmp_path / "cap", tmp_path / "filt", audit).run
    assert run.filter.keep == keep and run.filter.threshold == 0.3125 and run.round == 1
    assert run.caption.model == str(tmp_path / "cap") and run.filter.model == str(tmp_path / "filt")


def test_each_scorer_threshold_is_calibrated_per_round_and_the_run_uses_the_audits(tmp_path, monkeypatch):
    """A scorer with threshold_quantile gets the round's calibrated threshold (one calibration pass
    with ITM's), rounded; the audit is made at those thresholds and the run takes the audit's."""
    import capfilt.audit
    import capfilt.calibrate

    passes, audits = [], []
    monkeypatch.setattr(capfilt.calibrate, "human_thresholds", lambda *args: passes.append(args)
                        or {"itm": 0.123456, "clip": 0.2345678})
    boot = _boot(tmp_path, ["bootstrap.threshold_quantile=0.1", "run.scorers=[{name: clip, model: C, "
                            "threshold_quantile: 0.2}, {name: sig, model: S, threshold: 0.7}]"])
    run = boot._run_config(1, tmp_path / "cap", tmp_path / "filt", None).run
    assert len(passes) == 1 and passes[0][0] == tmp_path / "filt"
    assert run.filter.threshold == 0.1235
    assert [(s.name, s.threshold) for s in run.scorers] == [("clip", 0.2346), ("sig", 0.7)]
    monkeypatch.setattr(capfilt.audit, "audit", lambda cfg, *args, **kwargs: audits.append(cfg) or {
        "threshold": kwargs["threshold"], "warnings": [],
        "scorers": {s.name: {"threshold": s.threshold} for s in cfg.run.scorers}})
    audit = boot._audit(1, tmp_path / "cap", tmp_path / "filt")
    assert [(s.name, s.threshold) for s in audits[0].run.scorers] == [("clip", 0.2346), ("sig", 0.7)]
    audit["scorers"]["clip"]["threshold"] = 0.5  # a resumed round runs at the thresholds its audit used
    run = boot._run_config(1, tmp_path / "cap", tmp_path / "filt", audit).run
    assert run.filter.threshold == 0.1235 and [s.threshold for s in run.scorers] == [0.5, 0.7]
    assert len(passes) == 2  # the audit's calibration; the run with an audit calibrates nothing


def test_a_set_keep_policy_is_not_overridden_by_the_audit(tmp_path):
    boot = _boot(tmp_path, ["run.filter.keep=both"])
    assert boot._run_config(1, tmp_path / "cap", tmp_path / "filt", _planted_audit("web")).run.filter.keep == "both"


def test_keep_auto_without_an_audit_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.filter\.keep=auto .* bootstrap\.audit_holdout=0"):
        _boot(tmp_path, ["run.filter.keep=auto", "bootstrap.audit_holdout=0"]).run(1)
    assert not (tmp_path / "work").exists()  # refused before the workdir is touched
    _boot(tmp_path, ["run.filter.keep=auto", "bootstrap.audit_holdout=0"]).open()  # round 0 alone needs no audit
    with pytest.raises(ConfigError, match=r"run\.filter\.keep=auto needs the round's audit"):
        _boot(tmp_path, ["run.filter.keep=auto"])._run_config(1, tmp_path / "c", tmp_path / "f",
                                                             {"threshold": 0.3, "warnings": []})


def test_bootstrap_and_demo_default_to_keep_auto_unless_the_yaml_or_a_set_says(tmp_path):
    from capfilt.commands.bootstrap import bootstrap_config

    assert bootstrap_config(None, None).run.filter.keep == "auto"
    assert bootstrap_config(DEMO_CONFIG, None).run.filter.keep == "auto"
    assert bootstrap_config(None, ["run.filter.keep=web"]).run.filter.keep == "web"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"filter": {"keep": "both"}}}))
    assert bootstrap_config(config, None).run.filter.keep == "both"
    assert bootstrap_config(config, ["run.filter.keep=auto"]).run.filter.keep == "auto"
    assert load_config().run.filter.keep == "both"  # `capfilt run`'s default stays BLIP's


def test_capfilt_run_refuses_keep_auto_before_ray_starts(tmp_path):
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "out"), "--input", str(tmp_path / "in"),
                                 "--set", "run.filter.keep=auto"])
    assert result.exit_code == 1
    assert result.output.startswith("error: run.filter.keep=auto is decided per round by the audit of "
                                    "`capfilt bootstrap`") and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_external_captioner_runs_as_configured_and_a_changed_one_is_refused(tmp_path):
    boot = _boot(tmp_path, ["run.caption.model=org/captioner@v1"])
    boot.open()
    run = boot._run_config(1, tmp_path / "cap", tmp_path / "filt", _planted_audit("both")).run
    assert run.caption.model == "org/captioner@v1" and run.filter.model == str(tmp_path / "filt")
    with pytest.raises(ResumeRefused, match=r"run\.caption\.model.*--new-round"):
        _boot(tmp_path, ["run.caption.model=org/captioner@v2"]).open()
    with pytest.raises(ResumeRefused, match=r"run\.caption\.model"):  # back to fine-tuning BLIP's: a change too
        _boot(tmp_path).open()


def test_headline_names_an_external_captioner():
    text = headline([{"round": 1, "captioner": {"model": "/m/llava", "fine_tuned": False}},
                     {"round": 2, "captioner": {"model": "/w/round-2/captioner/captioner", "fine_tuned": True}}])
    assert text.count("external captioner") == 1
    assert "\n  synthetic captions by the external captioner /m/llava (not fine-tuned)" in text


def test_threshold_quantile_is_checked_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="bootstrap.threshold_quantile"):
        _boot(tmp_path, ["bootstrap.threshold_quantile=1.5"]).run(1)


# --- end to end -------------------------------------------------------------------------------

TINY_DEMO = {
    "demo": {"num_human": 16, "num_web": 12, "num_test": 8, "rows_per_shard": 8},
    "model": {"size": "tiny", "overrides": TINY_MED},
    "train": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0, "log_every": 1, "ckpt_every": 2},
    "finetune": {"captioner_epochs": 1, "filter_epochs": 1},
    "bootstrap": {"rounds": 1, "threshold_quantile": 0.5, "audit_holdout": 0.25},  # 5 of the 16 human pairs
    "run": {"caption": {"batch_size": 4, "max_length": 6, "min_length": 2}, "filter": {"batch_size": 4}},
    "eval": {"k": 4, "num_beams": 1, "examples": 2},
}


@pytest.fixture()
def without_ray():
    """No Ray in this process during the test (the CLI must start and stop its own); the
    session's Ray, if it was up, is back afterwards."""
    import ray

    was_up = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    if was_up:
        from tests.conftest import start_local_ray

        start_local_ray()


def _tiny_demo_config(tmp_path) -> Path:
    config = tmp_path / "tiny-demo.yaml"
    config.write_text(yaml.safe_dump(TINY_DEMO))
    return config


def test_demo_runs_every_stage_then_resumes_with_nothing_to_do(tmp_path, without_ray):
    import ray

    out, config = tmp_path / "demo-out", _tiny_demo_config(tmp_path)
    result = runner.invoke(app, ["demo", "--workdir", str(out), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert not ray.is_initialized()  # the CapFilt stage stopped the Ray it started
    rounds = out / "bootstrap"
    for stage in ["round-0/pretrain", "round-0/eval", "human-split", "round-1/captioner", "round-1/filter",
                  "round-1/capfilt", "round-1/audit", "round-1/pretrain", "round-1/eval", "round-0", "round-1"]:
        assert (rounds / stage / DONE).is_file(), stage
    stats = json.loads((rounds / "round-1" / "capfilt" / "stats.json").read_text())
    assert stats["read"] == 12 and stats["kept"] + stats["rejected"] + stats["failed"] == 12
    evals = [json.loads((rounds / f"round-{r}" / "eval.json").read_text()) for r in (0, 1)]
    assert all({"retrieval", "captioning"} <= set(e) for e in evals)
    assert 0.0 <= evals[1]["filter"]["roc_auc"] <= 1.0 and "filter" not in evals[0]
    assert "round 0: test TR@1" in result.output and "round 1: test TR@1" in result.output

    # The held-out slice never reaches a fine-tuning or the calibration; the audit scores it.
    split = rounds / "human-split"
    keys = lambda d: set(pq.read_table(d, columns=["key"])["key"].to_pylist())  # noqa: E731
    held, rest = keys(split / "audit"), keys(split / "finetune")
    assert len(held) == 5 and not held & rest and held | rest == keys(out / "world" / "human")
    for role in ("captioner", "filter"):
        job = json.loads((rounds / "round-1" / role / "job.json").read_text())
        assert job["data"] == [str((split / "finetune").resolve())]
        assert json.loads((rounds / "round-1" / role / "metrics.json").read_text())["read"] == len(rest)
    assert f"P(match) on the human pairs in {split / 'finetune'}" in result.output
    audit = json.loads((rounds / "round-1" / "audit.json").read_text())
    assert not (rounds / "round-0" / "audit.json").exists()
    assert audit["inputs"]["human"] == str(split / "audit") and audit["rows"] == {"read": 5, "scored": 5}
    assert audit["threshold"] == json.loads((rounds / "round-1" / "capfilt" / DONE).read_text())["threshold"]
    assert 0.0 <= audit["roc_auc"] <= 1.0 and audit["noise_share"]["web_scored"] > 0
    assert audit["captioner"]["captions"] == 5 and audit["captioner"]["cider_d"] >= 0.0
    assert "| audit (label-free, held-out human pairs): clean kept" in result.output
    assert ("WARNING round 1: the captioner's captions score below" in result.output) == bool(audit["warnings"])
    # keep=auto, the demo's: the audit decided before the run, the run kept what it decided
    decision = audit["synthetic_decision"]
    assert audit["keep_policy"] == {"configured": "auto", "run": decision["keep"]} and not audit["warnings"]
    assert f"round 1: run.filter.keep=auto -> {decision['keep']}: {decision['reason']}" in result.output
    assert f"  synthetic captions (run.filter.keep=auto -> {decision['keep']}): " in result.output
    assert yaml.safe_load((rounds / "round-1" / "capfilt" / "config.yaml").read_text())["run"]["filter"]["keep"] \
        == decision["keep"]
    policies = {p for f in (rounds / "round-1" / "capfilt").glob("*/*.parquet") if f.parent.name in ("data", "rejected")
                for p in pq.read_table(f, columns=[schema.KEEP_POLICY])[schema.KEEP_POLICY].to_pylist()}
    assert policies == {decision["keep"]}  # the run's provenance column records the resolved policy
    if decision["keep"] == "web":
        assert stats["synthetic_kept"] == 0
    assert "round 1 vs round 0 (difference ± its SE; within noise when |difference| < 2 SE): TR@1" in result.output
    assert "Synthetic captions (run.filter.keep=auto → " in (out / "report.html").read_text()
    assert "Filter audit" in (out / "report.html").read_text()
    assert f"report: {out / 'report.html'}" in result.output and (out / "report.html").stat().st_size > 0

    again = runner.invoke(app, ["demo", "--workdir", str(out), "--config", str(config)])
    assert again.exit_code == 0, again.output
    assert "[run ]" not in again.output and again.output.count("[skip]") >= 8


def test_bootstrap_pretrains_with_ray_train_workers(tmp_path, without_ray):
    """`train_resources.workers=2` from the CLI: Ray Train gets a Ray started for it, and it is
    gone again after the training."""
    import ray

    world, config = tmp_path / "world", _tiny_demo_config(tmp_path)
    assert runner.invoke(app, ["demo-data", str(world), "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["bootstrap", "--workdir", str(tmp_path / "work"), "--human", str(world / "human"),
                                 "--web", str(world / "web"), "--rounds", "0", "--config", str(config),
                                 "--set", "train_resources.workers=2"])
    assert result.exit_code == 0, result.output
    assert not ray.is_initialized()
    metrics = json.loads((tmp_path / "work" / "round-0" / "pretrain" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["step"] == 2


def test_bootstrap_with_an_external_captioner_fine_tunes_only_the_filter(tmp_path, without_ray):
    """`--captioner` a tiny BLIP-2: no captioner fine-tuning, the audit and the CapFilt run use it
    as it is, the rounds record it; the same flag resumes, another one is refused."""
    from tests.model import tiny_models

    world, config = tmp_path / "world", _tiny_demo_config(tmp_path)
    assert runner.invoke(app, ["demo-data", str(world), "--config", str(config)]).exit_code == 0
    blip2 = tiny_models.blip2_dir(tmp_path / "blip2")
    work = tmp_path / "work"
    args = ["bootstrap", "--workdir", str(work), "--human", str(world / "human"), "--web", str(world / "web"),
            "--config", str(config), "--captioner", str(blip2)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (f"[skip] round 1: fine-tune the captioner: the external captioner {blip2.resolve()} "
            "(run.caption.model) is used as it is; only the filter is fine-tuned") in result.output
    assert f"  synthetic captions by the external captioner {blip2.resolve()} (not fine-tuned)" in result.output
    r1 = work / "round-1"
    assert not (r1 / "captioner").exists() and not (work / "round-0" / "captioner").exists()
    for stage in ("filter", "audit", "capfilt", "pretrain", ""):
        assert (r1 / stage / DONE).is_file(), stage
    record = {"model": str(blip2.resolve()), "fine_tuned": False}
    assert json.loads((r1 / DONE).read_text())["captioner"] == record
    assert json.loads((r1 / "eval.json").read_text())["captioner"] == record
    state = json.loads((work / "bootstrap.json").read_text())
    assert state["config"]["run"]["caption"]["model"] == str(blip2.resolve())  # what a resume compares
    audit = json.loads((r1 / "audit.json").read_text())
    assert audit["inputs"]["captioner"] == str(blip2.resolve()) and audit["captioner"]["captions"] == 5
    # the CapFilt run: synthetic captions by the BLIP-2 on every scored row, stats that reconcile
    stats = json.loads((r1 / "capfilt" / "stats.json").read_text())
    assert stats["read"] == 12 and stats["kept"] + stats["rejected"] + stats["failed"] == 12
    scored = [row for dest in (schema.DATA, schema.REJECTED) for f in sorted((r1 / "capfilt" / dest).glob("*.parquet"))
              for row in pq.read_table(f).to_pylist()]
    assert scored and stats["synthetic_generated"] == len(scored)
    assert all(r[schema.CAPTIONER] == str(blip2.resolve()) and len(r[schema.SYNTHETIC]) == 1 for r in scored)
    assert yaml.safe_load((r1 / "capfilt" / "config.yaml").read_text())["run"]["caption"]["model"] \
        == str(blip2.resolve())

    again = runner.invoke(app, args)  # the same flag: every stage is done
    assert again.exit_code == 0, again.output
    assert "[run ]" not in again.output and "[skip] round 1: fine-tune the captioner" in again.output
    other = tiny_models.blip2_dir(tmp_path / "blip2-other", seed=1)
    refused = runner.invoke(app, args[:-1] + [str(other)])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert refused.output.startswith("error: ") and "run.caption.model" in refused.output


@pytest.mark.parametrize("captioner, says", [
    ("FILTER", "error: --captioner FILTER: a BlipForImageTextRetrieval folder; the captioner must be"),
    ("tiny-org/absent", "error: run.caption.model (--captioner): tiny-org/absent: not in the hub cache"),
])
def test_bootstrap_refuses_a_captioner_that_cannot_caption_before_any_work(tmp_path, blip_dirs, captioner, says):
    work, captioner = tmp_path / "work", captioner.replace("FILTER", str(blip_dirs["filter"]))
    result = runner.invoke(app, ["bootstrap", "--workdir", str(work), "--human", str(tmp_path / "human"),
                                 "--web", str(tmp_path / "web"), "--captioner", captioner])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(says.replace("FILTER", str(blip_dirs["filter"]))), result.output
    assert not work.exists()
