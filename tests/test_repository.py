"""The repository's own promises: README's two commands, CI running the same test command, ruff, and every command
README.md and docs/ show being one that works."""

import argparse
import ast
import functools
import importlib
import importlib.util
import inspect
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_has_exactly_two_commands():
    commands = quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "requirements.txt" in commands[0] and commands[0].endswith("python app.py")
    assert "requirements-dev.txt" in commands[1] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"TEST_COMMAND='{quickstart_commands()[1]}'" in ci


def test_torch_is_pinned():
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in requirements


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is installed by requirements-dev.txt")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- the documents' commands
# README.md and docs/*.md show commands in ```bash blocks and as inline `python ...` spans. Each must be one
# that works: the module (or script) exists and runs as a command, its flags parse as written, the test files
# and -k filters it names select tests, and the Python it shows compiles against names that exist. A block
# right after a line `<!-- recorded: ... -->` is a record of a past run (the command that made a file, on the
# code of its time): only its modules are checked.

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SEPARATORS = {"&&", "||", ";", "|"}
EXTERNAL_SCRIPTS = {"guided-diffusion/evaluations/evaluator.py"}  # OpenAI's evaluator, cloned by the FID doc
OUR_PACKAGES = {"app", "mvar", "train", "tests"}


@dataclass(frozen=True)
class Command:
    where: str  # file:line, for the failure message
    words: tuple[str, ...]
    complete: bool  # False for an inline span that may show only some of a command's flags
    recorded: bool = False


def _words(text: str) -> list[list[str]]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for word in lexer:
        if word in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in [*commands, current] if c]


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), text)


def _joined_lines(block: str, first: int) -> list[tuple[int, str]]:
    """The block's lines with backslash continuations joined, each with the document line it starts on."""
    joined, pending, start = [], "", first
    for number, line in enumerate(block.splitlines(), first):
        start = start if pending else number
        if line.endswith("\\"):
            pending += line[:-1] + " "
        else:
            joined.append((start, pending + line))
            pending = ""
    return joined


def documented_commands() -> list[Command]:
    commands = []
    for path in DOCUMENTS:
        name = path.relative_to(ROOT)
        text = path.read_text()
        for block in re.finditer(r"(<!-- recorded[^\n]*-->\n)?```bash\n(.*?)```", text, re.S):
            first = text.count("\n", 0, block.start(2)) + 1
            variables: dict[str, str] = {}
            for line, source in _joined_lines(block[2], first):
                for words in _words(_expand(source, variables)):
                    assignment = re.fullmatch(r"(\w+)=(.*)", words[0], re.S)
                    if assignment and len(words) == 1:
                        variables[assignment[1]] = assignment[2]
                        continue
                    while re.fullmatch(r"\w+=.*", words[0]) and len(words) > 1:  # VAR=value command
                        words = words[1:]
                    commands.append(Command(f"{name}:{line}", tuple(words), True, bool(block[1])))
        for span in re.finditer(r"(?<!`)`((?:python3?|torchrun) [^`\n]+)`", text):
            line = text.count("\n", 0, span.start()) + 1
            for words in _words(span[1]):
                commands.append(Command(f"{name}:{line}", tuple(words), False))
    return commands


def _split(words: tuple[str, ...]) -> tuple[str, str, list[str]] | None:
    """(kind, target, arguments) of a python or torchrun command: kind "module", "script" or "code"."""
    program = Path(words[0]).name
    if program == "torchrun":
        at = words.index("-m")
        return "module", words[at + 1], list(words[at + 2:])
    if not re.fullmatch(r"python(3(\.\d+)?)?", program) or len(words) < 2:
        return None
    if words[1] == "-m":
        return "module", words[2], list(words[3:])
    if words[1] == "-c":
        return "code", words[2], list(words[3:])
    return "script", words[1], list(words[2:])


def _python_commands(kind: str) -> list[tuple[Command, str, list[str]]]:
    found = []
    for command in documented_commands():
        split = _split(command.words)
        if split and split[0] == kind:
            found.append((command, split[1], split[2]))
    return found


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


class _Refused(Exception):
    pass


@functools.cache
def _entry_point(kind: str, target: str):
    """The module of a command and its ``main`` (None for a module whose __main__ takes no arguments)."""
    if kind == "script":
        spec = importlib.util.spec_from_file_location("documented_script", ROOT / target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    source = Path(module.__file__).read_text()
    assert re.search(r"^if __name__ == .__main__.:", source, re.M), f"{target} does not run as a command"
    return module, getattr(module, "main", None)


def _parser_of(main, monkeypatch) -> argparse.ArgumentParser:
    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Captured) as captured:
            main([])
    return captured.value.parser


def _options(parser: argparse.ArgumentParser) -> set[str]:
    options = set()
    for action in parser._actions:
        options.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= _options(sub)
    return options


def test_documents_show_commands():
    commands = documented_commands()
    kinds = {(_split(c.words) or ("other",))[0] for c in commands}
    assert len(commands) > 40 and {"module", "script", "code"} <= kinds


