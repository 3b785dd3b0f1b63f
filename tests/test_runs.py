"""Run directories never lose data: overwrite only runs, never inputs; resume only the same config."""

import json

import pytest

from stepdistill.config import AnnotateRun, build
from stepdistill.errors import RunExistsError
from stepdistill.runs import create_run


def _cfg(split="train"):
    return build(AnnotateRun, {"task": {"name": "svamp"}, "split": split, "teacher": {"kind": "paper"}})


def test_status_records_whether_the_stage_finished(tmp_path):
    with create_run(tmp_path / "ok", _cfg(), command="annotate"):
        pass
    assert json.loads((tmp_path / "ok" / "env.json").read_text())["status"] == "done"
    with pytest.raises(ValueError):
        with create_run(tmp_path / "bad", _cfg(), command="annotate"):
            raise ValueError("boom")
    assert json.loads((tmp_path / "bad" / "env.json").read_text())["status"] == "failed"


def test_overwrite_deletes_only_run_directories_and_never_inputs(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "train.jsonl").write_text("{}\n")
    with pytest.raises(RunExistsError, match="not a stepdistill run"):
        create_run(precious, _cfg(), command="annotate", overwrite=True)
    assert (precious / "train.jsonl").is_file()
    with create_run(tmp_path / "run", _cfg(), command="annotate"):
        pass
    (tmp_path / "run" / "model").mkdir()
    with pytest.raises(RunExistsError, match="an input of this run"):
        create_run(tmp_path / "run", _cfg(), command="eval", overwrite=True, inputs=(tmp_path / "run" / "model",))
    assert (tmp_path / "run" / "model").is_dir()
    create_run(tmp_path / "run", _cfg(), command="annotate", overwrite=True).close()
    assert not (tmp_path / "run" / "model").exists()


def test_resume_refuses_a_changed_config(tmp_path):
    with create_run(tmp_path / "run", _cfg("train"), command="annotate"):
        pass
    create_run(tmp_path / "run", _cfg("train"), command="annotate", resume=True).close()
    with pytest.raises(RunExistsError, match="differs in split"):
        create_run(tmp_path / "run", _cfg("test"), command="annotate", resume=True)


def test_eval_has_no_resume_to_suggest(tmp_path):
    with create_run(tmp_path / "run", _cfg(), command="eval"):
        pass
    with pytest.raises(RunExistsError) as e:
        create_run(tmp_path / "run", _cfg(), command="eval")
    assert "--overwrite" in str(e.value) and "--resume" not in str(e.value)
