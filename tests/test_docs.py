"""The documentation stands on its own: what README.md and docs/ name exists in the repository.

- no path of one machine (under ``/work`` or ``/tmp``) in the tracked text files: the README
  once told users to run a reference set-up from a shared folder and files in a temporary
  folder that nothing creates;
- every repository file the README names (tools/, configs/, docs/, demo/, .ci/) exists;
- every ``--option`` the README passes to a script of this repository is one that script
  defines (as its ``--help`` lists them);
- docs/method.md has the five numbered sections that code cites as ``docs/method.md §N``, and
  every such citation in the repository names a section or subsection that exists.
"""
import functools
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
METHOD = os.path.join(REPO, "docs", "method.md")
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".sh", ".cfg", ".toml", ".txt", "Makefile")


def tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines() if f.endswith(TEXT_SUFFIXES)]


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def readme_commands():
    """Shell lines of the README's ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", read("README.md"), flags=re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


@functools.lru_cache(maxsize=None)
def script_options(script):
    """The --options ``script`` defines, as its own ``--help`` lists them."""
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-2000:]}"
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", proc.stdout))


def test_no_machine_paths_in_tracked_files():
    offenders = []
    for path in tracked_text_files():
        for n, line in enumerate(read(path).splitlines(), 1):
            if re.search(r"(?<![\w.~])/(work|tmp)/", line):
                offenders.append(f"{path}:{n}: {line.strip()}")
    assert offenders == []


def test_files_named_in_readme_exist():
    # Paths inside links to other repositories (MMDetection's configs/queryinst, Detectron2's
    # tools/) are theirs.
    text = re.sub(r"\[[^\]]*\]\(https?://[^)]*\)", "", read("README.md"))
    names = set(re.findall(r"(?<![\w/.-])((?:tools|configs|docs|demo|\.ci)/[\w./-]*\w)", text))
    assert "tools/results_table.py" in names and "configs/Base-QueryInst.yaml" in names
    missing = sorted(n for n in names if not os.path.exists(os.path.join(REPO, n)))
    assert missing == []


def test_readme_commands_use_options_their_scripts_define():
    checked = 0
    for line in readme_commands():
        m = re.search(r"python\S*\s+((?:tools|demo)/\w+\.py|train_net\.py)(.*)", line)
        if not m:
            continue
        script, rest = m.groups()
        unknown = set(re.findall(r"(?<!\S)(--[\w-]+)", rest)) - script_options(script)
        assert not unknown, f"README: {line.strip()!r} uses {sorted(unknown)}"
        checked += 1
    assert checked >= 8  # train_net, demo, converter, benchmark, results_table commands


def test_method_has_the_numbered_sections():
    headings = re.findall(r"^## (\d)\. (.+)$", read("docs/method.md"), flags=re.M)
    assert headings == [("1", "Architecture"), ("2", "Training"), ("3", "Inference"),
                        ("4", "Official checkpoint layout"), ("5", "Reference results"),
                        ("6", "Video instance segmentation (QueryInstVIS)"),
                        ("7", "CityScapes")]


def test_method_citations_name_existing_sections():
    text = read("docs/method.md")
    sections = set(re.findall(r"^## (\d)\.", text, flags=re.M))
    sections |= set(re.findall(r"^### (\d\.\d) ", text, flags=re.M))
    cited = []
    for path in tracked_text_files():
        for m in re.finditer(r"docs/method\.md(?:`?\]\([^)]*\))?`*\s+((?:§[\d.]+(?:-\d+)?(?:,\s*| and ))*"
                             r"§[\d.]+(?:-\d+)?)", read(path)):
            for num in re.findall(r"§(\d+(?:\.\d+)?)(?:-(\d+))?", m.group(1)):
                cited.append((path, num[0]))
                if num[1]:
                    cited.append((path, num[1]))
    assert ("README.md", "5") in cited
    assert [c for c in cited if c[1] not in sections] == []
