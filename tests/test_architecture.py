"""The layout's rules that a linter does not check (the layers are `lint-imports`' contract in
pyproject.toml, run by `make test`): no module imports another module's private names, and no
module grows past about 400 lines without a stated reason."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "stepdistill"
# module -> why it is longer than LIMIT lines (keep this short; split a module rather than grow it)
LONGER = {
    "testing/openai_server.py": "a fake OpenAI-compatible server whose fault modes read best side by side",
    "config.py": "every config section with its field descriptions, the single source of the CLI's help",
    "teachers/openai.py": "the async client: retries, budget, replicas and redaction share its request loop",
    "cli.py": "the parser of every subcommand (flags come from config descriptions)",
    "serve.py": "the HTTP endpoint with its body and work caps and the fair scheduler they protect",
    "report.py": "a sweep's report: its figures, tables and the Markdown/HTML they go into (statistics: stats.py)",
}
LIMIT = 420  # "about 400"


def _modules():
    return sorted(p for p in SRC.rglob("*.py"))


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stepdistill"):
                found += [f"{path.relative_to(SRC)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "import public names only (rename the helper, or move it where both sides can see it): " + "; ".join(found)


def test_modules_stay_small_or_say_why():
    long = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines()) for p in _modules()}
    over = {m: n for m, n in long.items() if n > LIMIT and m not in LONGER}
    assert not over, f"modules over {LIMIT} lines without a stated reason in LONGER: {over}"
    assert all(m in long for m in LONGER), "LONGER names a module that no longer exists"


def test_the_how_to_add_a_method_example_trains(tmp_path):
    """docs/architecture.md's example, run as written: registered, configured by name, trained."""
    import re

    from stepdistill.config import MethodConfig, TrainingConfig
    from stepdistill.methods import METHODS, get_method
    from stepdistill.training import fit
    from tiny_models import FakeTask, annotations, examples, llama_student

    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    code = "\n".join(line[3:] if line.startswith("   ") else line for line in code.splitlines())
    try:
        exec(compile(code, "docs/architecture.md", "exec"), {})
        method = MethodConfig(name="my-method")
        exs = examples(8)
        records = get_method(method).records(exs, annotations(exs)).records
        metrics = fit(llama_student(), method, TrainingConfig(max_steps=4, learning_rate=1e-2, batch_size=4,
                                                               logging_steps=1, bf16=False),
                      records, [], FakeTask(), tmp_path / "run", progress=False)
        assert metrics["steps"] == 4 and metrics["train_loss"][-1][1] < metrics["train_loss"][0][1]
    finally:
        METHODS._items.pop("my-method", None)  # the registry is global: leave it as the other tests expect
