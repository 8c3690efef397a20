"""An image folder's captions.csv with an unbalanced quote is refused, naming its line, before anything is
scored; a sound table (a quoted caption with a line break in it included) is read as before."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.core import errors
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.sources import expand_inputs


def _folder(tmp_path, flickr_pairs, table: str, name: str = "captions.csv", n: int = 6):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (image, _) in enumerate(flickr_pairs[:n], start=1):
        shutil.copy(image, folder / f"img{i}.jpg")
    (folder / name).write_text(table, encoding="utf-8")
    return folder


def _score(folder, run):
    return CliRunner().invoke(app, ["score", str(folder), "-o", str(run), "--scorer", "rules"], catch_exceptions=False)


UNBALANCED = (
    "file_name,text\n"
    "img1.jpg,A dog runs on the grass\n"
    'img2.jpg,"A cat sleeps on a sofa\n'  # the quote never closes: the rest of the file is one caption
    "img3.jpg,A bird flies over the sea\n"
    "img4.jpg,A boy jumps into a pool\n"
    "img5.jpg,Two girls play in the park\n"
    "img6.jpg,A red car parks by the road\n"
)
SWALLOWED = (
    "file_name,text\n"
    "img1.jpg,A dog runs on the grass\n"
    'img2.jpg,"A cat sleeps on a sofa\n'
    "img3.jpg,A bird flies over the sea\n"
    'img4.jpg,A boy jumps into a pool"\n'  # a later quote closes it: three records became one
    "img5.jpg,Two girls play in the park\n"
    "img6.jpg,A red car parks by the road\n"
)


@pytest.mark.parametrize("table", [UNBALANCED, SWALLOWED], ids=["never_closed", "closed_later"])
def test_score_refuses_the_table_naming_the_line_of_the_quote(tmp_path, flickr_pairs, table):
    folder = _folder(tmp_path, flickr_pairs, table)
    result = _score(folder, tmp_path / "run")
    assert result.exit_code == 2, result.output
    errors_shown = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors_shown) == 1 and "captions.csv:3" in errors_shown[0] and "quot" in errors_shown[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_the_reader_alone_makes_a_refused_table_one_unreadable_shard_row(tmp_path, flickr_pairs):
    folder = _folder(tmp_path, flickr_pairs, SWALLOWED)
    rows = list(read_shard(expand_inputs([str(folder)])[0], ReadOptions()))
    assert len(rows) == 1 and rows[0].error == errors.UNREADABLE_SHARD
    assert "captions.csv:3" in rows[0].error_detail and "img3.jpg" in rows[0].error_detail


def test_a_tsv_table_and_a_table_with_far_fewer_rows_than_images_are_refused(tmp_path, flickr_pairs):
    tsv = 'file_name\ttext\nimg1.jpg\t"A dog\nruns\nfar\naway\nimg9 is not here"\n'
    folder = _folder(tmp_path, flickr_pairs, tsv, name="captions.tsv")
    result = _score(folder, tmp_path / "run")
    assert result.exit_code == 2 and "captions.tsv:2" in result.output and "1 rows for 6 images" in result.output


def test_a_sound_table_with_a_multi_line_quoted_caption_is_read(tmp_path, flickr_pairs):
    table = (
        "file_name,text\n"
        'img1.jpg,"A dog runs,\nthen jumps over a log"\n'  # a line break inside a properly quoted caption
        'img2.jpg,"A cat said ""hello"" to a bird"\n'
        "img3.jpg,A bird flies over the sea\n"
    )
    folder = _folder(tmp_path, flickr_pairs, table, n=3)
    result = _score(folder, tmp_path / "run")
    assert result.exit_code == 0, result.output
    rows = {r.key: r for r in read_shard(expand_inputs([str(folder)])[0], ReadOptions())}
    assert rows["img1"].caption == "A dog runs,\nthen jumps over a log" and rows["img1"].ok
    assert rows["img2"].caption == 'A cat said "hello" to a bird' and rows["img3"].ok
