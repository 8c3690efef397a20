from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlmfilter.core import errors
from mlmfilter.io.readers import ReadOptions, read_shard
from mlmfilter.io.sources import ShardSource, expand_inputs
from mlmfilter.io.uid import derive_uid
from mlmfilter.io.writers import add_tar_member


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            add_tar_member(tar, name, data)
    return buf.getvalue()


def uid_of(i: int) -> str:
    return f"{i:032x}"


def pair_members(pairs, start: int = 0) -> list[tuple[str, bytes]]:
    """img2dataset layout: KEY.jpg, KEY.json, KEY.txt per pair, json carrying the DataComp uid."""
    members = []
    for i, (image_path, caption) in enumerate(pairs, start=start):
        key = f"{i:09d}"
        members += [
            (f"{key}.jpg", image_path.read_bytes()),
            (f"{key}.json", json.dumps({"uid": uid_of(i), "url": f"http://x/{i}.jpg"}).encode()),
            (f"{key}.txt", caption.encode()),
        ]
    return members


def write_shard(path: Path, data: bytes) -> ShardSource:
    path.write_bytes(data)
    (source,) = expand_inputs([str(path)])
    return source


def member_offsets(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_good_shard_yields_every_pair_with_uid_caption_and_raw_bytes(tmp_path, flickr_pairs):
    pairs = flickr_pairs[:10]
    source = write_shard(tmp_path / "00000007.tar", tar_bytes(pair_members(pairs)))
    samples = list(read_shard(source))
    assert len(samples) == 10
    for i, (sample, (image_path, caption)) in enumerate(zip(samples, pairs)):
        assert sample.ok, sample.error_detail
        assert (sample.key, sample.uid, sample.shard) == (f"{i:09d}", uid_of(i), "00000007")
        assert sample.caption == caption
        assert sample.image_bytes == image_path.read_bytes() and sample.image_format == "jpg"
        assert sample.meta == {"uid": uid_of(i), "url": f"http://x/{i}.jpg"}


def test_uids_are_derived_when_the_json_has_none_and_keys_keep_directories(tmp_path, flickr_pairs):
    (img, caption), (img2, caption2) = flickr_pairs[:2]
    members = [
        ("part/a.jpeg", img.read_bytes()),
        ("part/a.txt", caption.encode()),
        ("part/a.json", b'{"uid": "not-a-uid"}'),
        ("part/b.PNG", img2.read_bytes()),  # extension case is ignored, as in webdataset
        ("part/b.txt", caption2.encode()),
        ("part/b.seg.png", b"mask"),  # not an image extension of this pair
        ("part/._a.jpg", b"macos resource fork"),
    ]
    source = write_shard(tmp_path / "s.tar", tar_bytes(members))
    a, b = list(read_shard(source))
    assert a.ok and b.ok
    assert (a.key, a.image_format, a.uid) == ("part/a", "jpeg", derive_uid("s.tar", "part/a"))
    assert (b.key, b.image_format, b.uid) == ("part/b", "png", derive_uid("s.tar", "part/b"))
    png_only = list(read_shard(source, ReadOptions(image_exts=(".PNG",))))
    assert [s.error for s in png_only] == [errors.MISSING_IMAGE, None]


def test_each_bad_sample_becomes_an_error_row_and_reading_goes_on(tmp_path, flickr_pairs):
    jpeg = flickr_pairs[0][0].read_bytes()
    members = [
        ("0.txt", b"caption without image"),
        ("1.jpg", jpeg),  # no caption
        ("2.jpg", jpeg),
        ("2.txt", b"fine caption"),
        ("2.json", b"{not json"),
        ("3.jpg", jpeg),
        ("3.txt", b"caf\xe9 au lait"),  # latin-1, not UTF-8
        ("4.jpg", jpeg),
        ("4.txt", b" \n\t "),
        ("5.jpg", jpeg),
        ("5.txt", b"x" * 100_000),
        ("6.jpg", b""),
        ("6.txt", b"zero-byte image"),
        ("7.jpg", jpeg),
        ("7.txt", b"still read after all that"),
    ]
    samples = list(read_shard(write_shard(tmp_path / "bad.tar", tar_bytes(members))))
    assert [s.key for s in samples] == [str(i) for i in range(8)]
    assert [s.error for s in samples] == [
        errors.MISSING_IMAGE,
        errors.MISSING_CAPTION,
        errors.BAD_METADATA,
        errors.CAPTION_ENCODING,
        errors.EMPTY_CAPTION,
        errors.CAPTION_TOO_LONG,
        None,
        None,
    ]
    by_key = {s.key: s for s in samples}
    assert by_key["2"].caption == "fine caption" and by_key["2"].image_bytes == jpeg and by_key["2"].meta == {}
    assert by_key["3"].caption == "caf\ufffd au lait"
    assert by_key["5"].caption == "x" * 10_000 and "100000" in by_key["5"].error_detail
    assert by_key["6"].image_bytes == b"" and by_key["6"].image_format == "jpg"  # the decoder flags it
    assert by_key["7"].caption == "still read after all that"
    assert all(s.error_detail for s in samples if s.error)
    short = list(read_shard(write_shard(tmp_path / "b2.tar", tar_bytes(members)), ReadOptions(max_caption_chars=5)))
    assert short[7].error == errors.CAPTION_TOO_LONG and short[7].caption == "still"


@pytest.mark.parametrize("cut", ["mid_image", "mid_header", "member_boundary"])
def test_truncated_tar_keeps_complete_samples_then_one_truncated_row(tmp_path, flickr_pairs, cut):
    pairs = flickr_pairs[:6]
    data = tar_bytes(pair_members(pairs))
    info = member_offsets(data)["000000004.jpg"]  # the 5th pair's image
    end = {
        "mid_image": info.offset_data + info.size // 2,
        "mid_header": info.offset + 100,
        "member_boundary": info.offset,  # 4 pairs intact, no end-of-archive marker
    }[cut]
    samples = list(read_shard(write_shard(tmp_path / "cut.tar", data[:end])))
    assert [s.key for s in samples[:-1]] == [f"{i:09d}" for i in range(4)]
    assert all(s.ok for s in samples[:-1])
    last = samples[-1]
    assert last.error == errors.TRUNCATED_SHARD and last.key.startswith("__truncated__@")
    assert len(last.uid) == 32 and last.image_bytes is None
    if cut == "mid_image":
        assert last.key == "__truncated__@000000004.jpg"


def test_gzipped_tar_reads_and_a_cut_gzip_stream_is_truncated(tmp_path, flickr_pairs):
    data = gzip.compress(tar_bytes(pair_members(flickr_pairs[:3])), mtime=0)
    whole = list(read_shard(write_shard(tmp_path / "z.tar.gz", data)))
    assert [s.ok for s in whole] == [True, True, True]
    cut = list(read_shard(write_shard(tmp_path / "zcut.tar.gz", data[: len(data) * 2 // 3])))
    assert cut[-1].error == errors.TRUNCATED_SHARD
    assert all(s.ok for s in cut[:-1]) and 1 <= len(cut) - 1 <= 2


def test_unreadable_and_empty_shards(tmp_path, flickr_pairs):
    jpeg_named_tar = write_shard(tmp_path / "photo.tar", flickr_pairs[0][0].read_bytes())
    empty_file = write_shard(tmp_path / "empty.tar", b"")
    missing = ShardSource(id="gone", url=str(tmp_path / "gone.tar"), format="tar")
    for source in (jpeg_named_tar, empty_file, missing):
        (row,) = list(read_shard(source))
        assert row.error == errors.UNREADABLE_SHARD and row.shard == source.id and source.url in row.error_detail
    # a valid archive with no members is not an error
    assert list(read_shard(write_shard(tmp_path / "nothing.tar", tar_bytes([])))) == []


def test_tar_is_streamed_not_loaded(tmp_path, flickr_pairs):
    data = tar_bytes(pair_members(flickr_pairs))
    source = write_shard(tmp_path / "all.tar", data)
    del data
    largest_image = max(p.stat().st_size for p, _ in flickr_pairs)
    tracemalloc.start()
    try:
        count = 0
        for sample in read_shard(source):
            count += sample.ok
            del sample
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    shard_size = (tmp_path / "all.tar").stat().st_size
    assert count == len(flickr_pairs)
    assert peak < 4 * largest_image + 2_000_000 < shard_size, (peak, shard_size)


# -- parquet ---------------------------------------------------------------------------------------


def test_parquet_with_image_bytes_streams_row_groups(tmp_path, flickr_pairs):
    pairs = flickr_pairs[:9]
    table = pa.table(
        {
            "jpg": [p.read_bytes() for p, _ in pairs[:-1]] + [None],
            "caption": [c for _, c in pairs],
            "uid": [uid_of(i) for i in range(9)],
            "url": [f"http://x/{i}" for i in range(9)],
        }
    )
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=4)
    samples = list(read_shard(expand_inputs([str(tmp_path / "part.parquet")])[0], ReadOptions(parquet_batch_rows=3)))
    assert [s.key for s in samples] == [str(i) for i in range(9)]
    assert [s.uid for s in samples] == [uid_of(i) for i in range(9)]
    assert all(s.ok for s in samples[:-1]) and samples[-1].error == errors.MISSING_IMAGE
    assert samples[3].image_bytes == pairs[3][0].read_bytes() and samples[3].image_format == "jpg"
    assert samples[3].caption == pairs[3][1] and samples[3].meta["url"] == "http://x/3"


def test_parquet_with_hf_image_structs_and_with_relative_paths(tmp_path, flickr_pairs):
    pairs = flickr_pairs[:4]
    hf = pa.table(
        {
            "image": [{"bytes": p.read_bytes(), "path": p.name} for p, _ in pairs],
            "text": [c for _, c in pairs],
            "key": [p.stem for p, _ in pairs],
        }
    )
    pq.write_table(hf, tmp_path / "hf.parquet")
    hf_samples = list(read_shard(expand_inputs([str(tmp_path / "hf.parquet")])[0]))
    assert [s.key for s in hf_samples] == [p.stem for p, _ in pairs]
    assert all(s.ok and s.image_format == "jpg" for s in hf_samples)
    assert [s.caption for s in hf_samples] == [c for _, c in pairs]
    assert hf_samples[0].uid == derive_uid("hf.parquet", pairs[0][0].stem)

    (tmp_path / "imgs").mkdir()
    for p, _ in pairs[:3]:  # the 4th image is listed but absent
        (tmp_path / "imgs" / p.name).write_bytes(p.read_bytes())
    by_path = pa.table({"image_path": [f"imgs/{p.name}" for p, _ in pairs], "txt": [c for _, c in pairs]})
    pq.write_table(by_path, tmp_path / "paths.parquet")
    path_samples = list(read_shard(expand_inputs([str(tmp_path / "paths.parquet")])[0]))
    assert [s.ok for s in path_samples] == [True, True, True, False]
    assert path_samples[1].image_bytes == pairs[1][0].read_bytes()
    assert path_samples[3].error == errors.MISSING_IMAGE and pairs[3][0].name in path_samples[3].error_detail

    pq.write_table(pa.table({"url": ["http://x"], "caption": ["c"]}), tmp_path / "meta_only.parquet")
    (row,) = list(read_shard(expand_inputs([str(tmp_path / "meta_only.parquet")])[0]))
    # a parquet of URLs: every pair counted, each saying the images are still to be downloaded
    assert row.error == errors.MISSING_IMAGE and "img2dataset" in row.error_detail and "'url'" in row.error_detail
    pq.write_table(pa.table({"caption": ["c"]}), tmp_path / "captions_only.parquet")
    (row,) = list(read_shard(expand_inputs([str(tmp_path / "captions_only.parquet")])[0]))
    assert row.error == errors.UNREADABLE_SHARD and "no image bytes column" in row.error_detail


# -- folders ---------------------------------------------------------------------------------------


def test_folder_with_captions_jsonl(tmp_path, flickr_pairs):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    pairs = flickr_pairs[:4]
    for p, _ in pairs:
        (folder / "sub" / p.name).write_bytes(p.read_bytes())
    lines = [json.dumps({"file": f"sub/{p.name}", "caption": c, "source": "flickr"}).encode() for p, c in pairs[:3]]
    lines.append(b'{"file": "sub/absent.jpg", "caption": "no such image"}')
    lines.append(b'{"file": "sub/' + pairs[0][0].name.encode() + b'", "caption": "second caption \xff"}')
    (folder / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (source,) = expand_inputs([str(folder)])
    samples = {s.key: s for s in read_shard(source)}
    first, second, third, fourth = (f"sub/{p.stem}" for p, _ in pairs)
    assert set(samples) == {f"{first}#0", f"{first}#1", second, third, fourth, "sub/absent"}
    assert samples[second].ok and samples[second].caption == pairs[1][1]
    assert samples[second].image_bytes == pairs[1][0].read_bytes() and samples[second].meta == {
        "source": "flickr",
        "file": f"sub/{pairs[1][0].name}",
    }
    assert samples[f"{first}#0"].ok and samples[f"{first}#1"].error == errors.CAPTION_ENCODING
    assert samples[f"{first}#1"].caption == "second caption \ufffd"
    assert samples[fourth].error == errors.MISSING_CAPTION  # image with no captions row
    assert samples["sub/absent"].error == errors.MISSING_IMAGE  # captions row with no image
    assert samples[second].uid == derive_uid("photos", second)


def test_real_flickr_folder_reads_every_caption_row(flickr_dir, flickr_pairs):
    (source,) = expand_inputs([str(flickr_dir)])
    samples = list(read_shard(source))
    assert source.format == "folder" and len(samples) == 5 * len(flickr_pairs)
    assert all(s.ok for s in samples)
    first_image, first_caption = flickr_pairs[0]
    s0 = samples[0]
    assert s0.key == f"images/{first_image.stem}#0" and s0.caption == first_caption
    assert s0.image_bytes == first_image.read_bytes() and s0.meta["caption_idx"] == "0"
    assert len({s.uid for s in samples}) == len(samples)


def test_folder_of_webdataset_sidecars(tmp_path, flickr_pairs):
    folder = tmp_path / "00000"
    folder.mkdir()
    for name, data in pair_members(flickr_pairs[:3]):
        (folder / name).write_bytes(data)
    (folder / "000000002.txt").unlink()
    samples = list(read_shard(expand_inputs([str(folder)])[0]))
    assert [(s.key, s.uid, s.error) for s in samples] == [
        ("000000000", uid_of(0), None),
        ("000000001", uid_of(1), None),
        ("000000002", uid_of(2), errors.MISSING_CAPTION),
    ]


def test_a_damaged_parquet_row_group_loses_only_its_own_rows(tmp_path, flickr_pairs):
    pairs = flickr_pairs[:6]
    table = pa.table({"jpg": [p.read_bytes() for p, _ in pairs], "caption": [c for _, c in pairs]})
    pq.write_table(table, tmp_path / "ok.parquet", row_group_size=2)
    chunk = pq.ParquetFile(tmp_path / "ok.parquet").metadata.row_group(1).column(1)  # captions of rows 2-3
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray((tmp_path / "ok.parquet").read_bytes())
    data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    samples = list(read_shard(write_shard(tmp_path / "damaged.parquet", bytes(data))))
    assert [(s.key, s.error) for s in samples] == [
        ("0", None),
        ("1", None),
        ("__truncated__@row2", errors.TRUNCATED_SHARD),
        ("4", None),
        ("5", None),
    ]
    assert "2 rows lost" in samples[2].error_detail and samples[4].caption == pairs[5][1]


# -- GIF / BMP / TIFF, Hugging Face imagefolder, column names in any case ----------------------------


def _encoded(fmt: str, color=(10, 200, 30), size=(40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "GIF":  # two frames: the first one (green) is the image
        frames = [Image.new("RGB", size, color), Image.new("RGB", size, (0, 0, 255))]
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    else:
        Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _decoded(samples):
    from mlmfilter.images.decode import DecodeSpec, decode_sample

    return [decode_sample(s, DecodeSpec()) for s in samples]


FORMATS = {"gif": "GIF", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}


def test_gif_bmp_and_tiff_are_images_in_tars_folders_and_parquet(tmp_path):
    members = []
    for i, (ext, fmt) in enumerate(FORMATS.items()):
        members += [(f"k{i}.{ext}", _encoded(fmt)), (f"k{i}.txt", f"a {fmt} picture".encode())]
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in members:
        (folder / name).write_bytes(data)
    pq.write_table(
        pa.table({"image": [_encoded(f) for f in FORMATS.values()], "caption": list(FORMATS.values())}),
        tmp_path / "p.parquet",
    )
    for spec in ("s.tar", "folder", "p.parquet"):
        (source,) = expand_inputs([str(tmp_path / spec)])
        samples = _decoded(read_shard(source))
        assert [s.error for s in samples] == [None] * 4, (spec, [s.error_detail for s in samples])
        for s in samples:
            assert s.image.mode == "RGB" and (s.width, s.height) == (40, 30)
            assert s.image.getpixel((20, 15))[1] > 150  # green: the GIF's first frame, not its blue second
        if spec == "p.parquet":  # bytes without a name: the format comes from the magic bytes
            assert [s.image_format for s in read_shard(source)] == ["gif", "bmp", "tiff", "tiff"]


@pytest.mark.parametrize("table", ["metadata.jsonl", "metadata.csv"])
def test_hugging_face_imagefolder_metadata(tmp_path, table):
    root = tmp_path / "imagefolder"
    (root / "train").mkdir(parents=True)
    rows = [{"file_name": f"train/{i}.png", "Text": f"caption number {i}", "source": "web"} for i in range(3)]
    for row in rows:
        (root / row["file_name"]).write_bytes(_encoded("PNG"))
    if table.endswith(".jsonl"):
        (root / table).write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (root / table).write_text(
            "file_name,Text,source\n" + "".join(f"{r['file_name']},{r['Text']},web\n" for r in rows)
        )
    (source,) = expand_inputs([str(root)])
    samples = list(read_shard(source))
    assert [s.error for s in samples] == [None] * 3
    assert [s.caption for s in samples] == [f"caption number {i}" for i in range(3)]
    assert [s.key for s in samples] == ["train/0", "train/1", "train/2"]
    assert samples[0].meta == {"source": "web", "file_name": "train/0.png"}  # where the image came from, kept


def test_a_hugging_face_imagefolder_given_at_its_root_reads_each_split(tmp_path):
    root = tmp_path / "dataset"
    for split, n in (("train", 3), ("test", 2)):
        (root / split).mkdir(parents=True)
        rows = [{"file_name": f"{i}.png", "text": f"{split} caption {i}"} for i in range(n)]
        for row in rows:
            (root / split / row["file_name"]).write_bytes(_encoded("PNG"))
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = expand_inputs([str(root)])
    assert [(s.id, s.format) for s in sources] == [("test", "folder"), ("train", "folder")]
    samples = [s for source in sources for s in read_shard(source)]
    assert [s.error for s in samples] == [None] * 5
    assert sorted(s.caption for s in samples) == sorted(
        [f"train caption {i}" for i in range(3)] + ["test caption 0", "test caption 1"]
    )
    assert {s.meta["file_name"] for s in samples} == {"0.png", "1.png", "2.png"}


def test_a_sidecar_folder_sample_keeps_its_image_file_name(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "dog.png").write_bytes(_encoded("PNG"))
    (tmp_path / "photos" / "dog.txt").write_text("a dog")
    (source,) = expand_inputs([str(tmp_path / "photos")])
    (sample,) = list(read_shard(source))
    assert sample.error is None and sample.meta == {"file_name": "dog.png"}


def test_columns_named_in_the_options_match_in_any_case_and_a_text_image_column_is_a_path(tmp_path):
    (tmp_path / "a.png").write_bytes(_encoded("PNG"))
    pq.write_table(
        pa.table({"Picture_File": ["a.png"], "Caption_EN": ["hello"], "UID": ["c" * 32]}), tmp_path / "p.parquet"
    )
    (source,) = expand_inputs([str(tmp_path / "p.parquet")])
    options = ReadOptions(image_column="picture_file", caption_column="caption_en", uid_column="uid")
    (sample,) = list(read_shard(source, options))
    assert (
        sample.error is None and sample.caption == "hello" and sample.uid == "c" * 32 and sample.image_format == "png"
    )
    (missing,) = list(read_shard(source, ReadOptions(caption_column="TEXT_DE")))
    assert (
        missing.error == errors.UNREADABLE_SHARD
        and "'TEXT_DE' not found (columns: Picture_File, Caption_EN, UID)" in missing.error_detail
    )


def test_an_img2dataset_glob_skips_parquet_and_stats_sidecars_but_a_named_parquet_is_read(tmp_path):
    (tmp_path / "00000.tar").write_bytes(tar_bytes([("k.jpg", _encoded("JPEG")), ("k.txt", b"c")]))
    pq.write_table(pa.table({"url": ["http://x"], "caption": ["c"]}), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")
    pq.write_table(pa.table({"jpg": [_encoded("JPEG")], "caption": ["c"]}), tmp_path / "extra.parquet")
    names = lambda specs: [s.url.rsplit("/", 1)[-1] for s in expand_inputs(specs)]  # noqa: E731
    assert names([f"{tmp_path}/*"]) == ["00000.tar", "extra.parquet"]
    assert names([str(tmp_path)]) == ["00000.tar", "extra.parquet"]
    assert names([str(tmp_path / "00000.parquet")]) == ["00000.parquet"]  # named literally: read as named
