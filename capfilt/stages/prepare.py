"""Stage 2: the narrow rows the model actors get (a CPU task, fused by Ray with the read; no model).

In: one read unit's rows, only the columns CapFilt reads (key, image, caption, img2dataset's
`status` and `error_message`: pipelines/run.py projects the read). Out: `_shard`, `_row`, the key,
the image bytes, the caption as valid text and `error` ("download: ..." / "input: ...", null for
rows the models should see). It is the first stage to read row values, so it turns the caption
column into valid strings (`capfilt.model.utf8.utf8_text`, which training uses too): the later
stages never meet bytes or invalid UTF-8. A row that already failed loses its image bytes here
(nothing downstream reads them); every other input column stays in the input shard, and the
commit joins the decisions back onto it (capfilt/commit.py).

Images are not decoded here: the encoded bytes travel to the model actor, which decodes its block
itself (`capfilt.images.DecodedImages`). Decoded pixels are ~7x the JPEG at 384 px; sent through
the object store they cost a serialise/copy/map per hop and per model, more CPU than the decode.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from capfilt import schema
from capfilt.config import RunConfig
from capfilt.model.utf8 import utf8_text

BAD_UTF8 = "input: caption is not valid UTF-8"


class Prepare:
    """Marks rows that cannot be captioned (with the reason); keeps only what the model actors use."""

    def __init__(self, cfg: RunConfig):
        self.columns = cfg.columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = self.columns
        n = batch.num_rows
        keys = batch[cols.key]
        present = batch.column_names
        # Input without img2dataset's status column is taken as downloaded. A null status is "not
        # reported" (a shard without the column, read beside shards with it): the bytes decide.
        statuses = batch[cols.status].to_pylist() if cols.status in present else [None] * n
        messages = batch["error_message"].to_pylist() if "error_message" in present else [None] * n
        text, bad_text = utf8_text(batch[cols.text])
        errors = []
        for key_valid, status, message, bad in zip(keys.is_valid().to_pylist(), statuses, messages, bad_text):
            if not key_valid:
                errors.append("input: key is null")
            elif status is not None and status != schema.STATUS_SUCCESS:
                errors.append(f"download: {message or status}")
            elif bad:
                errors.append(BAD_UTF8)
            else:
                errors.append(None)
        error = pa.array(errors, pa.string())
        image = pc.if_else(error.is_null(), batch[cols.image], pa.nulls(n, batch[cols.image].type))
        # `_shard` and `_row` come with a pipeline block (not with rows read by calibration or the audit).
        tags = {name: batch[name] for name in (schema.SHARD, schema.ROW) if name in present}
        return pa.table({**tags, cols.key: keys, cols.image: image, cols.text: text, schema.ERROR: error})
