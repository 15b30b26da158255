"""Sphinx configuration of pvae's documentation site.

Build it with ``python docs/build.py`` (warnings are errors). Two folders of the source tree are
written at build start (``builder-inited``) and are git-ignored:

* ``docs/api/``: one reference page per entry of :data:`API_PAGES`, generated from the modules'
  ``__all__``: each public object is documented once, in the module that defines it, and the
  modules that re-export it link there (so ``pvae.fit`` and ``pvae.training.loop.fit`` are one
  entry, and ``:func:`pvae.fit``` in a docstring resolves to it);
* ``docs/tutorials/notebooks/``: copies of ``notebooks/*.ipynb``, rendered with their stored
  outputs by myst-nb and never executed here.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # this checkout's pvae, whatever is installed

import pvae  # noqa: E402

# -- project -------------------------------------------------------------------------------------

project = "pvae"
author = "the pvae authors"
copyright = "the pvae authors (MIT licence)"
release = pvae.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "myst_nb",
]

exclude_patterns = ["_build", "**/.ipynb_checkpoints", "jupyter_execute"]
root_doc = "index"
nitpicky = False  # references to torch/pyro/numpy objects stay plain text (no intersphinx: offline)

# -- HTML ----------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"pvae {release}"
html_static_path: list = []
html_show_sourcelink = False

# -- autodoc -------------------------------------------------------------------------------------

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_inherit_docstrings = False  # torch's forward() docstrings are not pvae's
python_use_unqualified_type_names = True
add_module_names = False
autosummary_generate = False  # the API pages are generated below, not by autosummary

# The docstrings are reST with ``:param x:`` field lists; napoleon only adds Google/NumPy sections.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_param = True
napoleon_use_rtype = True

# -- notebooks (myst-nb) -------------------------------------------------------------------------

nb_execution_mode = "off"  # the committed notebooks are executed at full size: render, never run
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# -- API pages -----------------------------------------------------------------------------------

#: (page, title, modules): one reference page per entry, the first module's docstring on top and
#: one section per further module. Every public name (``__all__``) of these modules is documented
#: once, where it is defined. docs/reference.md's toctree lists the pages (the build fails when a
#: page is missing from it or it names a page that is not here).
API_PAGES = [
    ("pvae", "pvae: the public API", ["pvae"]),
    ("pvae.model", "pvae.model: the VAE's model and guide", ["pvae.model"]),
    ("pvae.parts", "pvae.parts: priors, guides, likelihoods, networks",
     ["pvae.parts", "pvae.parts.priors", "pvae.parts.guides", "pvae.parts.likelihoods", "pvae.parts.nets"]),
    ("pvae.inference", "pvae.inference: log-weights, estimators, AIS, diagnostics",
     ["pvae.inference", "pvae.inference.engine", "pvae.inference.estimators", "pvae.inference.annealing",
      "pvae.inference.diagnostics", "pvae.inference.evaluation", "pvae.inference.paired"]),
    ("pvae.training", "pvae.training: objectives, the training loop, callbacks",
     ["pvae.training", "pvae.training.objectives", "pvae.training.loop", "pvae.training.callbacks",
      "pvae.training.controls", "pvae.training.tracking"]),
    ("pvae.data", "pvae.data: data sets, your own files, streaming",
     ["pvae.data", "pvae.data.dataset", "pvae.data.files", "pvae.data.streaming"]),
    ("pvae.families", "pvae.families: hierarchical, conditional, semi-supervised, mixture",
     ["pvae.families", "pvae.families.base", "pvae.families.hierarchical", "pvae.families.conditional",
      "pvae.families.labels"]),
    ("pvae.config", "pvae.config: run configs, options, registries",
     ["pvae.config", "pvae.options", "pvae.registry"]),
    ("pvae.runs", "pvae.runs: run directories and the command line", ["pvae.runs", "pvae.cli"]),
    ("pvae.pretrained", "pvae.pretrained: converged models shipped with pvae", ["pvae.pretrained"]),
    ("pvae.errors", "pvae.errors", ["pvae.errors"]),
    ("pvae.plots", "pvae.plots: figures", ["pvae.plots"]),
    ("pvae.testing", "pvae.testing: exact references", ["pvae.testing"]),
    ("pvae.checkpoint", "pvae.checkpoint and pvae.distributed",
     ["pvae.checkpoint", "pvae.distributed"]),
]

_MODULES = [name for _, _, names in API_PAGES for name in names]
#: id(object) -> its documented full name, for the objects whose ids are unambiguous
_DOCUMENTED: dict = {}


def _public(module) -> list:
    return [name for name in getattr(module, "__all__", []) if not inspect.ismodule(getattr(module, name))]


def _defines(module, name: str) -> bool:
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return False
    return re.search(rf"^{re.escape(name)}\s*(:[^=\n]*)?=", source, re.M) is not None


def _home(name: str, obj) -> str | None:
    """The documented module that documents ``obj`` (a public name of some documented module)."""
    listing = [m for m in _MODULES if name in getattr(importlib.import_module(m), "__all__", ())
               and getattr(importlib.import_module(m), name) is obj]
    if (inspect.isclass(obj) or inspect.isroutine(obj)) and getattr(obj, "__module__", None) in listing:
        return obj.__module__
    for module in listing:
        if _defines(importlib.import_module(module), name):
            return module
    return listing[-1] if listing else None  # the most specific module that lists it


def _directive(obj) -> str:
    if inspect.isclass(obj):
        return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    if inspect.isroutine(obj):
        return "autofunction"
    return "autodata"


def _title(text: str, char: str) -> str:
    return f"{text}\n{char * len(text)}\n"


def _module_section(module_name: str, heading: str | None) -> str:
    module = importlib.import_module(module_name)
    out = [_title(heading, "=") if heading else _title(module_name, "-"), "",
           f".. automodule:: {module_name}", "   :no-members:", ""]
    own, elsewhere = [], []
    for name in _public(module):
        obj = getattr(module, name)
        home = _home(name, obj)
        (own if home == module_name else elsewhere).append((name, home))
    if elsewhere:
        links = ", ".join(f":py:obj:`~{home}.{name}`" for name, home in elsewhere)
        out += [f"Also exported here: {links}.", ""]
    for name, _ in own:
        obj = getattr(module, name)
        if not isinstance(obj, (int, float, str, bool, tuple, type(None))):
            _DOCUMENTED[id(obj)] = f"{module_name}.{name}"
        out += [f".. {_directive(obj)}:: {module_name}.{name}"]
        out += _program_methods(obj) if inspect.isclass(obj) else [""]
    return "\n".join(out)


def _program_methods(cls) -> list:
    """``VAE.model``/``VAE.guide`` are :class:`pvae.model.program` descriptors: on the class they
    are not callable, so autodoc cannot read their signatures (a warning). They are excluded from
    the class's automatic members and documented here as methods, with the wrapped function's
    signature and docstring."""
    from pvae.model import program
    from sphinx.util.inspect import stringify_signature

    programs = [(name, value) for name, value in vars(cls).items() if isinstance(value, program)]
    if not programs:
        return [""]
    lines = [f"   :exclude-members: {', '.join(name for name, _ in programs)}", ""]
    for name, value in programs:
        signature = inspect.signature(value.fn)
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        lines += [f"   .. py:method:: {name}{stringify_signature(signature, unqualified_typehints=True)}", ""]
        lines += [f"      {line}".rstrip() for line in (inspect.getdoc(value.fn) or "").splitlines()] + [""]
    return lines


def _top_level_page(title: str) -> str:
    """``pvae``: the package docstring and a summary table of ``pvae.__all__``, linked to where
    each name is documented."""
    rows = []
    for name in pvae.__all__:
        obj = getattr(pvae, name)
        # relative to the current module, pvae (autosummary refuses names that repeat it)
        if inspect.ismodule(obj):
            rows.append(f"   ~{obj.__name__.removeprefix('pvae.')}")
        else:
            home = _home(name, obj)
            rows.append(f"   ~{home.removeprefix('pvae.')}.{name}" if home else f"   ~{name}")
    return "\n".join([
        _title(title, "="), "", ".. automodule:: pvae", "   :no-members:", "",
        ("``pvae.__all__`` is what a notebook needs; each name below links to the module that "
         "defines it, where it is documented with the rest of that module's public names."), "",
        ".. autosummary::", "   :nosignatures:", "", *rows, "",
    ])


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _generate_api_pages() -> None:
    folder = DOCS / "api"
    wanted = set()
    for page, title, modules in API_PAGES:
        if modules == ["pvae"]:
            text = _top_level_page(title)
        else:
            text = "\n".join([_module_section(modules[0], title)]
                             + [_module_section(m, None) for m in modules[1:]])
        wanted.add(f"{page}.rst")
        _write_if_changed(folder / f"{page}.rst", text)
    for stale in folder.glob("*.rst"):
        if stale.name not in wanted:
            stale.unlink()


def _copy_notebooks() -> None:
    """notebooks/*.ipynb -> docs/tutorials/notebooks/ (a copy, unchanged files left untouched)."""
    target = DOCS / "tutorials" / "notebooks"
    target.mkdir(parents=True, exist_ok=True)
    sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for source in sources:
        copy = target / source.name
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            shutil.copyfile(source, copy)
    for stale in target.glob("*.ipynb"):
        if not (ROOT / "notebooks" / stale.name).exists():
            stale.unlink()


def _builder_inited(app) -> None:
    _copy_notebooks()
    _generate_api_pages()


# -- docstrings ----------------------------------------------------------------------------------

_BORDER = re.compile(r"^(\s*)(=+)(\s+)(=+)\s*$")


def _widen_simple_tables(lines: list) -> None:
    """Repair a two-column simple table whose first-column cell is wider than its border (docutils:
    "Malformed table"), e.g. the ``autoencoder`` row of :mod:`pvae.families`' table: the border and
    the rows are rewritten with the first column as wide as its widest cell. Other tables are left
    as they are."""
    borders = [i for i, line in enumerate(lines) if _BORDER.match(line)]
    for top, bottom in zip(borders[::2], borders[1::2]):
        indent, first = _BORDER.match(lines[top]).group(1, 2)
        rows = lines[top + 1:bottom]
        cells = []  # [first cell, text lines]
        for line in rows:
            body = line[len(indent):]
            if not line.strip():
                continue
            if body[:1].isspace():
                if not cells:
                    return
                cells[-1][1].append(body.strip())
            else:
                cell, _, text = body.partition(" ")
                cells.append([cell, [text.strip()]])
        width = max((len(cell) for cell, _ in cells), default=0)
        if width <= len(first):
            continue
        text_width = max(len(text) for _, texts in cells for text in texts)
        new = [f"{indent}{'=' * width}  {'=' * text_width}"]
        for cell, texts in cells:
            new.append(f"{indent}{cell.ljust(width)}  {texts[0]}".rstrip())
            new += [f"{indent}{' ' * (width + 2)}{text}" for text in texts[1:]]
        new.append(new[0])
        lines[top:bottom + 1] = new
        return _widen_simple_tables(lines)  # the indices after this table have moved


def _process_docstring(app, what, name, obj, options, lines) -> None:
    _widen_simple_tables(lines)


# -- references to re-exported and moved names --------------------------------------------------


def _canonical(target: str) -> str | None:
    """The documented name of ``target`` (``pvae.fit`` -> ``pvae.training.loop.fit``,
    ``pvae.engine.ModelGuidePair`` -> ``pvae.inference.engine.ModelGuidePair``)."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        name = obj.__name__
        for attr in parts[cut:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                return None
            if id(obj) in _DOCUMENTED:
                name = _DOCUMENTED[id(obj)]
            elif inspect.ismodule(obj):
                name = obj.__name__
            elif (inspect.isclass(obj) or inspect.isfunction(obj)) and hasattr(obj, "__qualname__"):
                name = f"{obj.__module__}.{obj.__qualname__}"
            else:
                name = f"{name}.{attr}"
        return name
    return None


def _missing_reference(app, env, node, contnode):
    """Resolve a reference that Sphinx could not: ``pvae.fit`` (a re-export), ``pvae.engine.X`` (a
    moved module) or, in a docstring, a name imported into its module (``evaluate_bounds`` in
    :mod:`pvae.inference.evaluation`) -> where the object is documented."""
    target = node.get("reftarget", "").lstrip("~.")
    if node.get("refdomain") != "py" or not target:
        return None
    if target.startswith("pvae."):
        candidates = [target]
    else:
        module, cls = node.get("py:module"), node.get("py:class")
        if not (module or "").startswith("pvae"):
            return None
        candidates = ([f"{module}.{cls}.{target}"] if cls else []) + [f"{module}.{target}"]
    domain = env.get_domain("py")
    for candidate in candidates:
        canonical = _canonical(candidate)
        if canonical is None or canonical == target:
            continue
        found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode)
        if found is not None:
            return found
    return None


def setup(app):
    app.connect("builder-inited", _builder_inited)
    app.connect("missing-reference", _missing_reference)
    app.connect("autodoc-process-docstring", _process_docstring)
