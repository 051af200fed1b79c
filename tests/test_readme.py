"""README.md and docs/*.md stay true to the code: every code reference (`file.py:name`) names
something that exists, every relative link reaches its file and heading, and every `python X.py`
command in their bash blocks parses with that script's own argument parser."""
import argparse
import importlib
import importlib.util
import re
import shlex

import pytest

from config import parse_args
from conftest import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REFERENCE = re.compile(r"`(\w+)\.py:([\w.]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
# Placeholders of the commands, as a user would fill them in.
SHELL_VALUES = {"$s": "0", "$OUT": "out", "<timestamp>": "20260101-000000", "<time>": "20260101-000000"}


def relative(path):
    return str(path.relative_to(ROOT))


def test_documents_are_found():
    names = {relative(path) for path in DOCUMENTS}
    assert {"README.md", "docs/results.md", "docs/speed.md", "docs/faithfulness.md", "docs/paper-in-code.md",
            "docs/experiments.md", "docs/resuming.md"} <= names


def test_every_code_reference_resolves():
    table = (ROOT / "docs" / "paper-in-code.md").read_text()
    assert len(REFERENCE.findall(table)) >= 20, "the paper-in-code table lost its references"
    missing = []
    for document in DOCUMENTS:
        for module_name, path in sorted(set(REFERENCE.findall(document.read_text()))):
            target = importlib.import_module(module_name)
            for name in path.split("."):
                target = getattr(target, name, None)
            if target is None:
                missing.append(f"{relative(document)}: {module_name}.py:{path}")
    assert not missing, f"documents name code that does not exist: {missing}"


def test_the_file_table_lists_every_file():
    """docs/paper-in-code.md's table of the files names each top-level script, and only those."""
    text = (ROOT / "docs" / "paper-in-code.md").read_text()
    table = text.split("## The files", 1)[1]
    listed = set(re.findall(r"`(\w+\.py)`", table))
    assert listed == {path.name for path in ROOT.glob("*.py")}


def heading_anchors(text):
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to
    hyphens, `-1`, `-2` for repeats. Headings inside code blocks do not count."""
    anchors, seen = set(), {}
    for line in re.sub(r"```.*?```", "", text, flags=re.S).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_heading_anchors_are_githubs():
    assert heading_anchors("# A\n## Checking a GPU box: `python bench.py --check`\n```\n# not\n```\n## A") == \
        {"a", "checking-a-gpu-box-python-benchpy---check", "a-1"}


def test_every_relative_link_resolves():
    broken = []
    for document in DOCUMENTS:
        for target in LINK.findall(document.read_text()):
            if re.match(r"\w+://", target):
                continue  # The web is out of reach of the tests.
            file, _, anchor = target.partition("#")
            path = (document.parent / file).resolve() if file else document
            if not path.exists():
                broken.append(f"{relative(document)}: {target} (no such file)")
            elif anchor and anchor not in heading_anchors(path.read_text()):
                broken.append(f"{relative(document)}: {target} (no such heading)")
    assert not broken, f"broken links: {broken}"


def python_commands():
    """(document, script, arguments) of every `python X.py ...` in the documents' bash blocks."""
    commands = []
    for document in DOCUMENTS:
        for block in BASH_BLOCK.findall(document.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                for placeholder, value in SHELL_VALUES.items():
                    line = line.replace(placeholder, value)
                for part in re.split(r";|&&|\|", re.sub(r"(^|\s)#.*", "", line)):
                    words = shlex.split(part)
                    while words and (words[0] in ("do", "then") or re.match(r"\w+=", words[0])):
                        words = words[1:]  # `for ...; do python ...`, `MUJOCO_GL=egl python ...`
                    if len(words) > 1 and words[0] in ("python", "python3") and words[1].endswith(".py"):
                        commands.append((relative(document), words[1], words[2:]))
    return commands


class Parsed(Exception):
    """Raised instead of running the command once its arguments have parsed."""


def test_the_documents_give_commands():
    scripts = {script for _, script, _ in python_commands()}
    assert {"train.py", "test.py", "video_prediction.py", "sweep.py", "plot.py", "bench.py"} <= scripts


@pytest.mark.parametrize("document, script, arguments", python_commands(),
                         ids=lambda value: " ".join(value) if isinstance(value, list) else str(value))
def test_every_command_parses(document, script, arguments, monkeypatch):
    path = ROOT / script
    assert path.is_file(), f"{document}: no script {script}"
    spec = importlib.util.spec_from_file_location(f"documented_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(Parsed):
            module.main(arguments)
    if script == "train.py" and checkable(arguments):
        config_checks(arguments)


def checkable(arguments):
    """Whether train.py's checks after argparse can judge a documented command here: not a resume
    of a run that the document made before, nor a task in the reader's own module (`my_envs`)."""
    return "--resume" not in arguments and not any("my_envs" in argument for argument in arguments)


def config_checks(arguments):
    """train.py's own checks of a command line beyond argparse (the task, the preset, the model,
    the sizes), without training; pytest fails on their exit."""
    try:
        parse_args(arguments)
    except SystemExit:
        pytest.fail(f"train.py refuses: {' '.join(arguments)}")


def test_the_config_checks_catch_what_argparse_lets_through(capsys):
    """A misspelt task, preset and model parse, and train.py refuses them: argparse alone would
    pass this command."""
    arguments = ["--task", "cheetah-rn", "--preset", "smal", "--model", "lstm"]
    with pytest.raises(pytest.fail.Exception, match="train.py refuses"):
        config_checks(arguments)
