from pathlib import Path

import pytest

from stepdistill.config import TrainRun, build, load_yaml, parse_overrides, set_dotted
from stepdistill.methods import get_method
from stepdistill.tasks import split_base
from stepdistill.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_mistake_is_reported_at_once():
    data = {"task": {"name": "svamp"}, "student": {},
            "method": {"name": "magic", "alpha": 1.5}, "training": {"learnin_rate": 1e-4}}
    with pytest.raises(ConfigError) as e:
        build(TrainRun, data, "x.yaml")
    msg = str(e.value)
    assert msg.startswith("x.yaml: 4 problems")
    for part in ["student.model: required field missing", "method.name", "method.alpha", "training.learnin_rate: unknown field"]:
        assert part in msg
    assert "\n" not in msg


def test_overrides_parse_values_as_yaml():
    data = {}
    for k, v in parse_overrides(["training.learning_rate=1e-4", "method.name=distill", "training.bf16=true"]):
        set_dotted(data, k, v)
    assert data == {"training": {"learning_rate": 1e-4, "bf16": True}, "method": {"name": "distill"}}
    with pytest.raises(ConfigError, match="expected section.field=value"):
        parse_overrides(["training.epochs"])


def test_bad_yaml_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    from stepdistill.config import AnnotateRun

    data = load_yaml(path)
    model = AnnotateRun if "teacher" in data else TrainRun
    build(model, data, str(path))


@pytest.mark.parametrize("path", sorted((CONFIGS / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_sweep_configs_validate(path):
    from stepdistill.config import SweepRun

    cfg = build(SweepRun, load_yaml(path), str(path))
    # both of the paper's like-for-like pairs: rationales on gold labels against standard fine-tuning,
    # rationales on the teacher's labels against distillation
    pairs = {(m.name, m.label_source) for m in cfg.methods}
    multitask = {m.name for m in cfg.methods if get_method(m).multitask}
    assert ("standard", "gold") in pairs and ("distill", "gold") in pairs, path
    assert any((name, "gold") in pairs for name in multitask) and any((name, "teacher") in pairs for name in multitask)
    assert len(cfg.seeds) >= 3 and split_base(cfg.split) != "test" and cfg.val_split is None


@pytest.mark.parametrize("path", sorted((CONFIGS / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_configs_evaluate_on_a_real_test_split_by_changing_two_fields(path, tmp_path):
    """`--set task.path=DIR --set eval.split=test`, nothing else: the cells are evaluated on
    DIR/<task>/<task>_test.json, and training reads the same training carve as before."""
    from stepdistill.config import SweepRun
    from stepdistill.tasks import get_task, load_examples

    data = load_yaml(path)
    task = get_task(data["task"]["name"])
    folder = tmp_path / "held-back" / task.name
    folder.mkdir(parents=True)
    shared = CONFIGS.parents[1] / "shared" / "data" / "sbs" / task.name
    for f in shared.glob(f"{task.name}_*.json"):  # the shared splits, and a test split beside them
        (folder / f.name).write_bytes(f.read_bytes())
        (folder / f"{task.name}_test.json").write_bytes(b"".join(f.read_bytes().splitlines(keepends=True)[:5]))
    data["task"]["path"] = str(tmp_path / "held-back")
    data["eval"]["split"] = "test"
    cfg = build(SweepRun, data, str(path))
    tested = load_examples(task, cfg.eval.split, cfg.task.path, cfg.eval.limit)
    assert len(tested) == 5 and split_base(cfg.split) != "test"
    if (folder / f"{task.name}_{split_base(cfg.split)}.json").is_file():  # (GPU configs may train on the hub's split)
        assert load_examples(task, cfg.split, cfg.task.path, 3)  # the training carve still reads
