from components import versioning


def test_add_push_status_and_byte_identical_pull(tmp_path):
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    (tmp_path / "data" / "prompts" / "train.jsonl").write_text('{"id": "1"}\n')
    versioning.ensure_repo(tmp_path, str(tmp_path / "remote"))  # no `dvc init` by hand
    first = versioning.version_data(tmp_path)
    assert first == versioning.data_hash(tmp_path) and first.endswith(".dir")
    assert versioning.remote_status(tmp_path) == {}  # `dvc status -c` clean

    (tmp_path / "data" / "prompts" / "test.jsonl").write_text('{"id": "2"}\n')
    assert versioning.version_data(tmp_path) != first

    import shutil
    shutil.rmtree(tmp_path / "data")
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    versioning.pull(tmp_path)
    assert (tmp_path / "data" / "prompts" / "test.jsonl").read_text() == '{"id": "2"}\n'
