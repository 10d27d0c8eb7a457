"""Stage 2: route failed downloads, decode and resize images (a CPU task, no model).

Adds `error` ("download: ..." / "decode: ..." / "input: ...", null for good rows) and `_pixels`:
the image as raw uint8 [S, S, 3] bytes at the captioner's resolution, null for failed rows. It is
the first stage to read row values, so it also turns the caption column into valid strings
(`capfilt.model.utf8.utf8_text`, which training uses too): the later stages never meet bytes or
invalid UTF-8.

Why pixels and not the JPEG bytes travel to the model actors: the actors are the scarce part (a
GPU each); decoding and bicubic resizing in them would serialise CPU work on the actor's one Python
thread and be done twice (captioner and filter). Decoding once here, in parallel CPU tasks, leaves
the actors only a uint8 -> float copy. uint8 at model resolution (432 KiB at 384 px) is 4x smaller
than float32 and bounded whatever the source size; the filter, its last user, drops the column.
"""

from __future__ import annotations

import pyarrow as pa

from capfilt import schema
from capfilt.config import RunConfig
from capfilt.images import ImageError, decode_image, resize_uint8
from capfilt.model.utf8 import utf8_text

BAD_UTF8 = "input: caption is not valid UTF-8"


class Decode:
    """Marks rows that cannot be captioned (with the reason) and decodes the rest to `_pixels`."""

    def __init__(self, cfg: RunConfig, size: int):
        self.cfg = cfg
        self.size = size  # square side of `_pixels`: the captioner's input size

    def row(self, key: str | None, status: str | None, message: str | None, bad_text: bool,
            data: bytes | None) -> tuple[str | None, bytes | None]:
        """(error, pixels) for one row; exactly one of them is None."""
        if key is None:
            return "input: key is null", None
        # A null status is "not reported" (a shard without the column, read beside shards with
        # it): the image bytes decide, as for a shard without the column.
        if status is not None and status != schema.STATUS_SUCCESS:
            return f"download: {message or status}", None
        if bad_text:
            return BAD_UTF8, None
        try:
            image = decode_image(data, self.cfg.image)
        except ImageError as err:
            return f"decode: {err}", None
        return None, resize_uint8(image, self.size).tobytes()

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = self.cfg.columns
        n = batch.num_rows
        keys = batch[cols.key].to_pylist()
        # Input without img2dataset's status column is taken as downloaded.
        present = batch.column_names
        statuses = batch[cols.status].to_pylist() if cols.status in present else [schema.STATUS_SUCCESS] * n
        messages = batch["error_message"].to_pylist() if "error_message" in present else [None] * n
        images = batch[cols.image].to_pylist()
        text, bad_text = utf8_text(batch[cols.text])
        batch = batch.set_column(batch.schema.get_field_index(cols.text), cols.text, text)
        results = [self.row(*fields) for fields in zip(keys, statuses, messages, bad_text, images)]
        errors, pixels = zip(*results) if results else ((), ())
        batch = batch.append_column(schema.ERROR, pa.array(errors, pa.string()))
        return batch.append_column(schema.PIXELS, pa.array(pixels, pa.binary()))
