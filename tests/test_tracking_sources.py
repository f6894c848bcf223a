"""`tasks.tracking`: MLflow's source tags and the prepared splits as dataset inputs whose digest
is the file's DVC md5 (what fills the runs table's Source, Version and Dataset columns)."""
import hashlib
import json

from tasks import tracking as T


def test_splits_logged_as_datasets_with_dvc_digest_and_source_tags(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for stem in ("calib", "train", "eval"):
        (data / f"{stem}.safetensors").write_bytes(stem.encode() * 10)
    client = T.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = T.experiment_id(client, "e", tmp_path / "mlartifacts")
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
