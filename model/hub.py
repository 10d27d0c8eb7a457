"""Model ids as well as folders: `org/name[@revision]` resolved through huggingface_hub's cache.

`resolve_model(spec)` gives a local folder for a captioner, filter or scorer setting:

- an existing folder is itself (a folder wins over a hub id of the same spelling, as in
  transformers);
- `org/name` or `org/name@revision` (a branch, tag or commit) is `snapshot_download`ed into the
  hub cache, or found there: huggingface_hub's own rules apply on each node that loads it, so
  `HF_HOME` / `HF_HUB_CACHE` say where the cache is and `HF_HUB_OFFLINE=1` resolves from it
  without any network (a branch through the cache's `refs/`, a commit through `snapshots/`);
- only `HUB_FILES` are fetched: configs, safetensors weights and tokenizer files, never pickle
  weights (`*.bin`) or code (`*.py`); the loaders then refuse a folder without safetensors and
  a family that would need remote code (families.py).
"""

from __future__ import annotations

import re
from pathlib import Path

# What a captioner or scorer needs from a hub repository: configs (model, generation, processor,
# tokenizer, chat template), safetensors weights and their index, tokenizer vocabularies.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]

# org/name[@revision], as the hub spells repository ids (no leading dot, no path beyond org/name).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of `org/name[@revision]`; None for anything else."""
    match = _HUB_ID.fullmatch(spec)
    return (match["repo"], match["revision"]) if match else None


def resolve_model(spec: str) -> Path:
    """The local folder of a model setting: the folder itself, or the hub id's cached snapshot.

    FileNotFoundError naming `spec` when it is neither a folder nor a hub id, or when the id is not
    in the cache and cannot be fetched (offline, unknown repository or revision).
    """
    if not spec:
        raise FileNotFoundError("no model given: a folder or a hub id org/name[@revision] is needed")
    if Path(spec).is_dir():
        return Path(spec)
    parsed = parse_hub_id(spec)
    if parsed is None:
        raise FileNotFoundError(f"{spec}: no such model folder, and not a hub id org/name[@revision]")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = parsed
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as err:
        where = "offline mode (HF_HUB_OFFLINE) is on" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise FileNotFoundError(f"{spec}: not in the hub cache {constants.HF_HUB_CACHE} and {where}; download it "
                                "there first (`hf download`) or give a folder") from err
    except HfHubHTTPError as err:  # unknown repository or revision, gated or private
        raise FileNotFoundError(f"{spec}: the hub refused it ({type(err).__name__}: {err})") from err


def model_name(folder: str | Path) -> str:
    """A readable name of a resolved folder: `org/name@commit` for a hub cache snapshot (its folder
    is named by the commit alone), else the folder's name."""
    folder = Path(folder)
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/", 1) + "@" + folder.name
    return folder.name
