from pathlib import Path

import pytest

import stepdistill.methods  # noqa: F401  (registers the methods that method.name is checked against)
from stepdistill.config import TrainRun, build, load_yaml, parse_overrides, set_dotted
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
    assert {m.name for m in cfg.methods} == {"standard", "distill", "step-by-step"}
    assert len(cfg.seeds) >= 3 and cfg.eval.split == "test"
