"""Run directories never lose data: overwrite only runs, never inputs; resume only the same config."""

import json

import pytest
import yaml

from stepdistill.config import AnnotateRun, TrainRun, build
from stepdistill.errors import RunExistsError
from stepdistill.resuming import config_changes, resumed_config
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
    with pytest.raises(RunExistsError, match="not a stepdistill annotate output"):
        create_run(precious, _cfg(), command="annotate", overwrite=True)
    assert (precious / "train.jsonl").is_file()
    with create_run(tmp_path / "run", _cfg(), command="eval"):
        pass
    (tmp_path / "run" / "model").mkdir()
    with pytest.raises(RunExistsError, match="holds .*model, which this command must not delete"):
        create_run(tmp_path / "run", _cfg(), command="eval", overwrite=True, inputs=(tmp_path / "run" / "model",))
    assert (tmp_path / "run" / "model").is_dir()
    create_run(tmp_path / "run", _cfg(), command="eval", overwrite=True).close()
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


def _train_cfg(**training):
    return build(TrainRun, {"task": {"name": "svamp"}, "student": {"model": "x"}, "method": {"name": "standard"},
                            "training": training})


def _written_before_fields_existed(d, cfg, *absent):
    """A run directory as an older stepdistill wrote it: its config lacks the `absent` fields."""
    with create_run(d, cfg, command="train"):
        pass
    saved = yaml.safe_load((d / "config.yaml").read_text())
    for path in absent:
        section, name = path.split(".")
        del saved[section][name]
    (d / "config.yaml").write_text(yaml.safe_dump(saved))


def test_resume_of_a_run_older_than_a_field_goes_on_as_it_began(tmp_path):
    """A field added since the run was written is absent from its config: resume is not refused for
    it, and the field takes the value the run ran with (length grouping did not exist: off)."""
    d = tmp_path / "run"
    _written_before_fields_existed(d, _train_cfg(), "training.group_by_length", "training.gradient_checkpointing")
    cfg = resumed_config(d, _train_cfg())
    assert cfg.training.group_by_length is False and cfg.training.gradient_checkpointing is False
    create_run(d, cfg, command="train", resume=True).close()
    assert yaml.safe_load((d / "config.yaml").read_text())["training"]["group_by_length"] is False
    # Set explicitly to what the old run did not do: a changed config, refused by name.
    _written_before_fields_existed(tmp_path / "run2", _train_cfg(), "training.group_by_length")
    explicit = resumed_config(tmp_path / "run2", _train_cfg(group_by_length=True))
    assert explicit.training.group_by_length is True
    with pytest.raises(RunExistsError, match="differs in training.group_by_length"):
        create_run(tmp_path / "run2", explicit, command="train", resume=True)
    # An explicit setting is never overridden, and a new run is untouched.
    assert resumed_config(d, _train_cfg(group_by_length=True)).training.group_by_length is True
    assert resumed_config(tmp_path / "new", _train_cfg()).training.group_by_length is True


def test_resume_keeps_the_exact_speed_ups_it_began_with_and_accepts_an_explicit_change(tmp_path):
    """The exact speed-ups compute the paper step's loss and gradients with either value
    (tests/test_speedups.py). A resume left at their defaults goes on with the values the run began
    with (fuse_tasks' default changed on 2026-12-06); a value set explicitly is accepted, as is a
    sweep's cell on disk made with another, and log.txt names the old values; any other changed
    training field is still refused by name."""
    d = tmp_path / "run"
    create_run(d, _train_cfg(fuse_tasks=True, fused_gelu=False), command="train").close()
    kept = resumed_config(d, _train_cfg())  # today's defaults: fuse_tasks None, fused_gelu True
    assert kept.training.fuse_tasks is True and kept.training.fused_gelu is False
    assert resumed_config(d, _train_cfg(fuse_tasks=False)).training.fuse_tasks is False  # explicit: kept as set
    assert config_changes(d, _train_cfg(fuse_tasks=False, fused_gelu=True, target_logits_only=False)) == []
    create_run(d, _train_cfg(fuse_tasks=False, fused_gelu=False), command="train", resume=True).close()
    assert "training.fuse_tasks True -> False" in (d / "log.txt").read_text()
    assert yaml.safe_load((d / "config.yaml").read_text())["training"]["fuse_tasks"] is False
    for changed in ({"group_by_length": False}, {"fast_dropout": False}, {"bf16": True}):
        with pytest.raises(RunExistsError, match=f"differs in training.{next(iter(changed))}"):
            create_run(d, _train_cfg(fuse_tasks=False, fused_gelu=False, **changed), command="train", resume=True)


def test_a_speed_up_added_after_the_run_began_is_logged_with_the_value_it_ran_with(tmp_path):
    """The saved config lacks the field: the run ran with ADDED_FIELDS' value, and that is the old
    value the log names when a resume sets another."""
    d = tmp_path / "run"
    _written_before_fields_existed(d, _train_cfg(), "training.fused_gelu")
    cfg = resumed_config(d, _train_cfg(fused_gelu=True))
    create_run(d, cfg, command="train", resume=True).close()
    assert "training.fused_gelu False -> True" in (d / "log.txt").read_text()
