"""A workdir's round folders are found in round order, and nothing else counts as a round."""

from __future__ import annotations

from capfilt import workdir


def test_round_dirs_are_in_numeric_order_and_only_rounds(tmp_path):
    for name in ("round-10", "round-2", "round-0", "round-x", "rounds"):
        (tmp_path / name).mkdir()
    (tmp_path / "round-3").write_text("a file, not a round")
    assert [d.name for d in workdir.round_dirs(tmp_path)] == ["round-0", "round-2", "round-10"]
    assert workdir.round_dir(tmp_path, 4) == tmp_path / "round-4"
