"""Every snippet of README.md runs as written.

- ```python and ```bash blocks run in order, in one scratch folder (`scripts/`, `examples/` and `../shared` linked
  as in a checkout), offline, each block in a fresh interpreter / shell: what a block needs comes from the blocks above it.
  The first ```bash block (set-up and test suite, what CI runs) is the only one left out.
- ```text blocks hold full-scale commands (ImageNet, the Hub, a GPU) and printed output. Every command in them is
  checked against its program's `--help`: the script or subcommand exists and knows every option given.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
PROGRAMS = ("python ", "accelerate launch ", "hf-hierseg ")


def readme_blocks():
    """(language, code, line number) of every fenced block of README.md."""
    text = README.read_text(encoding="utf-8")
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def runnable_blocks():
    blocks = [block for block in readme_blocks() if block[0] in ("python", "bash")]
    first_bash = next(index for index, block in enumerate(blocks) if block[0] == "bash")
    return [block for index, block in enumerate(blocks) if index != first_bash]


def text_commands():
    """Commands (continuation lines joined) in the ```text blocks, with their line numbers."""
    commands = []
    for language, code, line in readme_blocks():
        if language != "text":
            continue
        for offset, logical in enumerate(code.replace("\\\n", " ").splitlines()):
            stripped = logical.strip()
            if stripped.startswith(PROGRAMS) and not stripped.startswith("python -c"):
                commands.append((stripped, line + offset))
    return commands


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, shared_dir):
    """A folder laid out as a checkout: `scripts/`, `examples/` and `../shared` as beside the repository."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").symlink_to(shared_dir)
    folder = root / "checkout"
    folder.mkdir()
    for name in ("scripts", "examples"):
        (folder / name).symlink_to(REPO_ROOT / name)
    return folder


def snippet_environment():
    bin_dir = str(Path(sys.executable).parent)
    return dict(
        os.environ,
        PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO_ROOT),
        MPLBACKEND="Agg",
    )


def test_the_readme_starts_with_the_two_commands_ci_runs():
    language, code, _ = readme_blocks()[0]
    commands = [line for line in code.splitlines() if line.strip() and not line.startswith("#")]
    assert language == "bash" and len(commands) == 2
    assert "pip install" in commands[0] and "pytest" in commands[1]


def test_a_test_run_that_would_split_this_file_between_workers_is_refused():
    """These blocks run in order, so pytest-xdist must keep the file in one worker (`--dist loadfile`, as the
    README's command has it); its default, `--dist load`, is refused before any worker starts."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "tests/test_layers.py"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout[-2000:] + result.stderr[-2000:]
    assert "--dist load would split tests/test_readme.py" in result.stderr and "--dist loadfile" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "language, code, line", [pytest.param(*block, id=f"line{block[2]}") for block in runnable_blocks()]
)
def test_snippet_runs(scratch, language, code, line):
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
    result = subprocess.run(
        command, cwd=scratch, env=snippet_environment(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"README.md line {line} ({language}):\n{code}\n{result.stderr[-4000:]}"


def program_and_options(arguments):
    """The `--help` command of the program a README command starts, and the options given to that program."""
    if arguments[0] in ("python", "accelerate"):  # python SCRIPT ... / accelerate launch [its options] SCRIPT ...
        index = next(i for i, argument in enumerate(arguments) if argument.endswith(".py"))
        script = REPO_ROOT / arguments[index]
        assert script.is_file(), f"{arguments[index]} does not exist"
        command = [sys.executable, str(script), "--help"]
    else:  # hf-hierseg SUBCOMMAND [SUBCOMMAND] ...
        index = 1
        while index < len(arguments) and index < 3 and re.fullmatch(r"[a-z][a-z-]*", arguments[index]):
            index += 1
        command = [sys.executable, "-m", "hf_hierseg", *arguments[1:index], "--help"]
    options = [argument.split("=")[0] for argument in arguments[index:] if argument.startswith("--")]
    return command, options


@pytest.mark.slow
@pytest.mark.parametrize("command, line", [pytest.param(*c, id=f"line{c[1]}") for c in text_commands()])
def test_full_scale_command_uses_existing_options(command, line):
    help_command, options = program_and_options(shlex.split(command))
    result = subprocess.run(help_command, env=snippet_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README.md line {line}: {result.stderr[-2000:]}"
    for option in options:
        assert re.search(rf"{re.escape(option)}\b", result.stdout), f"README.md line {line}: {option} unknown"
