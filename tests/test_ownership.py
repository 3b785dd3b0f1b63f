"""Never destroy what the user did not ask to destroy (issue 15, findings 1-3 and 7).

Each test is a finding from a careless- and hostile-user review: on the code before the run-folder
marker it deleted, overwrote or crashed; now each is one line, exit 1, and every byte the user had
is still there. A folder is stepdistill's only when it carries the marker `ownership.MARKER` of the
command's own kind (or, for runs written before the marker, the files that command wrote).
"""

import json
import os
import pickle
import sys
from pathlib import Path

import pytest

from stepdistill import cli
from stepdistill.config import AnnotateRun, build
from stepdistill.errors import RunExistsError
from stepdistill.quickstart import quickstart
from stepdistill.ownership import MARKER, output_kind
from stepdistill.runs import create_run

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SHARED  # noqa: E402


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: what a refused command must leave exactly as it was."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _exit(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # what earlier commands printed
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, [line for line in err if "%|" not in line]  # progress bars are not messages


def _one_line_refusal(argv, capsys, *words):
    code, lines = _exit(argv, capsys)
    assert code == 1 and len(lines) == 1 and "internal error" not in lines[0], lines
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def trained(tmp_path):
    """A training run as `stepdistill train` leaves it (marker, config, env, model/), without training."""
    cfg = build(AnnotateRun, {"task": {"name": "svamp"}, "split": "train", "teacher": {"kind": "paper"}})
    run = tmp_path / "work" / "runY"
    with create_run(run, cfg, command="train"):
        pass
    (run / "model").mkdir()
    (run / "model" / "stepdistill.json").write_text(json.dumps({"method": "standard", "label_prefix": "predict: "}))
    (run / "model" / "model.safetensors").write_bytes(b"weights")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "optimizer.pt").write_bytes(b"state")
    (tmp_path / "work" / "notes.txt").write_text("the user's own file beside the run\n")
    return run


# ---------------------------------------------------------------- finding 1: export --overwrite

def test_export_overwrite_onto_its_own_run_deletes_nothing(trained, capsys):
    before = _files(trained)
    _one_line_refusal(["export", "--model", str(trained), "--out", str(trained), "--overwrite"], capsys,
                      "not a stepdistill export output")
    assert _files(trained) == before


def test_export_overwrite_onto_the_runs_parent_or_the_working_directory_deletes_nothing(trained, capsys, monkeypatch):
    work = trained.parent
    before = _files(work)
    _one_line_refusal(["export", "--model", str(trained), "--out", str(work), "--overwrite"], capsys, "refused")
    monkeypatch.chdir(work)
    _one_line_refusal(["export", "--model", "runY", "--out", ".", "--overwrite"], capsys, "refused")
    assert _files(work) == before


def test_export_overwrite_onto_an_unrelated_folder_deletes_nothing(trained, tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    _one_line_refusal(["export", "--model", str(trained), "--out", str(mine), "--overwrite"], capsys,
                      "not a stepdistill export output", "it has no")
    assert _files(mine) == {"cat.jpg": b"\xff\xd8 a cat"}


def test_export_never_touches_a_users_folder_named_like_its_staging(trained, tmp_path):
    from stepdistill.deploy import export

    users = tmp_path / "out.partial"
    users.mkdir()
    (users / "keep.txt").write_text("mine")
    out = export(trained, tmp_path / "out")
    assert (users / "keep.txt").read_text() == "mine"
    assert output_kind(out) == "export" and (out / "model.safetensors").read_bytes() == b"weights"
    # --overwrite replaces an export (a new marker id), and leaves no staging folder behind
    first = json.loads((out / MARKER).read_text())["id"]
    export(trained, out, overwrite=True)
    assert json.loads((out / MARKER).read_text())["id"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial", "work"]


# ---------------------------------------------------------------- finding 2: quickstart --overwrite

def test_quickstart_overwrite_refuses_a_folder_that_merely_holds_a_summary_json(tmp_path):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "experiment"}')
    (mine / "data.csv").write_text("a,b\n1,2\n")
    before = _files(mine)
    with pytest.raises(RunExistsError, match="not a stepdistill quickstart output") as e:
        quickstart(mine, overwrite=True)
    assert "already holds a quickstart" not in str(e.value)
    with pytest.raises(RunExistsError) as e:
        quickstart(mine)
    assert "already holds" not in str(e.value) and "not a stepdistill quickstart output" in str(e.value)
    assert _files(mine) == before


# ---------------------------------------------------------------- finding 3: ownership by a file name

def _annotate_argv(out, *extra):
    return ["annotate", "--task", "svamp", "--data", str(SHARED), "--split", "test", "--teacher", "paper",
            "--limit", "3", "--out", str(out), *extra]


def test_overwrite_refuses_a_folder_that_merely_holds_an_env_json(tmp_path, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "env.json").write_text('{"python": "3.11"}')
    (mine / "main.py").write_text("print('hi')\n")
    before = _files(mine)
    _one_line_refusal(_annotate_argv(mine, "--overwrite"), capsys, "not a stepdistill annotate output")
    assert _files(mine) == before


def test_resume_refuses_a_folder_that_is_not_a_run_and_writes_nothing(tmp_path, capsys):
    mine = tmp_path / "labelled"
    mine.mkdir()
    (mine / "annotations.jsonl").write_text('{"my": "hand-made labels"}\n')
    before = _files(mine)
    _one_line_refusal(_annotate_argv(mine, "--resume"), capsys, "--resume refused", "not a stepdistill annotate output")
    assert _files(mine) == before


def test_annotate_overwrite_never_deletes_its_own_store(tmp_path, capsys):
    run = tmp_path / "runS"
    assert cli.run(_annotate_argv(run, "--store", str(run / "store.sqlite"))) == 0
    before = _files(run)
    _one_line_refusal(_annotate_argv(run, "--store", str(run / "store.sqlite"), "--overwrite"), capsys,
                      "store.sqlite, which this command must not delete")
    assert _files(run) == before


def test_a_run_of_another_kind_is_neither_resumed_nor_overwritten(tmp_path, capsys):
    run = tmp_path / "ann"
    assert cli.run(_annotate_argv(run)) == 0
    before = _files(run)
    cfg = build(AnnotateRun, {"task": {"name": "svamp"}, "split": "test", "teacher": {"kind": "paper"}})
    for command in ("eval", "train", "sweep"):
        with pytest.raises(RunExistsError, match=f"not a stepdistill {command} output.*holds a stepdistill annotate"):
            create_run(run, cfg, command=command, overwrite=True)
        with pytest.raises(RunExistsError, match="--resume refused"):
            create_run(run, cfg, command=command, resume=True)
    assert _files(run) == before


def test_sweep_refuses_to_write_into_a_folder_it_did_not_make(tmp_path):
    from stepdistill.sweep import sweep

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "results.json").write_text("{}")
    cfg = {"task": {"name": "svamp", "path": str(SHARED)}, "methods": [{"name": "standard"}],
           "students": [{"model": "none"}], "seeds": [0]}
    with pytest.raises(RunExistsError, match="not a stepdistill sweep output"):
        sweep(cfg, mine)
    assert _files(mine) == {"results.json": b"{}"}


