"""`.ci/run` runs exactly the README's Quickstart install and test lines."""
import re


def _quickstart_lines(readme: str) -> list[str]:
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [line.strip() for line in block.strip().splitlines()]


def test_ci_runs_the_readme_commands(repo_root):
    readme = (repo_root / "README.md").read_text()
    ci = (repo_root / ".ci" / "run").read_text()
    lines = _quickstart_lines(readme)
    install = re.search(r"^INSTALL='(.*)'$", ci, re.M).group(1)
    test = re.search(r"^TEST='(.*)'$", ci, re.M).group(1)
    assert lines[0] == install
    assert lines[-1] == test
    assert "python3 -m venv" in ci and "mktemp -d" in ci
    assert re.search(r'"\$rc" -eq 5', ci), "pytest's exit code 5 (no tests) must fail CI"


def test_ci_script_is_executable(repo_root):
    import os
    assert os.access(repo_root / ".ci" / "run", os.X_OK)


def test_readme_config_table_is_current(repo_root):
    from moecl.config import reference_markdown
    readme = (repo_root / "README.md").read_text()
    block = re.search(r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", readme, re.S).group(1)
    assert block == reference_markdown(), "regenerate the table: python -c 'from moecl.config import reference_markdown as r; print(r())'"


def test_readme_names_only_shipped_configs_and_sequences(repo_root):
    from moecl.config import shipped_configs
    from moecl.data import shipped_sequences
    readme = (repo_root / "README.md").read_text()
    for name in re.findall(r"--config ([a-z]\w+)", readme):
        assert name in shipped_configs(), name
    for name in ("mtil_order1", "mtil_order2", "mtil_fewshot", "cifar100_10", "tinyimagenet_100_20", "synthetic"):
        assert name in shipped_sequences()
