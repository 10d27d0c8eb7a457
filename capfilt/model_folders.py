"""Model folders refused before any work when they would not load whole for their role.

Each role is a transformers class (the filter's is BLIP's ITM model; a captioner's or a named
scorer's is its family's, capfilt.model.families); a folder given for it must name that class in its config.json and its
weights must fill every parameter of the class, with none left over (capfilt.model.load_check).
Otherwise transformers would load it with layers randomly initialised and the job would write
garbage captions or random scores as if all were well. Every command that loads a model folder
checks it here first, naming the flag it came from.

A CLIP or SigLIP folder given as the filter (`--filter`) stands for the named scorer `filter` with
the filter's threshold and no BLIP filter (`filter_as_scorer`); `capfilt run` and `capfilt audit`
both read it so and check the result with `check_filter_and_scorers`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from capfilt.config import Config, ConfigError, RunConfig, ScorerConfig
from capfilt.model.families import detect
from capfilt.model.hub import resolve_model
from capfilt.model.weights import check_safetensors

# role -> the transformers class it loads (capfilt/embed.py, capfilt/stages/caption.py, MED.from_blip);
# a captioner or a scorer may be any family of that role, whose class it then is
ROLES = {"captioner": "BlipForConditionalGeneration", "filter": "BlipForImageTextRetrieval",
         "scorer": "CLIPModel, SiglipModel, Siglip2Model or BlipForImageTextRetrieval"}
FAMILY_ROLES = ("captioner", "scorer")
SHOWN = 3  # names shown of each kind of mismatch; the count says how many more
# The scorer a CLIP or SigLIP --filter becomes (`filter_as_scorer`): its columns are score_filter and
# synthetic_score_filter.
FILTER_SCORER = "filter"


def _names(kind: str, names: list[str]) -> str:
    more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return f"{len(names)} {kind} ({', '.join(names[:SHOWN])}{more})"


def check_model_folder(directory: str | Path, role: str, flag: str) -> None:
    """Raise ConfigError, naming `flag`, unless `directory` is a folder of `role`'s class whose
    weights load with no missing and no unexpected parameter. A captioner may be any captioner
    family (capfilt.model.families: BLIP, BLIP-2, LLaVA, ...), a scorer any scorer family (CLIP,
    SigLIP, BLIP retrieval); its class is the family's."""
    import transformers

    from capfilt.model.load_check import architectures, load_mismatch

    wanted = ROLES[role]
    if not (Path(directory) / "config.json").is_file():
        raise ConfigError(f"{flag} {directory}: not a transformers model folder (no config.json)")
    declared = architectures(directory)
    if role in FAMILY_ROLES:
        try:
            family = detect(directory)
        except ValueError as err:  # not a supported family, or one that needs remote code
            raise ConfigError(f"{flag} {directory}: {err}") from None
        if family.role != role:
            raise ConfigError(f"{flag} {directory}: a {' / '.join(declared)} folder; the {role} must be a {wanted} "
                              f"or another {role} family (docs/models.md)")
        wanted = family.class_name
    elif wanted not in declared and declared != ["blip"]:  # a bare BLIP config: its weights tell
        raise ConfigError(f"{flag} {directory}: a {' / '.join(declared)} folder; the {role} must be a {wanted}")
    missing, unexpected = load_mismatch(directory, getattr(transformers, wanted))
    if missing or unexpected:
        parts = [_names(kind, names) for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise ConfigError(f"{flag} {directory}: its weights do not load whole into a {wanted}: {'; '.join(parts)}")


def check_filter_and_scorers(run: RunConfig) -> None:
    """The filter's and the named scorers' folders as `capfilt run` checks them before any work:
    the BLIP filter (needed unless run.scorers decide alone), and each scorer's folder, its kind
    and its threshold's range for its family's score."""
    if run.filter.model or not run.scorers:
        checked_model_folder("run.filter.model", "--filter", run.filter.model, "filter")
    for i, scorer in enumerate(run.scorers):
        key = f"run.scorers[{i}]"
        folder = model_folder(f"{key}.model", "--scorer", scorer.model)
        check_model_folder(folder, "scorer", f"{key}.model")
        family = detect(folder)
        if scorer.kind != "auto" and family.kind != "blip-itm":
            raise ConfigError(f"{key}.kind: {scorer.kind} is a BLIP retrieval folder's score; {scorer.model} is "
                              f"a {family.class_name} (kind auto)")
        probability = family.kind == "siglip" or (family.kind == "blip-itm" and scorer.kind != "itc")
        low = 0.0 if probability else -1.0  # a probability, or a cosine
        if scorer.threshold is not None and not low <= scorer.threshold <= 1.0:
            raise ConfigError(f"{key}.threshold must be within [{low:g}, 1] for a {family.kind} "
                              f"{'probability' if probability else 'cosine'}, got {scorer.threshold}")


def filter_as_scorer(config: Config) -> Config:
    """`config` with a CLIP or SigLIP run.filter.model (`--filter`) turned into what it stands for:
    the first named scorer, `filter`, with run.filter.threshold, and no BLIP filter (model "",
    threshold null), its ranking (rank_synthetic_by itm) moving to it. A BLIP filter, or none,
    leaves `config` as it is."""
    run = config.run
    if not run.filter.model:
        return config
    try:
        family = detect(model_folder("run.filter.model", "--filter", run.filter.model))
    except ValueError:  # not a family capfilt loads: check_filter_and_scorers names the folder's class
        return config
    if family.role != "scorer" or family.kind == "blip-itm":  # a captioner: check_filter_and_scorers names it
        return config
    if any(s.name == FILTER_SCORER for s in run.scorers):
        raise ConfigError(f"run.scorers: the name {FILTER_SCORER!r} is the CLIP or SigLIP --filter's; "
                          "rename that scorer")
    if run.filter.rank_synthetic_by == "itc":
        raise ConfigError(f"run.filter.rank_synthetic_by: itc is a BLIP filter's score; {run.filter.model} is a "
                          f"{family.class_name}")
    rank = FILTER_SCORER if run.filter.rank_synthetic_by == "itm" else run.filter.rank_synthetic_by
    scorer = ScorerConfig(name=FILTER_SCORER, model=run.filter.model, threshold=run.filter.threshold)
    run = replace(run, filter=replace(run.filter, model="", threshold=None, rank_synthetic_by=rank),
                  scorers=(scorer, *run.scorers))
    return replace(config, run=run)


def checked_model_folder(key: str, flag: str, model: str, role: str) -> Path:
    """The local folder of `model` (config key `key`, given with `flag`) once it passed every check
    `capfilt run` makes of a model before Ray starts: resolved (a hub id from the cache), whole
    safetensors, its family's role, its class, and every layer of it in the weights (a partly
    random model runs silently)."""
    folder = model_folder(key, flag, model)
    check_model_folder(folder, role, flag)
    return folder


def model_folder(key: str, flag: str, model: str) -> Path:
    """The local folder of `model` (a folder, or a hub id from the cache) with a config.json and
    whole safetensors files, before Ray starts, naming the key and the flag."""
    if not model:
        raise ValueError(f"{key} is empty: give the model folder or hub id ({flag})")
    if "://" in model:
        raise ValueError(f"{key}: {model} is a URI; models load from local folders or the hub cache (copy it to "
                         "every node, docs/cluster.md)")
    try:  # a hub id from the cache (or the hub), as each actor resolves it again on its node
        folder = resolve_model(model)
    except FileNotFoundError as err:
        raise ValueError(f"{key} ({flag}): {err}") from None
    if not (folder / "config.json").is_file():
        raise ValueError(f"{key}: {model} is not a transformers model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{key}: {model} has no *.safetensors weights (pickled weights are never loaded)")
    for weights in sorted(folder.glob("*.safetensors")):  # torn files fail here, not in an actor
        try:
            check_safetensors(weights)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
    return folder