def test_a_run_written_before_the_marker_still_resumes_and_is_marked(tmp_path, capsys):
    run = tmp_path / "old"
    assert cli.run(_annotate_argv(run)) == 0
    (run / MARKER).unlink()  # as an older stepdistill left it: env.json and config.yaml say what it is
    assert output_kind(run) == "annotate"
    assert cli.run(_annotate_argv(run, "--resume")) == 0
    assert json.loads((run / MARKER).read_text())["kind"] == "annotate"
    # a quickstart from before the marker: only its own outputs, its annotation run among them
    qs = tmp_path / "qs"
    qs.mkdir()
    (run / MARKER).unlink()
    run.rename(qs / "annotate-train")
    (qs / "summary.json").write_text("{}")
    assert output_kind(qs) == "quickstart"
    (qs / "my-notes.txt").write_text("not a quickstart output")
    assert output_kind(qs) is None
    (qs / "annotate-train" / "config.yaml").write_text("task: {name: svamp}\n")  # env.json + a config not ours
    assert output_kind(qs / "annotate-train") is None


# ---------------------------------------------------------------- finding 7: one line, exit 1

def test_resume_of_a_run_with_a_damaged_or_plain_text_config_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.run(_annotate_argv(run)) == 0
    (run / "config.yaml").write_text("# written by: stepdistill annotate\ntask: {name: [svamp\n")
    _one_line_refusal(_annotate_argv(run, "--resume"), capsys, "config.yaml is damaged")
    (run / "config.yaml").write_text("just some words\n")
    err = _one_line_refusal(_annotate_argv(run, "--resume"), capsys, "config.yaml is damaged")
    assert "differs in ;" not in err


def test_resume_from_a_checkpoint_holding_a_code_pickle_is_one_line_and_runs_nothing(tmp_path, capsys, monkeypatch):
    from test_crash import _train_argv

    monkeypatch.chdir(tmp_path)
    assert cli.run(_train_argv(tmp_path, "r")) == 0
    last = tmp_path / "r" / "checkpoints" / "checkpoint-9"
    canary = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    seal = json.loads((last / "stepdistill-checkpoint.json").read_text())
    for name in ("rng_state.pth", "optimizer.pt"):  # as an attacker would: sizes in the seal made to match
        (last / name).write_bytes(pickle.dumps(Payload()))
        seal["files"][name] = (last / name).stat().st_size
    (last / "stepdistill-checkpoint.json").write_text(json.dumps(seal))
    _one_line_refusal([*_train_argv(tmp_path, "r"), "--resume"], capsys, "--resume refused", "checkpoint-9")
    assert not canary.exists()


def test_version_and_the_method_help_lists_every_method(capsys):
    from stepdistill import __version__
    from stepdistill.methods import METHODS

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"stepdistill {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for name in METHODS.names():
        assert f"{name}:" in text, name


def test_a_key_on_the_command_line_never_reaches_env_json(tmp_path, monkeypatch):
    key = "sk-proj-" + "a1b2c3d4" * 4
    monkeypatch.setattr(sys, "argv", ["stepdistill", "annotate", "--model", key, "--out", str(tmp_path / "run")])
    cfg = build(AnnotateRun, {"task": {"name": "svamp"}, "split": "train", "teacher": {"kind": "paper"}})
    with create_run(tmp_path / "run", cfg, command="annotate"):
        pass
    env = (tmp_path / "run" / "env.json").read_text()
    assert key not in env and "[redacted]" in env and "annotate" in env
