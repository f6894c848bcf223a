"""`tasks.tracking`: MLflow's source tags and the prepared splits as dataset inputs whose digest
is the file's DVC md5 (what fills the runs table's Source, Version and Dataset columns)."""
import hashlib
import json

import pytest

from tasks import tracking as T


def splits_and_store(tmp_path):
    """A data folder with three small split files, a sqlite store and an experiment in it."""
    data = tmp_path / "data"
    data.mkdir()
    for stem in ("calib", "train", "eval"):
        (data / f"{stem}.safetensors").write_bytes(stem.encode() * 10)
    client = T.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return data, client, T.experiment_id(client, "e", tmp_path / "mlartifacts")


def test_splits_logged_as_datasets_with_dvc_digest_and_source_tags(tmp_path):
    data, client, exp = splits_and_store(tmp_path)
    tags = T.source_tags({"git_commit": "abc123"}, "frugalflow tiny")
    run_id = T.start_run(client, exp, "r", tags=tags)
    assert T.log_datasets(client, run_id, data, "feed.dir") == ["data/calib", "data/train", "data/eval"]
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.source.git.commit"] == "abc123"
    assert run.data.tags["mlflow.source.name"] == "frugalflow tiny"
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    got = {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}, json.loads(d.dataset.source))
           for d in run.inputs.dataset_inputs}
    for stem, context in (("calib", "calibration"), ("train", "training"), ("eval", "evaluation")):
        digest, dtags, source = got[f"data/{stem}"]
        assert digest == hashlib.md5(stem.encode() * 10).hexdigest()
        assert dtags["mlflow.data.context"] == context
        assert source["dvc_dir_md5"] == "feed.dir"



def test_calibration_sources_and_generated_text_are_recorded(tmp_path):
    """The recipe's data per stage in MLflow: the calib split names the corpora its windows came from
    (data.calib_mix), and a distillation stage on teacher text adds that text with its prompts."""
    from helpers import stage_config

    data, client, exp = splits_and_store(tmp_path)
    (data / "manifest.json").write_text(json.dumps({"splits": {"calib": {"windows": 32, "sources": {
        "pydoc_topics": {"windows": 20}, "french": {"windows": 4, "files": ["corpora/x/french.txt"]},
        "russian": {"windows": 8}}}}}))
    stages = [stage_config("rtn"), stage_config("tsld", train_splits=["generated"], generated_sequences=8,
                                                generated_prompts=["", "Voici"])]
    run_id = T.start_run(client, exp, "r")
    names = T.log_datasets(client, run_id, data, "feed.dir", stages)
    assert names == ["data/calib", "data/train", "data/eval", "generated/tsld"]
    got = {d.dataset.name: (json.loads(d.dataset.source), {t.key: t.value for t in d.tags})
           for d in client.get_run(run_id).inputs.dataset_inputs}
    assert got["data/calib"][0]["sources"] == {"pydoc_topics": 20, "french": 4, "russian": 8}
    assert "sources" not in got["data/eval"][0]
    source, tags = got["generated/tsld"]
    assert source["prompts"] == ["", "Voici"] and source["sequences"] == 8
    assert tags["mlflow.data.context"] == "training"


def test_dataset_inserted_by_a_concurrent_run_is_linked_not_fatal(tmp_path):
    """Two nightly runs of one experiment log the same splits at once: the store looks the dataset up,
    the other run inserts it, and this run's insert fails on the unique key (seen on PostgreSQL in CI).
    The genuine store error is produced here by inserting the duplicate row through the store's own
    session; log_datasets tries again, finds the dataset and links it, and both runs list all splits."""
    import uuid

    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.dbmodels.models import SqlDataset

    data, client, exp = splits_and_store(tmp_path)
    first, second = (T.start_run(client, exp, name) for name in ("first", "second"))
    T.log_datasets(client, first, data, "feed.dir")

    store = client._tracking_client.store
    digest = hashlib.md5(b"calib" * 10).hexdigest()
    lost_race = None
    try:
        with store.ManagedSessionMaker(read_only=False) as session:
            session.add(SqlDataset(dataset_uuid=uuid.uuid4().hex, experiment_id=int(exp), name="data/calib",
                                   digest=digest, dataset_source_type="local", dataset_source="{}"))
    except MlflowException as exc:
        lost_race = exc
    assert T._is_dataset_race(lost_race), str(lost_race)

    calls = []
    real = client.log_inputs

    def racing(run_id, datasets):
        calls.append(run_id)
        if len(calls) == 1:
            raise lost_race
        return real(run_id, datasets=datasets)

    client.log_inputs = racing
    assert T.log_datasets(client, second, data, "feed.dir") == ["data/calib", "data/train", "data/eval"]
    assert calls == [second, second]
    for run_id in (first, second):
        assert sorted(d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs) == [
            "data/calib", "data/eval", "data/train"]
    with store.ManagedSessionMaker() as session:
        assert session.query(SqlDataset).count() == 3


def test_other_store_errors_are_not_retried(tmp_path):
    from mlflow.exceptions import MlflowException

    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.safetensors").write_bytes(b"x")
    client = T.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    calls = []

    def broken(run_id, datasets):
        calls.append(run_id)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run 'r' not found")

    client.log_inputs = broken
    with pytest.raises(MlflowException, match="not found"):
        T.log_datasets(client, "r", data, "feed.dir")
    assert calls == ["r"]
