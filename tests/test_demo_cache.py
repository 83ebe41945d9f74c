"""The demo reuses a part it built before (the pretrained tower, the held-out and calibration sets)
only when it was built for the same seed and size; otherwise the part is removed and rebuilt."""

from flows.demo import _cached, _stamp


def test_a_part_is_reused_only_for_its_seed_and_size(tmp_path):
    part = tmp_path / "heldout"
    assert not _cached(str(part), "ground_truth.parquet", {"seed": 0, "size": "tiny"})  # nothing there yet
    part.mkdir()
    (part / "ground_truth.parquet").write_bytes(b"x")
    assert not _cached(str(part), "ground_truth.parquet", {"seed": 0, "size": "tiny"})  # built before keys existed
    assert not part.exists()
    part.mkdir()
    (part / "ground_truth.parquet").write_bytes(b"x")
    _stamp(str(part), {"seed": 0, "size": "tiny"})
    assert _cached(str(part), "ground_truth.parquet", {"seed": 0, "size": "tiny"})
    assert (part / "ground_truth.parquet").exists()
    for other in ({"seed": 7, "size": "tiny"}, {"seed": 0, "size": "small"}):
        assert not _cached(str(part), "ground_truth.parquet", other) and not part.exists()
        part.mkdir()
        (part / "ground_truth.parquet").write_bytes(b"x")
        _stamp(str(part), {"seed": 0, "size": "tiny"})
    (part / "ground_truth.parquet").unlink()  # a part whose build was cut short is rebuilt
    assert not _cached(str(part), "ground_truth.parquet", {"seed": 0, "size": "tiny"}) and not part.exists()
