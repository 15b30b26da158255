"""Build the documentation site: ``python docs/build.py`` writes docs/_build/html.

Warnings are errors (``sphinx-build -W --keep-going``): the command exits non-zero when any
warning was emitted, after building every page. Needs the ``docs`` extra
(``pip install -e ".[docs]"``); the notebooks are rendered with their stored outputs, not run.

    python docs/build.py                  # docs/_build/html
    python docs/build.py --out DIR        # DIR (its doctree cache in DIR/.doctrees)
    python docs/build.py --clean          # rebuild every page
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS / "_build" / "html",
                        help="output folder of the HTML site (default: docs/_build/html)")
    parser.add_argument("--clean", action="store_true", help="remove the output and its cache first")
    parser.add_argument("--jobs", "-j", default="1", help="sphinx-build's -j (default: 1)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    doctrees = out / ".doctrees"
    if args.clean:
        shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-j", str(args.jobs),
               "-d", str(doctrees), str(DOCS), str(out)]
    start = time.perf_counter()
    status = subprocess.call(command)
    seconds = time.perf_counter() - start
    where = out / "index.html"
    if status == 0:
        print(f"docs built in {seconds:.0f} s: {where}")
    else:
        print(f"docs build failed (sphinx-build exit status {status}, {seconds:.0f} s): "
              "warnings are errors, see above", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
