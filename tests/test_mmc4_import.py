"""`curate import-mmc4`: MMC4 jsonl + image folder -> document shards the reader understands."""

from __future__ import annotations

import gzip
import json
import zipfile

import numpy as np
from typer.testing import CliRunner

from curation.app.cli import app
from curation.data.shards import list_shards, read_shard
from curation.corpus.synth import Scene, encode_image, render_scene


def _mmc4_fixture(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images" / "shard_0"
    images.mkdir(parents=True)
    docs = []
    for d in range(5):
        info = []
        for j in range(2):
            name = f"{d:04x}{j:08x}.jpg"
            if not (d == 3 and j == 1):  # one image was never downloaded
                (images / name).write_bytes(encode_image(render_scene(Scene("circle", "red", "blue", "center"), 40, 40, rng), "jpg"))
            info.append({"image_name": name, "raw_url": f"https://ex.com/{name}", "matched_text_index": j, "matched_sim": 0.3})
        docs.append({"url": f"https://ex.com/doc{d}", "text_list": ["a red circle.", "another red circle.", "the end."],
                     "image_info": info, "similarity_matrix": [[0.3, 0.1, 0.1], [0.1, 0.3, 0.1]],
                     "could_have_url_duplicate": 0})
    lines = [json.dumps(d) for d in docs[:3]] + ['{"broken json', json.dumps({"url": "no text list"})]
    plain = tmp_path / "docs_shard_0_v2.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    zipped = tmp_path / "docs_shard_1_v2.jsonl.zip"
    with zipfile.ZipFile(zipped, "w") as zf:  # two jsonl inside one zip: line numbers restart
        zf.writestr("part_a.jsonl", json.dumps(docs[3]) + "\n")
        zf.writestr("part_b.jsonl", json.dumps(docs[4]) + "\n")
    gz = tmp_path / "docs_shard_2_v2.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps(docs[0]) + "\n")
    return [str(plain), str(zipped), str(gz)], str(tmp_path / "images"), docs


def test_import_mmc4_cli(tmp_path):
    files, images, docs = _mmc4_fixture(tmp_path)
    out = tmp_path / "shards" / "mmc4"
    r = CliRunner().invoke(app, ["import-mmc4", *files, "--images", images, "--out", str(out), "--samples-per-shard", "4"])
    assert r.exit_code == 0, r.output
    assert "read 8 documents: wrote 6" in r.output
    assert "2 bad lines" in r.output and "1 missing images" in r.output
    report = json.loads((out / "import_report.json").read_text())
    assert len(report["bad_lines"]) == 2 and "invalid JSON" in report["bad_lines"][0]
    assert "text_list" in report["bad_lines"][1]
    urls = list_shards(str(out))
    assert len(urls) == 2
    got = [s for u in urls for s in read_shard(u, kind="interleaved")]
    assert len(got) == 6 and all(s.ok for s in got), [s.error for s in got]
    by_url = {}
    for s in got:
        by_url.setdefault(s.doc_url, []).append(s)
    # the doc with a missing image keeps the other image, one similarity row, and says what is missing
    (d3,) = by_url["https://ex.com/doc3"]
    assert [e["image_name"] for e in d3.image_info] == [docs[3]["image_info"][0]["image_name"]]
    assert d3.similarity_matrix == [[0.3, 0.1, 0.1]]
    assert d3.meta["missing_images"] == [docs[3]["image_info"][1]["image_name"]]
    # images are members named <key>.<image_name>, bytes unchanged
    (d0a, d0b) = by_url["https://ex.com/doc0"]
    name = docs[0]["image_info"][0]["image_name"]
    assert d0a.images[name] == (tmp_path / "images" / "shard_0" / name).read_bytes()
    assert d0a.key != d0b.key  # same document from two files: two samples, two keys


def test_import_mmc4_missing_inputs(tmp_path):
    r = CliRunner().invoke(app, ["import-mmc4", str(tmp_path / "nope.jsonl"), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not found" in r.output
