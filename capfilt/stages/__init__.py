"""CapFilt's stages: each a class whose `__call__` takes a pyarrow batch and returns it with columns added.

`decode.Decode` (CPU task), `caption.Captioner` and `filter.Filter` (model actors: they only add
columns), `policy.KeepPolicy` (the cheap CPU step that decides keep/drop) and `write.StageParts`
(the CPU task that writes the rows where the output lives). None imports Ray:
the wiring lives in `pipelines/`, so every stage runs as plain Python in unit tests. Submodules are
not imported here so a decode worker never pays for importing torch.
"""
