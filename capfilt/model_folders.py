"""Model folders refused before any work when they would not load whole for their role.

Each role is a transformers class (the filter's is BLIP's ITM model; a captioner's or a named
scorer's is its family's, capfilt.model.families); a folder given for it must name that class in its config.json and its
weights must fill every parameter of the class, with none left over (capfilt.model.load_check).
Otherwise transformers would load it with layers randomly initialised and the job would write
garbage captions or random scores as if all were well. Every command that loads a model folder
checks it here first, naming the flag it came from.
"""

from __future__ import annotations

from pathlib import Path

from capfilt.config import ConfigError

# role -> the transformers class it loads (capfilt/embed.py, capfilt/stages/caption.py, MED.from_blip);
# a captioner or a scorer may be any family of that role, whose class it then is
ROLES = {"captioner": "BlipForConditionalGeneration", "filter": "BlipForImageTextRetrieval",
         "scorer": "CLIPModel, SiglipModel, Siglip2Model or BlipForImageTextRetrieval"}
FAMILY_ROLES = ("captioner", "scorer")
SHOWN = 3  # names shown of each kind of mismatch; the count says how many more


def _names(kind: str, names: list[str]) -> str:
    more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return f"{len(names)} {kind} ({', '.join(names[:SHOWN])}{more})"


def check_model_folder(directory: str | Path, role: str, flag: str) -> None:
    """Raise ConfigError, naming `flag`, unless `directory` is a folder of `role`'s class whose
    weights load with no missing and no unexpected parameter. A captioner may be any captioner
    family (capfilt.model.families: BLIP, BLIP-2, LLaVA, ...), a scorer any scorer family (CLIP,
    SigLIP, BLIP retrieval); its class is the family's."""
    import transformers

    from capfilt.model.families import detect
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