def test_documented_modules_and_scripts_take_their_flags(monkeypatch):
    problems = []
    commands = [(c, "module", t, a) for c, t, a in _python_commands("module")]
    commands += [(c, "script", t, a) for c, t, a in _python_commands("script") if t not in EXTERNAL_SCRIPTS]
    for command, kind, target, args in commands:
        if target in {"venv", "pip", "pytest"}:  # the tools the Quickstart runs; pytest: the next test
            continue
        if kind == "module" and target.split(".")[0] not in OUR_PACKAGES:
            problems.append(f"{command.where}: {target} is not one of our modules")
            continue
        try:
            module, main = _entry_point(kind, target)
        except (ImportError, AssertionError, FileNotFoundError) as err:
            problems.append(f"{command.where}: {target}: {err}")
            continue
        if command.recorded:
            continue
        if main is None:
            if args:
                problems.append(f"{command.where}: {target} takes no arguments, the document passes {args}")
            continue
        parser = _parser_of(main, monkeypatch)
        unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in _options(parser)]
        if unknown:
            problems.append(f"{command.where}: {target} has no flag {', '.join(unknown)}")
            continue

        def refuse(self, message):
            raise _Refused(message)

        with monkeypatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "error", refuse)
            try:
                parser.parse_args(args)
            except _Refused as err:
                if command.complete or not str(err).startswith("the following arguments are required"):
                    problems.append(f"{command.where}: {' '.join(command.words)}: {err}")
    assert not problems, "\n".join(problems)


def _pytest_runs() -> list[tuple[Command, list[str], list[str]]]:
    """(command, paths, -k expressions) of every documented pytest command that names test files."""
    runs = []
    for command, _, args in [c for c in _python_commands("module") if c[1] == "pytest"]:
        paths, keywords = [], []
        words = iter(args)
        for word in words:
            if word == "-k":
                keywords.append(next(words))
            elif not word.startswith("-"):
                paths.append(word)
        if paths:
            runs.append((command, paths, keywords))
    return runs


def _selects(expression, node_id: str) -> bool:
    """Whether ``-k`` selects the test: its expression's words against the names of the test, its class, its
    file and folder (pytest's own keyword matching, without markers)."""
    names = ["tests", *node_id.split("::")]
    names[1] = Path(names[1]).name
    return expression.evaluate(lambda word, **_: any(word.lower() in name.lower() for name in names))


def test_documented_test_commands_select_tests():
    from _pytest.mark.expression import Expression

    runs = _pytest_runs()
    files = sorted({path.split("::")[0] for _, paths, _ in runs for path in paths})
    missing = [f for f in files if not (ROOT / f).exists()]
    assert not missing, f"the documents name test files that do not exist: {missing}"
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *files], cwd=ROOT, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    node_ids = [line for line in collected.stdout.splitlines() if "::" in line]
    problems = []
    for command, paths, keywords in runs:
        if len(keywords) > 1:
            problems.append(f"{command.where}: pytest keeps only the last of several -k: {' '.join(command.words)}")
            continue
        for path in paths:
            items = [n for n in node_ids if n == path or n.startswith(path.rstrip("/") + "::")]
            if keywords:
                items = [n for n in items if _selects(Expression.compile(keywords[0]), n)]
            if not items:
                problems.append(f"{command.where}: selects no test of {path}: {' '.join(command.words)}")
    assert not problems, "\n".join(problems)


def _python_sources() -> list[tuple[str, str]]:
    sources = [(c.where, code) for c, code, _ in _python_commands("code")]
    for path in DOCUMENTS:
        text = path.read_text()
        for block in re.finditer(r"```python\n(.*?)```", text, re.S):
            sources.append((f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, block.start()) + 1}", block[1]))
    return sources


def test_documented_python_uses_names_that_exist():
    problems = []
    for where, source in _python_sources():
        tree = ast.parse(source)
        names = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                try:
                    module = importlib.import_module(node.module)
                except ImportError as err:
                    problems.append(f"{where}: {err}")
                    continue
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        problems.append(f"{where}: {node.module} has no {alias.name}")
                    else:
                        names[alias.asname or alias.name] = getattr(module, alias.name)
        for node in ast.walk(tree):  # calls of what the snippet imported: the arguments bind
            if not isinstance(node, ast.Call):
                continue
            target = node.func
            chain = []
            while isinstance(target, ast.Attribute):
                chain.insert(0, target.attr)
                target = target.value
            if not isinstance(target, ast.Name) or target.id not in names:
                continue
            function = names[target.id]
            for attribute in chain:
                function = getattr(function, attribute, None)
            home = getattr(names[target.id], "__module__", None) or getattr(names[target.id], "__name__", "")
            if function is None or home.split(".")[0] not in OUR_PACKAGES:
                continue
            try:
                inspect.signature(function).bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
            except TypeError as err:
                problems.append(f"{where}: {ast.unparse(node)}: {err}")
    assert not problems, "\n".join(problems)


def test_document_links_resolve():
    problems = []
    for path in DOCUMENTS:
        for link in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if not re.match(r"[a-z]+://", link) and not (path.parent / link.split("#")[0]).exists():
                problems.append(f"{path.relative_to(ROOT)}: {link}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_an_entry_to_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert readme.startswith("---\n") and "sdk: gradio" in readme.split("\n---\n", 1)[0]  # the Space's card
    for picture in ("app_screenshot.png", "samples_var.png", "samples_mvar.png"):
        assert f"assets/{picture}" in readme
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in readme, f"README does not link docs/{doc.name}"
