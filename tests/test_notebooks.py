"""The committed notebooks' outputs name no machine paths (a reader's machine is not ours)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what an absolute path of a developer's machine looks like in a text output
MACHINE_PATH = re.compile(r"(?<![\w.])(/(?:work|root|home|tmp|Users|private|var/folders)/[^\s'\"]*|[A-Z]:\\\\[^\s'\"]+)")


def text_outputs(notebook: Path):
    """(cell index, text) of every text output: streams, plain-text results and tracebacks."""
    nb = json.loads(notebook.read_text())
    for i, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            texts = [output.get("text", "")]
            texts.append(output.get("data", {}).get("text/plain", ""))
            texts.extend(output.get("traceback", []))
            for text in texts:
                yield i, "".join(text) if isinstance(text, list) else text


def test_the_pattern_finds_machine_paths():
    for text in ("/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning",
                 "/tmp/pvae-own-data-0cnc2lkp/images.npy", "/tmp/ipykernel_10125/4007068961.py:5: UserWarning",
                 "see /home/ana/runs/x", "C:\\\\Users\\\\ana\\\\run"):
        assert MACHINE_PATH.search(text), text
    for text in ("<data>/images.npy", "runs/images-2026", "L_K in nats/datapoint", "evaluation-test-K200.png"):
        assert not MACHINE_PATH.search(text), text


NOTEBOOKS = [pytest.param(p, id=p.name) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))]


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_committed_outputs_name_no_machine_paths(notebook):
    found = [(i, m.group(0)) for i, text in text_outputs(notebook) for m in MACHINE_PATH.finditer(text)]
    assert not found, f"{notebook.name}: machine paths in outputs (cell, path): {found[:5]}"
