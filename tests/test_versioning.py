from components import versioning


def test_add_push_status_and_byte_identical_restore_of_an_older_version(tmp_path):
    project, remote = tmp_path / "project", str(tmp_path / "remote")
    (project / "data" / "prompts").mkdir(parents=True)
    (project / "data" / "prompts" / "train.jsonl").write_text('{"id": "1"}\n')
    versioning.ensure_repo(project, remote)  # no `dvc init` by hand
    first = versioning.version_data(project)
    pointer = (project / "data.dvc").read_text()
    assert first == versioning.data_hash(project) and first.endswith(".dir")
    assert versioning.remote_status(project) == {}  # `dvc status -c` clean

    (project / "data" / "prompts" / "test.jsonl").write_text('{"id": "2"}\n')
    assert versioning.version_data(project) != first

    clone = tmp_path / "clone"  # a fresh checkout: no data, no DVC cache, only the remote
    clone.mkdir()
    assert versioning.restore(clone, pointer, remote) == first
    restored = sorted(p.relative_to(clone / "data").as_posix() for p in (clone / "data").rglob("*.jsonl"))
    assert restored == ["prompts/train.jsonl"]  # the older version, not the latest
    assert (clone / "data" / "prompts" / "train.jsonl").read_bytes() == b'{"id": "1"}\n'
