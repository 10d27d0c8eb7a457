"""Safe loading: weights come only from whole safetensors files; pickles are refused unexecuted.

Every loader is tried: MED.load, the pipeline stages' load_model, the eval loader, `capfilt run`'s
up-front check and the trainer's checkpoint resume. The planted pickle's payload creates a marker
file when unpickled (checked once on purpose), so its absence afterwards proves nothing ran it.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BlipForImageTextRetrieval

from capfilt.config import load_config
from capfilt.embed import load_filter, load_model
from capfilt.model.med import MED
from capfilt.model.train import Checkpoints
from capfilt.pipelines.run import validate
from tests.model.test_med import small_config

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


class Payload:
    """Unpickling this creates `marker` (builtins.open in "w" mode): the sign that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def planted(tmp_path) -> tuple[bytes, Path]:
    """(pickle bytes, marker path); the payload is shown to be live, then the marker removed."""
    marker = tmp_path / "EXECUTED"
    data = pickle.dumps({"vision_model.embeddings.patch_embedding.weight": Payload(marker)})
    pickle.loads(data).popitem()[1].close()
    assert marker.exists()
    marker.unlink()
    return data, marker


def loaders(folder: Path, kind: str) -> dict:
    """Each way a model folder gets loaded -> a thunk that loads `folder`."""
    if kind == "med":
        return {"MED.load": lambda: MED.load(folder)}
    cfg = load_config(None, [f"run.caption.model={folder}", f"run.filter.model={folder}"]).run
    return {"load_model": lambda: load_model(BlipForImageTextRetrieval, str(folder), CPU, torch.float32),
            "embed.load_filter": lambda: load_filter(folder, CPU),
            "run.validate": lambda: validate(cfg)}


@pytest.fixture(params=["blip", "med"])
def good_folder(request, blip_dirs, tmp_path) -> tuple[Path, str]:
    folder = tmp_path / "good"
    if request.param == "med":
        MED(small_config()).save(folder)
    else:
        shutil.copytree(blip_dirs["filter"], folder)
    return folder, request.param


@pytest.mark.parametrize("damage", ["truncated", "header_only", "garbage"])
def test_damaged_weights_are_a_clear_error_naming_the_file(good_folder, damage):
    folder, kind = good_folder
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    damaged = {"truncated": data[: len(data) - 100], "header_only": data[:header_end],
               "garbage": b"\x00" * 64}[damage]
    weights.write_bytes(damaged)
    for load in loaders(folder, kind).values():
        with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} is not a valid safetensors file"):
            load()


def test_pickle_named_model_safetensors_is_refused_unexecuted(good_folder, planted):
    folder, kind = good_folder
    data, marker = planted
    (folder / "model.safetensors").write_bytes(data)
    for load in loaders(folder, kind).values():
        with pytest.raises(ValueError, match="not a valid safetensors file"):
            load()
    assert not marker.exists()


def test_pickle_checkpoint_alone_is_refused_unexecuted(good_folder, planted):
    """pytorch_model.bin with no safetensors beside it: nothing to load, and it is never opened."""
    folder, kind = good_folder
    data, marker = planted
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(data)
    expected = {"MED.load": r"model\.safetensors not found \(found \['pytorch_model\.bin'\]: pickle",
                "load_model": "no file named model.safetensors", "embed.load_filter": "no file named model.safetensors",
                "run.validate": r"has no \*\.safetensors weights \(pickled weights are never loaded\)"}
    for name, load in loaders(folder, kind).items():
        with pytest.raises((OSError, ValueError), match=expected[name]):
            load()
    assert not marker.exists()


def test_trainer_resume_skips_a_planted_pickle_checkpoint(tmp_path, planted):
    """A pickle planted as the newest checkpoint's weights, its manifest sizes forged to match:
    resume warns naming it and takes the previous checkpoint; the pickle never runs."""
    data, marker = planted
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpts = Checkpoints(tmp_path / "ckpts", keep=3)
    ckpts.save(1, model, optimizer, {"note": "first"})
    newest = ckpts.save(2, model, optimizer, {"note": "second"})
    (newest / "model.safetensors").write_bytes(data)
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"]["model.safetensors"] = len(data)
    (newest / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="step-00000002"):
        restored = ckpts.load(torch.nn.Linear(4, 2), torch.optim.AdamW(torch.nn.Linear(4, 2).parameters()))
    assert restored["step"] == 1
    assert not marker.exists()


def _python_sources() -> list[Path]:
    return sorted(p for package in ("capfilt", "model", "pipelines", "benchmarks")
                  for p in (ROOT / package).rglob("*.py"))


def test_source_never_loads_pickles_or_remote_code():
    forbidden = re.compile(r"trust_remote_code|torch\.load\(|pickle\.loads?\(|import pickle|weights_only"
                           r"|use_safetensors\s*=\s*False|from_pretrained\([^)]*from_tf")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _python_sources()
            for i, line in enumerate(p.read_text().splitlines(), 1) if forbidden.search(line)]
    assert not hits
    # Every model loaded with from_pretrained asks for safetensors (tokenizers and processors read JSON).
    calls = [(p, m) for p in _python_sources()
             for m in re.finditer(r"(\w+)\.from_pretrained\(([^()]*(\([^()]*\))?[^()]*)\)", p.read_text())]
    models = [(p, m) for p, m in calls if not re.search(r"Tokenizer|Processor", m.group(1))]
    assert len(models) >= 3  # the stages' load_model and MED.from_blip's two
    assert [f"{p.relative_to(ROOT)}: {m.group(0)}" for p, m in models if "use_safetensors=True" not in m.group(2)] == []
