"""No file the library reads can run code: every ``torch.load`` is ``weights_only=True``, YAML goes through safe
loaders, and there is no pickle, ``trust_remote_code=True``, ``allow_pickle=True``, ``eval`` or ``exec`` in the
packages and scripts. The scan is a source audit of ``diffalign``, ``rewards`` and ``scripts``; each rule is checked
on a bad snippet too.
"""

import ast
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "_YamlLoader"}


def _name(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain, ``c`` for a name, ``""`` otherwise."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}".lstrip(".")
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str) -> list[str]:
    """What in ``source`` could turn a file's content into running code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{line}: imports {m}" for m in modules if m.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{line}: torch.load without weights_only=True")
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found.append(f"{line}: {name}")
        if name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _name(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                found.append(f"{line}: {name} without a safe Loader")
        if _is_true(_keyword(node, "trust_remote_code")):
            found.append(f"{line}: trust_remote_code=True")
        if _is_true(_keyword(node, "allow_pickle")):
            found.append(f"{line}: allow_pickle=True")
        if isinstance(node.func, ast.Name) and name in ("eval", "exec"):  # the builtins, not module.eval()
            found.append(f"{line}: {name}()")
    return found


def test_the_packages_never_run_code_from_a_file():
    problems = []
    for package in ("diffalign", "rewards", "scripts"):
        for path in sorted((ROOT / package).rglob("*.py")):
            problems += [f"{path.relative_to(ROOT)}:{v}" for v in violations(path.read_text(encoding="utf-8"))]
    assert problems == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from dill import loads",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "yaml.load(text)",
        "yaml.load(text, Loader=yaml.Loader)",
        "yaml.unsafe_load(text)",
        "AutoModel.from_pretrained(name, trust_remote_code=True)",
        "np.load(path, allow_pickle=True)",
        "eval(text)",
    ],
)
def test_each_rule_catches_its_case(snippet):
    assert violations(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "torch.load(path, map_location='cpu', weights_only=True)",
        "yaml.load(stream, Loader=_YamlLoader)",
        "yaml.safe_load(text)",
        "yaml.load(text, yaml.SafeLoader)",
        "model.eval()",
        "make().eval()",
    ],
)
def test_safe_calls_pass(snippet):
    assert violations(snippet) == []
