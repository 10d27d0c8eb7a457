"""Hub ids resolved offline from a cache built here in the hub's layout, in a fresh process with
`HF_HOME` and `HF_HUB_OFFLINE` set as a worker node would have them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from capfilt.model.hub import parse_hub_id, resolve_model
from tests.model import tiny_models

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-clip"

# Run in the child: resolves each spec, scores one pair with the resolved folder.
CHILD = """
import json, sys
import torch
from capfilt.model.hub import resolve_model
from capfilt.model.scorers import ContrastiveScorer
from tests.model.tiny_models import pictures

out = {}
for spec in sys.argv[1:]:
    try:
        out[spec] = str(resolve_model(spec))
    except FileNotFoundError as err:
        out[spec] = "error: " + str(err)
scorer = ContrastiveScorer(resolve_model(sys.argv[1]), torch.device("cpu"))
out["name"] = scorer.name
out["score"] = scorer.score(pictures(1), [["a picture"]])[0][0]
print(json.dumps(out))
"""


def hub_cache(home: Path, folder: Path, repo_id: str = REPO) -> Path:
    """`folder` laid out as huggingface_hub caches `repo_id` at `COMMIT` (main points at it)."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.mark.parametrize("spec, parsed", [
    ("org/name", ("org/name", None)),
    ("google/siglip-base-patch16-224@v1.0", ("google/siglip-base-patch16-224", "v1.0")),
    (f"Org.x/na_me-2@{COMMIT}", ("Org.x/na_me-2", COMMIT)),
    ("/abs/path", None), ("./rel/dir", None), ("a/b/c", None), ("name", None), ("org/name@", None),
])
def test_parse_hub_id(spec, parsed):
    assert parse_hub_id(spec) == parsed


def test_hub_ids_resolve_offline_from_the_cache(tmp_path):
    folder = tiny_models.clip_dir(tmp_path / "clip")
    snapshot = hub_cache(tmp_path / "hf", folder)
    specs = [REPO, f"{REPO}@main", f"{REPO}@{COMMIT}", str(folder), "tiny-org/absent", f"{REPO}@v9", "./no/such"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # and nothing to reach if it tried
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", CHILD, *specs], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for spec in specs[:3]:
        assert out[spec] == str(snapshot)
    assert out[str(folder)] == str(folder)
    for spec in ("tiny-org/absent", f"{REPO}@v9"):
        assert out[spec].startswith(f"error: {spec}: not in the hub cache")
        assert "offline mode (HF_HUB_OFFLINE) is on" in out[spec]
    assert out["./no/such"] == "error: ./no/such: no such model folder, and not a hub id org/name[@revision]"
    assert -1.0 <= out["score"] <= 1.0
    assert out["name"] == f"{REPO}@{COMMIT}"


def test_empty_spec_is_named():
    with pytest.raises(FileNotFoundError, match="no model given"):
        resolve_model("")
