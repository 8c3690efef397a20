"""Input columns from the command line and recipes, common layouts found by themselves, and the hint
that names the columns found and the flag to pass when no pair of a shard could be read."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image
from typer.testing import CliRunner

from mlmfilter.cli.app import app
from mlmfilter.runs.read import RunReader
from tests.support.builders import write_shard


def _jpeg(color=(200, 30, 30), size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _score(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["score", *map(str, args)], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def _table(run):
    reader = RunReader(run)
    return pa.concat_tables([reader.table(shard, "score") for shard in reader.sources()])


def _laion_parquet(path, n=3):
    """LAION metadata style, with image bytes: upper-case URL/TEXT columns, English caption in TEXT_EN."""
    pq.write_table(
        pa.table(
            {
                "URL": [f"http://example.com/{i}.jpg" for i in range(n)],
                "TEXT_EN": [f"a red square number {i} on a plain background" for i in range(n)],
                "jpg": [_jpeg() for _ in range(n)],
                "similarity": [0.3] * n,
            }
        ),
        path,
    )
    return path


def test_a_caption_column_not_found_names_the_columns_and_the_flag(tmp_path):
    shard = _laion_parquet(tmp_path / "laion.parquet")
    code, out = _score(shard, "-o", tmp_path / "run", "--scorer", "rules")
    assert code == 1, out  # every pair failed to read: not a success
    assert set(_table(tmp_path / "run")["error"].to_pylist()) == {"missing_caption"}
    hint = " ".join(out.split())  # the summary wraps long lines at the terminal width
    assert "no caption column among [URL, TEXT_EN, jpg, similarity]" in hint
    assert "pass --caption-column TEXT_EN" in hint

    code, out = _score(shard, "-o", tmp_path / "fixed", "--scorer", "rules", "--caption-column", "TEXT_EN")
    assert code == 0, out
    table = _table(tmp_path / "fixed")
    assert table["error"].to_pylist() == [None] * 3
    assert "--caption-column" not in out  # nothing to hint once the pairs read
    record = yaml.safe_load((tmp_path / "fixed" / "run.yaml").read_text())
    assert record["read"]["caption_column"] == "TEXT_EN"  # the run remembers how it read its inputs


def test_upper_case_laion_columns_are_found_by_themselves(tmp_path):
    shard = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": ["http://x/0.jpg", "http://x/1.jpg"],
                "TEXT": ["a red square", "another red square"],
                "JPG": [_jpeg(), _jpeg()],
            }
        ),
        shard,
    )
    code, out = _score(shard, "-o", tmp_path / "run", "--scorer", "rules")
    assert code == 0, out
    table = _table(tmp_path / "run")
    assert table["error"].to_pylist() == [None, None]
    assert table["rules_words"].to_pylist() == [3, 3]


def test_a_recipe_read_block_sets_columns_and_a_flag_overrides_it(tmp_path):
    shard = tmp_path / "pool.parquet"
    pq.write_table(
        pa.table(
            {
                "picture": [_jpeg(), _jpeg()],
                "alt_en": ["one two three", "four five six seven"],
                "alt_de": ["eins", "zwei"],
                "id": ["a" * 32, "b" * 32],
            }
        ),
        shard,
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "inputs": [str(shard)],
                "output": str(tmp_path / "run"),
                "scorers": ["rules"],
                "read": {"image_column": "picture", "caption_column": "alt_de", "uid_column": "id"},
            }
        )
    )
    code, out = _score("--recipe", recipe, "--caption-column", "alt_en")
    assert code == 0, out
    table = _table(tmp_path / "run")
    assert table["error"].to_pylist() == [None, None]
    assert table["rules_words"].to_pylist() == [3, 4]  # the flag's column, not the recipe's
    assert table["uid"].to_pylist() == ["a" * 32, "b" * 32]  # DataComp uids from the named column


def test_a_parquet_of_urls_only_says_to_download_first(tmp_path):
    shard = tmp_path / "laion-meta.parquet"
    pq.write_table(pa.table({"URL": ["http://x/0.jpg", "http://x/1.jpg"], "TEXT": ["a", "b"]}), shard)
    code, out = _score(shard, "-o", tmp_path / "run", "--scorer", "rules")
    assert code == 1, out
    table = _table(tmp_path / "run")
    assert table["error"].to_pylist() == ["missing_image", "missing_image"]  # every pair still counted
    assert "img2dataset" in table["error_detail"][0].as_py()
    text = " ".join(out.split())
    assert "only an image URL (column 'URL')" in text and "--url_col URL" in text


def test_img2dataset_folder_reads_the_tars_not_their_sidecars(tmp_path):
    shards = tmp_path / "shards"
    for s in range(2):
        write_shard(
            shards / f"{s:05d}.tar",
            [{"key": f"{s:05d}{i:04d}", "jpg": _jpeg(), "txt": "a red square here"} for i in range(2)],
        )
        pq.write_table(
            pa.table(
                {"url": ["http://x"] * 2, "key": [f"{s:05d}{i:04d}" for i in range(2)], "status": ["success"] * 2}
            ),
            shards / f"{s:05d}.parquet",
        )
        (shards / f"{s:05d}_stats.json").write_text(json.dumps({"count": 2, "successes": 2}))
    for spec in (shards, f"{shards}/*"):
        run = tmp_path / ("run-folder" if spec == shards else "run-glob")
        code, out = _score(spec, "-o", run, "--scorer", "rules")
        assert code == 0, out
        sources = RunReader(run).sources()
        assert sorted(s.url.rsplit("/", 1)[-1] for s in sources.values()) == ["00000.tar", "00001.tar"]
        assert _table(run)["error"].to_pylist() == [None] * 4


def test_tar_members_with_other_extensions_are_named_in_the_hint_and_read_with_the_flag(tmp_path):
    shard = tmp_path / "00000.tar"
    import tarfile

    from mlmfilter.io.writers import add_tar_member

    with tarfile.open(shard, "w") as tar:
        for i in range(2):
            add_tar_member(tar, f"k{i}.jpg", _jpeg())
            add_tar_member(tar, f"k{i}.caption", b"a caption with five words")
    code, out = _score(shard, "-o", tmp_path / "run", "--scorer", "rules")
    text = " ".join(out.split())
    assert code == 1 and "no caption found among [jpg, caption]; pass --caption-column caption" in text, out
    code, out = _score(shard, "-o", tmp_path / "fixed", "--scorer", "rules", "--caption-column", "caption")
    assert code == 0, out
    assert _table(tmp_path / "fixed")["rules_words"].to_pylist() == [5, 5]


def test_a_misnamed_column_and_a_parquet_without_images_are_told_once_per_shard(tmp_path):
    shard = _laion_parquet(tmp_path / "laion.parquet")
    code, out = _score(shard, "-o", tmp_path / "run", "--scorer", "rules", "--caption-column", "TEXT_DE")
    text = " ".join(out.split())
    assert code == 1 and "column 'TEXT_DE' not found (columns: URL, TEXT_EN, jpg, similarity)" in text, out
    assert text.count("TEXT_DE' not found") == 1
    pq.write_table(
        pa.table({"name": ["a.jpg"], "blob": pa.array([b"\xff\xd8\xff"], pa.large_binary()), "caption": ["x"]}),
        tmp_path / "odd.parquet",
    )
    pq.write_table(pa.table({"photo_id": [1], "caption": ["x"]}), tmp_path / "noimage.parquet")
    code, out = _score(tmp_path / "noimage.parquet", "-o", tmp_path / "run2", "--scorer", "rules")
    text = " ".join(out.split())
    assert code == 1 and "no image column among [photo_id, caption]; pass --image-column NAME" in text, out
    code, out = _score(tmp_path / "odd.parquet", "-o", tmp_path / "run3", "--scorer", "rules")
    text = " ".join(out.split())
    assert code == 1 and "no image column among [name, blob, caption]; pass --image-column blob" in text, out


def test_an_imagefolder_whose_caption_field_has_another_name(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(_jpeg())
    (folder / "metadata.csv").write_text("file_name,description_en\n0.jpg,a red square\n1.jpg,one more red square\n")
    code, out = _score(folder, "-o", tmp_path / "run", "--scorer", "rules")
    text = " ".join(out.split())
    assert (
        code == 1
        and "no caption found among [metadata.csv: file_name, description_en]; pass --caption-column description_en"
        in text
    ), out
    code, out = _score(folder, "-o", tmp_path / "fixed", "--scorer", "rules", "--caption-column", "description_en")
    assert code == 0, out
    assert _table(tmp_path / "fixed")["rules_words"].to_pylist() == [3, 4]


def test_teach_sample_reads_the_pool_with_the_column_flags(tmp_path):
    pool = tmp_path / "pool.parquet"
    captions = [f"photo number {i} of a red square on a table" for i in range(8)]
    pq.write_table(pa.table({"URL": ["http://x"] * 8, "TEXT_EN": captions, "jpg": [_jpeg() for _ in range(8)]}), pool)
    out = tmp_path / "teach"
    result = CliRunner().invoke(
        app,
        ["teach", "sample", str(pool), "-o", str(out), "--n", "4", "--clusters", "2", "--caption-column", "TEXT_EN"],
    )
    assert result.exit_code == 0, result.output
    picked = pq.read_table(out / "sample.parquet")
    assert picked.num_rows == 4 and set(picked["caption"].to_pylist()) <= set(captions)


def test_a_column_that_is_there_but_empty_is_named_as_such(tmp_path):
    shard = tmp_path / "nulls.parquet"
    pq.write_table(
        pa.table({"jpg": pa.array([None, None], pa.binary()), "caption": ["a red square", "another"]}), shard
    )
    code, out = _score(shard, "-o", tmp_path / "run", "--scorer", "rules")
    text = " ".join(out.split())
    assert code == 1 and "column 'jpg' holds no image in any row (columns: [jpg, caption])" in text, out


def test_every_hint_at_once_then_the_same_folder_takes_the_corrected_flags(tmp_path):
    """A parquet whose image and caption columns have other names: one run names both flags and exits 1;
    the same folder then takes them (no pair was read with the old options), without --overwrite."""
    shard = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"picture": [_jpeg(), _jpeg()], "alt_en": ["one two three", "four five six seven"]}), shard)
    run = tmp_path / "run"
    code, out = _score(shard, "-o", run, "--scorer", "rules")
    text = " ".join(out.split())
    assert code == 1, out
    assert "pass --image-column picture" in text and "pass --caption-column alt_en" in text  # both, in one run
    assert "1 with no usable pair" in text and "without --overwrite" in text
    code, again = _score(shard, "-o", run, "--scorer", "rules")  # the same command again: no success either
    assert code == 1 and "pass --caption-column alt_en" in " ".join(again.split()), again

    code, out = _score(shard, "-o", run, "--scorer", "rules", "--image-column", "picture", "--caption-column", "alt_en")
    assert code == 0, out
    assert "--overwrite" not in out
    table = _table(run)
    assert table["error"].to_pylist() == [None, None] and table["rules_words"].to_pylist() == [3, 4]
    record = yaml.safe_load((run / "run.yaml").read_text())
    assert record["read"] == {"image_column": "picture", "caption_column": "alt_en"}

    # once a pair was read, other read options are refused as before: they would mix two readings
    code, out = _score(shard, "-o", run, "--scorer", "rules", "--caption-column", "picture")
    assert code == 2 and "--overwrite" in out, out
