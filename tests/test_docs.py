"""The examples in README.md and the paper use names that exist: every `pvae train` line parses
and builds its config (part names and options checked), every `pvae evaluate` line parses, and
every `pvae.<name>` in a Python block exists. (The notebooks run in test_scripts.)"""

import ast
import re
import shlex
from pathlib import Path

import pytest

import pvae
from pvae.cli import _config_from_args, _parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "paper" / "paper.md"]


def _blocks(language):
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(rf"```{language}\n(.*?)```", text, re.S):
            yield doc.name, match.group(1)


def _command_lines():
    for doc, block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for prefix in ("pvae ", "python -m pvae "):
                if line.startswith(prefix):
                    yield doc, shlex.split(line[len(prefix):].replace("...", ""))


@pytest.mark.parametrize("doc, argv", list(_command_lines()), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_documented_command_lines_parse_and_build_their_config(doc, argv):
    if argv[0] == "train" and len(argv) == 1:
        pytest.skip("no flags")
    args = _parser().parse_args(argv)
    if args.command == "train":
        if args.config is not None:
            args.config = ROOT / args.config
        _config_from_args(args)  # names, options and values are checked here


def _attribute_chains(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = []
            while isinstance(node, ast.Attribute):
                chain.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id == "pvae":
                yield list(reversed(chain))


@pytest.mark.parametrize("doc, block", list(_blocks("python")), ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "")
def test_documented_python_uses_names_that_exist(doc, block):
    tree = ast.parse(block)
    for chain in _attribute_chains(tree):
        obj = pvae
        for i, name in enumerate(chain):
            if isinstance(obj, type) or callable(obj) and i > 0:
                break  # an attribute of a class or a call's result: not a module path
            assert hasattr(obj, name), f"{doc}: pvae.{'.'.join(chain[:i + 1])} does not exist"
            obj = getattr(obj, name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pvae":
            module = __import__(node.module, fromlist=["_"])
            for alias in node.names:
                assert hasattr(module, alias.name), f"{doc}: from {node.module} import {alias.name}"


@pytest.mark.parametrize("path", sorted((ROOT / "pvae").glob("*.py")), ids=lambda p: p.name)
def test_sources_compile_without_escape_warnings(path):
    """A docstring with TeX (``\\frac``, ``\\beta``) outside a raw string turns into form feeds
    and backspaces in ``help()`` and the options' help, and warns (an error in later Pythons)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(path.read_text(), str(path), "exec")


def test_the_readme_states_the_current_report_version():
    """README says which ``"version"`` a report's JSON carries: it must be the one reports are written with."""
    stated = re.findall(r'JSON form carries `"version": (\d+)`', (ROOT / "README.md").read_text())
    assert stated == [str(pvae.REPORT_VERSION)]
