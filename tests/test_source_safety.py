"""Nothing in `src/` executes code taken from data or checkpoints — checked on the syntax tree.

The scan reads every module's AST (comments and docstrings never count) and reports:
- calls to `eval`, `exec` or `compile`, and `__import__`/`importlib.import_module`;
- imports of pickle-like loaders (`pickle`, `dill`, `cloudpickle`, `joblib`, `shelve`, `marshal`),
  except `pickle` used only for its exception type `UnpicklingError`;
- `torch.load` (or `torch.serialization.load`) without `weights_only=True`, and `from torch import load`;
- `trust_remote_code` as a keyword, a name or a dict key;
- `yaml.load`/`full_load`/`unsafe_load` and unsafe YAML loaders (only `yaml.safe_load`);
- `allow_pickle=True` (NumPy) and `read_pickle` (pandas).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

PICKLE_LIKE = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_ALLOWED = {"UnpicklingError"}
UNSAFE_YAML = {"load", "full_load", "unsafe_load", "load_all", "full_load_all", "unsafe_load_all"}
UNSAFE_YAML_LOADERS = {"Loader", "FullLoader", "UnsafeLoader"}


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def find_unsafe(source: str, filename: str = "<source>") -> list[str]:
    """Every unsafe construct of one module, as `file:line: what`."""
    tree = ast.parse(source, filename)
    findings: list[str] = []
    pickle_names: set[str] = set()  # local names bound to a pickle-like module

    def report(node: ast.AST, what: str) -> None:
        findings.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in PICKLE_LIKE:
                    if root == "pickle" and alias.name == "pickle":
                        pickle_names.add(alias.asname or "pickle")
                    else:
                        report(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for alias in node.names:
                if root in PICKLE_LIKE and not (node.module == "pickle" and alias.name in PICKLE_ALLOWED):
                    report(node, f"imports {alias.name} from {node.module}")
                if node.module in ("torch", "torch.serialization") and alias.name == "load":
                    report(node, f"imports load from {node.module} (call torch.load with weights_only=True)")
                if node.module == "yaml" and (alias.name in UNSAFE_YAML or alias.name in UNSAFE_YAML_LOADERS):
                    report(node, f"imports yaml.{alias.name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if name in ("eval", "exec", "compile", "__import__", "importlib.import_module", "builtins.eval", "builtins.exec"):
                report(node, f"calls {name}()")
            if name in ("torch.load", "torch.serialization.load"):
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    report(node, f"calls {name}() without weights_only=True")
            if name.startswith("yaml.") and name.split(".", 1)[1] in UNSAFE_YAML:
                report(node, f"calls {name}() (use yaml.safe_load)")
            if "allow_pickle" in keywords and not (isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False):
                report(node, "passes allow_pickle")
        elif isinstance(node, ast.Attribute):
            base = _dotted(node.value)
            if node.attr == "read_pickle":
                report(node, "uses read_pickle")
            if base == "yaml" and node.attr in UNSAFE_YAML_LOADERS:
                report(node, f"uses yaml.{node.attr}")
            if node.attr == "trust_remote_code":
                report(node, "uses trust_remote_code")
        elif isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            report(node.value, "passes trust_remote_code")
        elif isinstance(node, ast.Name) and node.id == "trust_remote_code":
            report(node, "uses trust_remote_code")
        elif isinstance(node, ast.Dict):
            for key in node.keys:
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                    report(key, "sets trust_remote_code")
    # A pickle module may only be used as `pickle.UnpicklingError` (an exception type to catch).
    allowed = {
        id(node.value) for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr in PICKLE_ALLOWED
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in pickle_names and id(node) not in allowed:
            parent = next((p for p in ast.walk(tree) if isinstance(p, ast.Attribute) and p.value is node), None)
            report(node, f"uses {node.id}.{parent.attr}" if parent is not None else f"uses the {node.id} module itself")
    return findings


def test_src_executes_nothing_from_data_or_checkpoints() -> None:
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 30
    findings = [f for path in modules for f in find_unsafe(path.read_text(), str(path.relative_to(SRC)))]
    assert findings == []


@pytest.mark.parametrize(
    "snippet, what",
    [
        ("x = eval(text)", "calls eval()"),
        ("exec(code)", "calls exec()"),
        ("mod = __import__(name)", "calls __import__()"),
        ("import pickle\nobj = pickle.loads(blob)", "uses pickle.loads"),
        ("import pickle as p\ntorch.load(f, pickle_module=p, weights_only=True)", "uses the p module itself"),
        ("from pickle import load", "imports load from pickle"),
        ("import dill", "imports dill"),
        ("state = torch.load(path)", "calls torch.load() without weights_only=True"),
        ("state = torch.load(path, weights_only=False)", "calls torch.load() without weights_only=True"),
        ("state = torch.load(path, weights_only=flag)", "calls torch.load() without weights_only=True"),
        ("from torch import load", "imports load from torch"),
        ("AutoModel.from_pretrained(d, trust_remote_code=True)", "passes trust_remote_code"),
        ("kwargs = {'trust_remote_code': True}", "sets trust_remote_code"),
        ("config.trust_remote_code = True", "uses trust_remote_code"),
        ("data = yaml.load(text)", "calls yaml.load() (use yaml.safe_load)"),
        ("data = yaml.load(text, Loader=yaml.UnsafeLoader)", "uses yaml.UnsafeLoader"),
        ("arr = np.load(path, allow_pickle=True)", "passes allow_pickle"),
        ("frame = pd.read_pickle(path)", "uses read_pickle"),
    ],
)
def test_the_scan_finds_each_unsafe_construct(snippet: str, what: str) -> None:
    assert any(what in f for f in find_unsafe(snippet)), find_unsafe(snippet)


def test_comments_docstrings_and_safe_forms_do_not_count() -> None:
    source = '''
"""Never eval(text), never torch.load(path) without weights_only, no trust_remote_code."""
import ast
import pickle

import torch
import yaml

# eval(x); exec(y); pickle.loads(z); trust_remote_code=True
value = ast.literal_eval(text)
state = torch.load(path, map_location="cpu", weights_only=True)
config = yaml.safe_load(text)
try:
    pass
except pickle.UnpicklingError:
    pass
message = "set trust_remote_code in the docs"
'''
    assert find_unsafe(source) == []
