"""Sphinx configuration of the anllm_ext documentation (`make docs`; CI builds it with -W).

The pages are Markdown (MyST). The API reference is generated from the docstrings: the
``anllm-api`` directive below documents ``anllm_ext`` (its ``__all__``) and every public module of the
package, found with pkgutil, so a new module or a new public name appears without editing any page.
The CLI reference comes from ``anllm_ext.cli.build_parser()`` (sphinx-argparse).
"""
from __future__ import annotations

import glob
import importlib
import inspect
import os
import pkgutil
import sys

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_refnode, nested_parse_with_titles

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Document the source tree when it holds an in-place build of the extension (development); otherwise
# the installed package (`make docs` runs from docs/, so the source tree does not shadow it).
if glob.glob(os.path.join(ROOT, "anllm_ext", "_C*.so")) + glob.glob(os.path.join(ROOT, "anllm_ext", "_C*.pyd")):
    sys.path.insert(0, ROOT)

project = "anllm_ext"
author = "anllm_ext contributors"
copyright = "anllm_ext contributors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "scripts", "results", "Thumbs.db", ".DS_Store"]  # results/: git-ignored run outputs

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3  # `[text](page.md#a-heading)` links resolve (and fail the build when broken)
suppress_warnings = ["myst.header"]  # a skipped heading level is cosmetic, not a broken reference

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Heavy or optional imports the docs do not need to execute.
autodoc_mock_imports = ["lm_eval"]

# Every cross-reference must resolve (with -W a broken one fails the build), except into libraries whose
# inventories are not available offline.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(torch|transformers|accelerate|lm_eval|peft|datasets|numpy|os|pathlib|argparse|typing)(\..*)?"),
    ("py:.*", r"anllm_ext(\.\w+)*\._\w+"),  # private helpers named in annotations
]

html_theme = "alabaster"
html_static_path = []
html_title = "anllm_ext"


def _public_modules(package: str):
    """Public modules of ``package`` (no leading underscore), in name order."""
    pkg = importlib.import_module(package)
    return sorted(
        f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")
    )


def _reexported(package: str, module_name: str):
    """Names of ``module_name`` that ``package`` re-exports in ``__all__`` (documented on the package)."""
    pkg = importlib.import_module(package)
    module = importlib.import_module(module_name)
    return [n for n in getattr(pkg, "__all__", []) if hasattr(module, n) and getattr(module, n) is getattr(pkg, n)]


def _is_data(obj) -> bool:
    return not (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj))


def _data_doc(package: str, name: str):
    """The ``#:`` doc comment of the package-level data ``name``, from the module that defines it."""
    obj = getattr(importlib.import_module(package), name)
    for module_name in _public_modules(package):
        module = importlib.import_module(module_name)
        if getattr(module, name, None) is obj:
            doc = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", name))
            if doc:
                return list(doc)
    return []


class AnllmApiDirective(SphinxDirective):
    """``.. anllm-api:: package``: the package's ``__all__``, then one section per public module.

    A name that the package re-exports is documented once, under the package; each module's section
    documents the rest of its public names (its ``__all__``, or every public name it defines).
    Package-level data (constants) take their ``#:`` doc comment from the module that defines them.
    """

    required_arguments = 1

    def run(self):
        package = self.arguments[0]
        pkg = importlib.import_module(package)
        lines = [
            f"``{package}``",
            "-" * (len(package) + 4),
            "",
            f".. automodule:: {package}",
            "   :members:",
            "   :undoc-members:",
            "   :imported-members:",
            "",
        ]
        for name in getattr(pkg, "__all__", []):
            value = getattr(pkg, name)
            if _is_data(value):  # autodoc would show the docstring of the value's type (dict, str)
                lines += [f".. py:data:: {name}", f"   :module: {package}"]
                if len(repr(value)) <= 60:
                    lines.append(f"   :value: {value!r}")
                lines += [""] + [f"   {line}" for line in _data_doc(package, name)] + [""]
        for module_name in _public_modules(package):
            title = f"``{module_name}``"
            lines += [title, "-" * len(title), "", f".. automodule:: {module_name}", "   :members:"]
            skip = _reexported(package, module_name)
            if skip:
                lines.append(f"   :exclude-members: {', '.join(skip)}")
            lines.append("")
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source="anllm-api"), container)
        return container.children


def resolve_short_name(app, env, node, contnode):
    """Resolve a Python reference written relative to where the name is defined.

    Docstrings say ``:func:`insert_ac``` or ``:func:`anllm_ext.anchors.insert_ac```, but a re-exported
    name is documented once, as ``anllm_ext.insert_ac``. Resolve to the one documented object whose
    full name ends with the target's last dotted parts; leave anything ambiguous or unknown unresolved
    (nitpicky mode then reports it).
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    domain = env.get_domain("py")
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        tail = ".".join(parts[-n:])
        # a class documented under the package also has its canonical name (its module's) as an alias
        matches = {(obj.docname, obj.node_id): name for name, obj in domain.objects.items()
                   if name == tail or name.endswith("." + tail)}
        if len(matches) == 1:
            (docname, node_id), name = next(iter(matches.items()))
            return make_refnode(app.builder, node["refdoc"], docname, node_id, contnode, name)
        if matches:
            return None
    return None


def setup(app):
    app.add_directive("anllm-api", AnllmApiDirective)
    app.connect("missing-reference", resolve_short_name)
