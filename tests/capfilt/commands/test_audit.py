"""`capfilt audit` refuses a --filter folder it cannot audit in one line, before it reads any data."""

from __future__ import annotations

from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import capfilt.audit
import capfilt.report
from capfilt import schema
from capfilt.cli import app
from tests.model.tiny_models import clip_dir


def test_a_filter_folder_of_the_wrong_role_is_refused_before_any_work(blip_dirs, monkeypatch, tmp_path):
    work = []  # what the audit would read: the run's web scores, the human pairs, the models' scores
    monkeypatch.setattr(capfilt.report, "run_scores", lambda *args: work.append("run_scores"))
    monkeypatch.setattr(capfilt.audit, "mismatched_captions", lambda *args: work.append("mismatched_captions"))
    monkeypatch.setattr(capfilt.audit, "score_human", lambda *args, **kwargs: work.append("score_human"))
    run = tmp_path / "run"
    (run / schema.DATA).mkdir(parents=True)
    clip = clip_dir(tmp_path / "clip")
    torn = clip_dir(tmp_path / "torn")
    weights = load_file(torn / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "text_projection.weight"}, torn / "model.safetensors",
              metadata={"format": "pt"})
    cases = [  # (--filter, more flags, the error's start, what it says)
        (blip_dirs["captioner"], [], f"--filter {blip_dirs['captioner']}: ",
         "a BlipForConditionalGeneration folder; the filter must be a BlipForImageTextRetrieval"),
        (torn, [], f"run.scorers[0].model {torn}: ", "its weights do not load whole into a CLIPModel"),
        (clip, ["--scorer", f"filter={clip}"], "run.scorers: ", "the name 'filter' is the CLIP or SigLIP --filter's"),
    ]
    for folder, flags, starts, says in cases:
        out = tmp_path / "audit.json"
        res = CliRunner().invoke(app, ["audit", "--filter", str(folder), "--human", str(tmp_path / "human"),
                                       "--capfilt-out", str(run), "--out", str(out), *flags])
        assert res.exit_code == 1, res.output
        assert res.output.strip().splitlines() == [res.output.strip()]  # one line
        assert res.output.startswith(f"error: {starts}") and says in res.output, res.output
        assert work == [] and not out.exists()


def test_a_clip_filter_without_a_threshold_is_refused_before_any_work(monkeypatch, tmp_path):
    """A CLIP --filter takes run.filter.threshold as its threshold: null leaves none to audit it at."""
    work = []
    monkeypatch.setattr(capfilt.audit, "mismatched_captions", lambda *args: work.append("mismatched_captions"))
    clip = clip_dir(tmp_path / "clip")
    res = CliRunner().invoke(app, ["audit", "--filter", str(clip), "--human", str(tmp_path / "human"),
                                   "--set", "run.filter.threshold=null"])
    assert res.exit_code == 1 and work == [], res.output
    assert res.output.startswith("error: run.filter.threshold is null"), res.output
