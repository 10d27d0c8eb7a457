"""Bootstrap rounds: pre-train, fine-tune captioner and filter, CapFilt the web, pre-train again.

Workdir layout (every stage writes only its own directory and is marked done by a `DONE.json`
written last, so a killed bootstrap re-run with the same command goes on at the first unfinished
stage; stages themselves resume too: the trainer from its checkpoints, CapFilt from its
committed shards):

    WORK/bootstrap.json            inputs + resolved config the workdir was started with
    WORK/human-split/finetune/     the human pairs the fine-tunings and the calibration read
    WORK/human-split/audit/        the rest (bootstrap.audit_holdout of them, by a hash of the key)
    WORK/round-0/pretrain/         MED pre-trained on human + raw web (or copied from --init)
    WORK/round-0/eval-model/       its captioner/ and filter/ exports, for evaluation
    WORK/round-0/eval.json         test-split retrieval and captioning of that MED
    WORK/round-r/captioner/        fine-tuned from round r-1's MED on the human pairs (LM); absent with
                                   an external captioner (run.caption.model, --captioner), used as it is
    WORK/round-r/filter/           fine-tuned from round r-1's MED on the human pairs (ITC+ITM)
    WORK/round-r/audit/            the filter and captioner audited on human-split/audit/ (capfilt/audit.py)
                                   at the round's threshold, before CapFilt: with run.filter.keep=auto
                                   its synthetic decision sets the run's keep policy (both or web)
    WORK/round-r/capfilt/          CapFilt output over the web shards (data/rejected/failed)
    WORK/round-r/audit.json        that audit plus what needs the run's web scores (the noise share)
    WORK/round-r/pretrain/         MED pre-trained from scratch on human + capfilt/data
    WORK/round-r/eval-model/, eval.json   as for round 0, plus the filter's quality vs the truth

Round r >= 1 pre-trains with the same budget as round 0, so the rounds differ only in the corpus.

An external captioner (`run.caption.model` set: any captioner family, capfilt/model/families.py)
replaces the fine-tuned BLIP captioner in every round's audit and CapFilt run, as it is: the
trainer trains MED only, and a BLIP-2 or LLaVA checkpoint has no MED to start from. The filter is
still fine-tuned and the MED re-pretrained each round. It is a config key, so a resumed workdir
refuses another captioner as it refuses any changed setting (--new-round applies it from the
first unfinished round).

The held-out slice (`bootstrap.audit_holdout`, 0 turns it and the audit off) never reaches a
fine-tuning or the threshold calibration, so each round's audit scores pairs its filter was not
fine-tuned on. Pre-training still reads every human pair: the web pairs the filter scores were
in round 0's pre-training corpus too, so the held-out pairs stand to the filter as clean web
pairs do, and no pre-training data is given up for the audit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from capfilt import schema, workdir as names
from capfilt.commit import differences
from capfilt.compare import RETRIEVAL, compare_line, round_figures, with_se
from capfilt.config import Config, ConfigError, to_dict, write_resolved
from capfilt.markers import done_record, mark_done
from capfilt.storage import location

DONE = "DONE.json"


class ResumeRefused(RuntimeError):
    """The workdir was started with other inputs or another config."""


@dataclass(frozen=True)
class BootstrapInputs:
    human: str  # human-annotated input shards (fine-tuning and every pre-training corpus); a folder or URI
    web: str  # web input shards that CapFilt cleans; a folder, glob or URI
    test: str | None = None  # held-out split evaluated after every pre-training; a folder or URI
    truth: str | None = None  # demo-world truth file: filter precision/recall per round
    init: str | None = None  # a saved MED used as round 0 instead of pre-training one


def _done(stage: Path) -> dict | None:
    return done_record(location(stage / DONE))


def _write_json(path: Path, data: dict) -> None:
    location(path).write_text(json.dumps(data, indent=1, default=str))  # written aside, then renamed


def _mark_done(stage: Path, result: dict) -> None:
    mark_done(location(stage / DONE), result)


class Bootstrap:
    """Runs rounds in `workdir`; `log` receives one line per stage started or skipped."""

    def __init__(self, workdir: str | Path, inputs: BootstrapInputs, cfg: Config,
                 log: Callable[[str], None] = print):
        self.work = Path(workdir)
        self.inputs = inputs
        self.cfg = cfg
        self.log = log
        self._captioner_folder: Path | None = None  # the external captioner's local folder, once checked

    # --- resume bookkeeping ---------------------------------------------------------------------

    @property
    def _external_captioner(self) -> str:
        """run.caption.model: the captioner every round uses as it is; "" fine-tunes BLIP's each round."""
        return self.cfg.run.caption.model

    def _check_captioner(self) -> None:
        """`capfilt run`'s checks of the external captioner, before the workdir is touched; a
        folder is kept as its absolute path, so a resume from elsewhere names the same one."""
        if not self._external_captioner:
            return
        from capfilt.model_folders import checked_model_folder

        model = self._external_captioner
        folder = checked_model_folder("run.caption.model", "--captioner", model, "captioner").resolve()
        if Path(model).is_dir():
            self.cfg = replace(self.cfg, run=replace(self.cfg.run, caption=replace(self.cfg.run.caption,
                                                                                   model=str(folder))))
        self._captioner_folder = folder

    def _state(self) -> dict:
        # Inputs as absolute paths or URIs: a resumed workdir must name the same data.
        return {"inputs": {k: (str(location(v)) if v else None) for k, v in vars(self.inputs).items()},
                "config": json.loads(json.dumps(to_dict(self.cfg)))}

    def open(self, new_round: bool = False) -> int:
        """Check the workdir against this run; returns the first round that is not finished.

        A changed config is refused unless `new_round`: then finished rounds stay and the first
        unfinished one is discarded and started afresh with the new config.
        """
        self.work.mkdir(parents=True, exist_ok=True)
        state_file = self.work / "bootstrap.json"
        state = self._state()
        first_open = self._first_unfinished_round()
        if state_file.is_file():
            old = json.loads(state_file.read_text())
            if old["inputs"] != state["inputs"]:
                raise ResumeRefused(
                    f"{self.work} was started with other inputs {old['inputs']}; use a new --workdir")
            changed = differences(old["config"], state["config"])
            if changed and not new_round:
                raise ResumeRefused(
                    f"{self.work} was started with another config (changed: {', '.join(changed)}). "
                    "Re-run with the original config to resume, or pass --new-round to keep the "
                    f"finished rounds and start round {first_open} afresh with this config.")
            if changed:
                self.log(f"config changed ({', '.join(changed)}): restarting round {first_open}")
                shutil.rmtree(self._round_dir(first_open), ignore_errors=True)
        location(state_file).write_text(json.dumps(state, indent=1))
        write_resolved(self.cfg, self.work)
        return first_open

    def _round_dir(self, r: int) -> Path:
        return names.round_dir(self.work, r)

    def _first_unfinished_round(self) -> int:
        r = 0
        while _done(self._round_dir(r)) is not None:
            r += 1
        return r

    def _stage(self, stage: Path, what: str, work: Callable[[], dict]) -> dict:
        result = _done(stage)
        if result is not None:
            self.log(f"[skip] {what}: done ({stage})")
            return result
        self.log(f"[run ] {what} -> {stage}")
        stage.mkdir(parents=True, exist_ok=True)
        result = work()
        _mark_done(stage, result)
        return result

    # --- stages ---------------------------------------------------------------------------------

    @property
    def _audit_share(self) -> float:
        return self.cfg.bootstrap.audit_holdout

    def _finetune_human(self) -> str:
        """The human pairs the fine-tunings and the calibration read: all of them without an audit."""
        return str(self.work / names.HUMAN_SPLIT / "finetune") if self._audit_share else self.inputs.human

    def _split_human(self) -> None:
        """WORK/human-split/ as `bootstrap.audit_holdout` says (split again if --new-round changed it)."""
        from capfilt.audit import split_holdout

        split = self.work / names.HUMAN_SPLIT
        done = _done(split)
        if done is not None and done.get("share") != self._audit_share:
            self.log(f"bootstrap.audit_holdout changed from {done.get('share')}: splitting the human pairs again")
            shutil.rmtree(split)

        def work() -> dict:
            counts = split_holdout(self.inputs.human, split, self._audit_share, self.cfg.run.columns.key)
            self.log(f"human pairs: {counts['finetune']} for fine-tuning, {counts['audit']} held out for the audit")
            return counts | {"share": self._audit_share}

        self._stage(split, "hold out human pairs for the filter audit", work)

    def _audit(self, r: int, captioner: Path, filt: Path) -> dict:
        """The held-out audit at the round's threshold, before its CapFilt run: its synthetic
        decision is what `run.filter.keep=auto` becomes for that run."""
        from capfilt.audit import audit

        cfg = self._calibrated(r, filt)
        result = audit(cfg, filt, self.work / names.HUMAN_SPLIT / "audit", captioner,
                       threshold=cfg.run.filter.threshold)
        for warning in result["warnings"]:
            self.log(f"WARNING round {r}: {warning}")
        decision = result.get("synthetic_decision")
        if decision and self.cfg.run.filter.keep == "auto":
            self.log(f"round {r}: run.filter.keep=auto -> {decision['keep']}: {decision['reason']}")
        return result

    def _train(self, role: str, data: list[str], out: Path, init: str | None) -> dict:
        from capfilt.training import TrainJob, role_config

        from .train import run_training

        return run_training(TrainJob(role=role, data=tuple(data), out=str(out), init=init),
                            role_config(self.cfg, role))

    def _export_for_eval(self, med_dir: Path, out: Path) -> dict:
        from capfilt.model import to_transformers
        from capfilt.model.med import MED
        from capfilt.model.tokenizer import build_tokenizer

        med = MED.load(med_dir).eval()
        tokenizer = build_tokenizer()
        to_transformers.export_captioner(med, tokenizer, out / names.CAPTIONER)
        to_transformers.export_filter(med, tokenizer, out / names.FILTER)
        return {"med": str(med_dir)}

    def _evaluate(self, r: int, capfilt_out: Path | None) -> dict:
        from capfilt.evaluate import evaluate

        rd = self._round_dir(r)
        results: dict[str, Any] = {"round": r}
        if self.inputs.test:  # the demo world's truth adds its attribute accuracy
            results |= evaluate(self.cfg, model_dir=rd / names.EVAL_MODEL, data_dir=self.inputs.test,
                                truth=self.inputs.truth)
        if self.inputs.truth and capfilt_out is not None:
            results |= evaluate(self.cfg, truth=self.inputs.truth, capfilt_out=capfilt_out)
        return results

    def _calibrated(self, r: int, filt: Path) -> Config:
        """The config with the round's thresholds: run.filter.threshold with
        `bootstrap.threshold_quantile`, and each run.scorers entry's with its `threshold_quantile`,
        read off the human pairs (capfilt/calibrate.py); as given where no quantile asks."""
        cfg = self.cfg
        if not cfg.bootstrap.threshold_quantile and not any(s.threshold_quantile for s in cfg.run.scorers):
            return cfg
        from capfilt.calibrate import human_thresholds

        # Rounded so a resumed round recomputes the very same values (the run refuses a changed config).
        human = self._finetune_human()
        thresholds = {name: round(value, 4) for name, value in human_thresholds(filt, human, cfg).items()}
        if "itm" in thresholds:
            self.log(f"round {r}: filter threshold {thresholds['itm']:.4f} = the {cfg.bootstrap.threshold_quantile:g} "
                     f"quantile of P(match) on the human pairs in {human}")
        scorers = []
        for scorer in cfg.run.scorers:
            if scorer.name in thresholds:
                self.log(f"round {r}: scorer {scorer.name} threshold {thresholds[scorer.name]:.4f} = the "
                         f"{scorer.threshold_quantile:g} quantile of its scores on the human pairs in {human}")
            scorers.append(replace(scorer, threshold=thresholds.get(scorer.name, scorer.threshold)))
        threshold = thresholds.get("itm", cfg.run.filter.threshold)
        run = replace(cfg.run, filter=replace(cfg.run.filter, threshold=threshold), scorers=tuple(scorers))
        return replace(cfg, run=run)

    def _run_config(self, r: int, captioner: Path, filt: Path, audit: dict | None) -> Config:
        """The round's CapFilt config: its models (an external captioner as configured: the run
        resolves a hub id itself and its provenance column keeps the id), its thresholds (the
        audit's when there is one) and `run.filter.keep=auto` resolved by the audit's synthetic
        decision."""
        run = self.cfg.run
        keep = run.filter.keep
        if keep == "auto":
            decision = (audit or {}).get("synthetic_decision")
            if decision is None:  # `run` checks this first; a resumed audit without a captioner half lands here
                raise ConfigError("run.filter.keep=auto needs the round's audit of the captioner "
                                  "(bootstrap.audit_holdout > 0)")
            keep = decision["keep"]
        if audit is not None:  # the thresholds it was made at
            named = audit.get("scorers", {})
            threshold = audit["threshold"]
            scorers = tuple(replace(s, threshold=named[s.name]["threshold"]) if s.name in named else s
                            for s in run.scorers)
        else:
            calibrated = self._calibrated(r, filt).run
            threshold, scorers = calibrated.filter.threshold, calibrated.scorers
        run = replace(run, input=self.inputs.web, round=r, scorers=scorers,
                      caption=replace(run.caption, model=self._external_captioner or str(captioner)),
                      filter=replace(run.filter, model=str(filt), threshold=threshold, keep=keep))
        return replace(self.cfg, run=run)

    def _capfilt(self, r: int, captioner: Path, filt: Path, out: Path, audit: dict | None) -> dict:
        from .run import run_capfilt

        cfg = self._run_config(r, captioner, filt, audit)
        return run_capfilt(cfg, out) | {"threshold": cfg.run.filter.threshold, "keep": cfg.run.filter.keep}

    def run_round(self, r: int) -> dict:
        rd = self._round_dir(r)
        pretrain, captioner, filt = rd / names.PRETRAIN, rd / names.CAPTIONER, rd / names.FILTER
        prev_med = self._round_dir(r - 1) / names.PRETRAIN / names.MED
        capfilt_out = None
        audit = None
        if r == 0:
            if self.inputs.init:
                self._stage(pretrain, "round 0: MED from --init", lambda: self._copy_init(pretrain / names.MED))
            else:
                self._stage(pretrain, "round 0: pre-train MED on human + raw web",
                            lambda: self._train("pretrain", [self.inputs.human, self.inputs.web], pretrain, None))
        else:
            if self._audit_share:
                self._split_human()
            human = self._finetune_human()
            if self._external_captioner:
                self.log(f"[skip] round {r}: fine-tune the captioner: the external captioner "
                         f"{self._external_captioner} (run.caption.model) is used as it is; only the filter "
                         "is fine-tuned")
                captioner_model = self._captioner_folder
            else:
                self._stage(captioner, f"round {r}: fine-tune the captioner on human pairs",
                            lambda: self._train("captioner", [human], captioner, str(prev_med)))
                captioner_model = captioner / names.CAPTIONER
            self._stage(filt, f"round {r}: fine-tune the filter on human pairs",
                        lambda: self._train("filter", [human], filt, str(prev_med)))
            if self._audit_share:
                audit = self._stage(rd / names.AUDIT_STAGE, f"round {r}: audit the filter and captioner on held-out "
                                    "human pairs", lambda: self._audit(r, captioner_model, filt / names.FILTER))
            capfilt_out = rd / names.CAPFILT
            run = self._stage(capfilt_out, f"round {r}: CapFilt over the web shards",
                              lambda: self._capfilt(r, captioner_model, filt / names.FILTER, capfilt_out, audit))
            if audit is not None:
                from capfilt.audit import with_web

                audit = with_web(audit, self.cfg, capfilt_out)  # the noise share needs the run's web scores
                audit["keep_policy"] = {"configured": self.cfg.run.filter.keep, "run": run.get("keep")}
                _write_json(rd / names.AUDIT, audit)
            self._stage(pretrain, f"round {r}: pre-train a new MED on human + CapFilt data",
                        lambda: self._train("pretrain", [self.inputs.human, str(capfilt_out / schema.DATA)],
                                            pretrain, None))
        self._stage(rd / names.EVAL_MODEL, f"round {r}: export the MED for evaluation",
                    lambda: self._export_for_eval(pretrain / names.MED, rd / names.EVAL_MODEL))
        results = self._stage(rd / names.EVAL_STAGE, f"round {r}: evaluate",
                              lambda: self._evaluate(r, capfilt_out))
        if r:  # which captioner wrote the round's synthetic captions, and whether it was trained for it
            results = results | {"captioner": {"model": self._external_captioner or str(captioner / names.CAPTIONER),
                                               "fine_tuned": not self._external_captioner}}
        _write_json(rd / names.EVAL, results)
        _mark_done(rd, {"round": r} | ({"captioner": results["captioner"]} if r else {}))
        return results | ({"audit": audit} if audit is not None else {})

    def _copy_init(self, dest: Path) -> dict:
        from capfilt.model.med import MED

        MED.load(self.inputs.init).save(dest)  # load first: refuses anything but a safe MED dir
        return {"init": self.inputs.init}

    def run(self, rounds: int, new_round: bool = False) -> list[dict]:
        """Round 0 plus `rounds` CapFilt rounds; returns every round's evaluation."""
        if self.cfg.run.filter.keep == "auto" and rounds and not self._audit_share:
            raise ConfigError("run.filter.keep=auto is decided by each round's audit, which "
                              "bootstrap.audit_holdout=0 turns off; set run.filter.keep=both or web")
        self._check_captioner()
        self.open(new_round)
        return [self.run_round(r) for r in range(rounds + 1)]


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def headline(results: list[dict]) -> str:
    """A few lines comparing rounds: the figures a user looks at first, test figures ± their
    standard error, and each later round against round 0 with its noise verdict."""
    lines = []
    for res in results:
        parts = []
        figures = round_figures(res)
        retrieval = [f"{name} {with_se(*figures[name])}" for name, _ in RETRIEVAL if name in figures]
        if retrieval:
            parts.append("test " + " ".join(retrieval))
        if "CIDEr" in figures:
            parts.append(f"CIDEr {with_se(*figures['CIDEr'])} BLEU-4 {_num(figures['BLEU-4'][0])} "
                         f"attributes {with_se(*figures['attributes'])}")
        filt = res.get("filter", {})
        if filt:
            synth = filt.get("synthetic", {})
            parts.append(f"filter precision {_num(filt.get('precision'))} recall {_num(filt.get('recall'))} "
                         f"AUC {_num(filt.get('roc_auc'))}; synthetic kept {_num(synth.get('kept_share'))} "
                         f"(attributes {_num(synth.get('attributes_kept'))})")
        audit = res.get("audit")
        if audit:
            at, share = audit["at_threshold"], audit.get("noise_share") or {}
            parts.append(f"audit (label-free, held-out human pairs): clean kept {_num(at['clean_keep_rate'])} "
                         f"AUC {_num(audit['roc_auc'])} noise share {_num(share.get('estimate'))} "
                         f"precision {_num(at['precision'])} recall {_num(at['recall'])}")
        lines.append(f"round {res.get('round')}: " + (" | ".join(parts) if parts else "(no evaluation)"))
        for name, figures in (audit or {}).get("scorers", {}).items():  # each named scorer on the same pairs
            at = figures["at_threshold"] or {}
            lines.append(f"  audit scorer {name}: clean kept {_num(at.get('clean_keep_rate'))} at threshold "
                         f"{_num(figures['threshold'])} AUC {_num(figures['roc_auc'])}")
        captioner = res.get("captioner") or {}
        if captioner.get("fine_tuned") is False:
            lines.append(f"  synthetic captions by the external captioner {captioner['model']} (not fine-tuned)")
        decision, policy = (audit or {}).get("synthetic_decision"), (audit or {}).get("keep_policy") or {}
        if decision:
            applied = (f"run.filter.keep=auto -> {policy.get('run')}" if policy.get("configured") == "auto"
                       else f"not applied: run.filter.keep={policy.get('configured')}")
            lines.append(f"  synthetic captions ({applied}): {decision['reason']}")
        lines += [f"  WARNING: {w}" for w in (audit or {}).get("warnings", [])]
    for res in results[1:]:
        if round_figures(res) and round_figures(results[0]):
            lines.append(compare_line(res, results[0]))
    return "\n".join(lines)
