"""A model folder that would not load whole for its role is refused before any work, naming its flag."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from capfilt.cli import app
from tests.tiny_blip import bert_config, shard_rows, write_shard


@pytest.fixture(scope="module")
def folders(tmp_path_factory, blip_dirs) -> dict[str, Path]:
    """The tiny captioner and filter, a tiny BERT, a BLIP-2 config beside BLIP weights, a captioner
    with a vision layer missing from its weights, and a folder of input shards."""
    from transformers import Blip2Config, BertModel

    root = tmp_path_factory.mktemp("folders")
    BertModel(bert_config()).save_pretrained(root / "bert")
    blip2 = shutil.copytree(blip_dirs["captioner"], root / "blip2")
    # config.json of a BLIP-2 (as Salesforce/blip2-opt-2.7b's names it) beside BLIP weights
    Blip2Config(num_query_tokens=4, architectures=["Blip2ForConditionalGeneration"]).save_pretrained(blip2)
    torn = shutil.copytree(blip_dirs["captioner"], root / "torn")
    weights = load_file(torn / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("vision_model.encoder.layers.1.")},
              torn / "model.safetensors", metadata={"format": "pt"})
    write_shard(root / "human" / "00000.parquet", shard_rows("h", 6, failed=0, corrupt=0))
    return {**blip_dirs, "bert": root / "bert", "blip2": blip2, "torn": torn, "human": root / "human"}


def refused(args: list[str], out: Path) -> str:
    """The one error line of a refused command; nothing was written to `out`."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("captioner, filter_, flag, words", [
    ("filter", "captioner", "--captioner", "a BlipForImageTextRetrieval folder; the captioner must be a "
                                           "BlipForConditionalGeneration"),
    ("captioner", "bert", "--filter", "a BertModel folder; the filter must be a BlipForImageTextRetrieval"),
    # BLIP-2 is a captioner family (docs/models.md), so these BLIP weights are what is wrong
    ("blip2", "filter", "--captioner", "its weights do not load whole into a Blip2ForConditionalGeneration"),
    ("torn", "filter", "--captioner", "its weights do not load whole into a BlipForConditionalGeneration: "
                                      "12 missing (vision_model.encoder.layers.1."),
])
def test_capfilt_run_refuses_a_folder_that_does_not_load_whole(captioner, filter_, flag, words, folders, tmp_path):
    out = tmp_path / "out"
    line = refused(["run", "--input", str(folders["human"]), "--captioner", str(folders[captioner]),
                    "--filter", str(folders[filter_]), "--out", str(out)], out)
    assert line.startswith(f"error: {flag} {folders[captioner if flag == '--captioner' else filter_]}: ")
    assert words in line


def test_every_command_that_loads_a_model_checks_it(folders, tmp_path):
    out = tmp_path / "out"
    swapped = {"captioner": str(folders["filter"]), "filter": str(folders["captioner"])}
    line = refused(["audit", "--filter", swapped["filter"], "--human", str(folders["human"]),
                    "--out", str(out / "audit.json")], out)
    assert line.startswith(f"error: --filter {swapped['filter']}: a BlipForConditionalGeneration folder")
    line = refused(["dedup", "--input", str(folders["human"]), "--out", str(out), "--filter", swapped["filter"]], out)
    assert line.startswith(f"error: --filter {swapped['filter']}: a BlipForConditionalGeneration folder")
    models = tmp_path / "models"
    shutil.copytree(folders["filter"], models / "captioner")  # a filter where the captioner belongs
    line = refused(["eval", "--model", str(models), "--data", str(folders["human"]), "--out",
                    str(out / "eval.json")], out)
    assert line.startswith(f"error: --model {models / 'captioner'}: a BlipForImageTextRetrieval folder")
    line = refused(["pretrain", "--data", str(folders["human"]), "--out", str(out), "--init-blip",
                    swapped["captioner"], swapped["filter"]], out)
    assert line.startswith(f"error: --init-blip CAPTIONER {swapped['captioner']}: a BlipForImageTextRetrieval")
