"""README's references into the code (`file.py:name`) name things that exist."""
import importlib
import re

from conftest import ROOT

REFERENCE = re.compile(r"`(\w+)\.py:([\w.]+)`")


def test_every_code_reference_in_readme_resolves():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## The paper in code")[1].split("\n## ")[0]
    assert len(REFERENCE.findall(table)) >= 20, "the paper-in-code table lost its references"
    missing = []
    for module_name, path in sorted(set(REFERENCE.findall(readme))):
        target = importlib.import_module(module_name)
        for name in path.split("."):
            target = getattr(target, name, None)
        if not callable(target):
            missing.append(f"{module_name}.py:{path}")
    assert not missing, f"README names code that does not exist: {missing}"
