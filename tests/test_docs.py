"""The documentation stands on its own: what README.md and docs/*.md name exists in the repository.

The pages checked are README.md and every docs/*.md (not docs/results/, which
tools/results_table.py writes). For them:

- no path of one machine (under ``/work`` or ``/tmp``) in the tracked text files: the README
  once told users to run a reference set-up from a shared folder and files in a temporary
  folder that nothing creates;
- every repository file a page names (tools/, configs/, docs/, demo/, tests/, .ci/, globs and
  ``{a,b}`` alternatives included) exists, and so does every file of the package
  (``projects/QueryInst/queryinst/...`` or ``queryinst/...``) and every ``queryinst.x.y`` name;
- every ``--option`` a page passes to a script of this repository, in a ```bash block or an
  inline command, is one that script defines (as its ``--help`` lists them), and every
  ``make`` target is one of the Makefile's;
- every config key a page names (``MODEL.QUERYINST.NUM_PROPOSALS``) is declared by Detectron2
  or by ``add_queryinst_config`` / ``add_queryinst_vis_config``;
- every relative link resolves to a file, and its ``#anchor`` to a heading of that file; every
  docs page is linked from README.md, and the README stays short;
- docs/method.md has the numbered sections that code cites as ``docs/method.md §N``, and every
  such citation in the repository names a section or subsection that exists.
"""
import functools
import glob
import importlib
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join("projects", "QueryInst", "queryinst")
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".sh", ".cfg", ".toml", ".txt", "Makefile")
SCRIPT = r"((?:tools|demo)/\w+\.py|train_net\.py)"
# Keys the docs spell wrong on purpose: the error message for a misspelled key.
WRONG_ON_PURPOSE = {"MODEL.QUERYINST.NUM_PROPOSAL"}
# Files of other repositories that the docs name in prose: Detectron2's tools and configs,
# MMDetection's / the official repository's QueryInst configs.
OTHER_REPOSITORIES = {"tools/analyze_model.py", "configs/Cityscapes/mask_rcnn_R_50_FPN.yaml",
                      "configs/queryinst/*.py", "configs/queryinst"}


def tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines() if f.endswith(TEXT_SUFFIXES)]


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def doc_pages():
    """README.md and docs/*.md, as paths relative to the repository."""
    pages = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
    return ["README.md"] + pages


def without_links(text):
    """``text`` with every markdown link target dropped (the link text stays)."""
    return re.sub(r"(\[[^\]]*\])\([^)]*\)", r"\1", text)


def expand(name):
    """``a{b,c}d`` -> [``abd``, ``acd``] (one level, as the docs write them)."""
    m = re.search(r"\{([^{}]*)\}", name)
    if not m:
        return [name]
    return [out for alt in m.group(1).split(",")
            for out in expand(name[:m.start()] + alt + name[m.end():])]


def missing(names, root=REPO):
    """The names (globs and ``{a,b}`` allowed) that match no file or folder under ``root``."""
    return sorted(n for n in names
                  if not all(glob.glob(os.path.join(root, e)) for e in expand(n)))


def commands(text):
    """Shell lines of ```bash blocks (continuation lines joined) and inline code spans."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + re.findall(r"`([^`\n]+)`", prose.replace("\n", " "))


@functools.lru_cache(maxsize=None)
def script_options(script):
    """The --options ``script`` defines, as its own ``--help`` lists them."""
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-2000:]}"
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", proc.stdout))


def github_anchor(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", read(path), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_no_machine_paths_in_tracked_files():
    offenders = []
    for path in tracked_text_files():
        for n, line in enumerate(read(path).splitlines(), 1):
            if re.search(r"(?<![\w.~])/(work|tmp)/", line):
                offenders.append(f"{path}:{n}: {line.strip()}")
    assert offenders == []


def test_the_pages_exist_and_the_readme_is_short():
    pages = doc_pages()
    for page in ("getting_started", "install", "datasets", "training", "evaluation", "video",
                 "deployment", "official_weights", "benchmark", "method"):
        assert f"docs/{page}.md" in pages
    assert len(read("README.md").splitlines()) <= 250


def test_files_named_in_the_docs_exist():
    # Paths inside links to other repositories (MMDetection's configs/queryinst, Detectron2's
    # tools/) are theirs; paths under a "..." are abbreviations.
    problems = {}
    for page in doc_pages():
        text = without_links(re.sub(r"\[[^\]]*\]\(https?://[^)]*\)", "", read(page)))
        names = set(re.findall(r"(?<![\w/.-])((?:tools|configs|docs|demo|tests|\.ci)/"
                               r"[\w./*{},-]*[\w*}])", text)) - OTHER_REPOSITORIES
        if missing(names):
            problems[page] = missing(names)
    assert "tools/results_table.py" in read("README.md")
    assert problems == {}


def package_names(text):
    """Package files a page names: ``projects/QueryInst/queryinst/x/y.py`` or ``queryinst/x/y.py``."""
    full = re.findall(r"projects/QueryInst/queryinst/([\w./]*\w)", text)
    short = re.findall(r"(?<![\w/.-])queryinst/([\w./]*\w)", text)
    return {n for n in full + short if n != "ImageNetPretrained/MobileNetV2"}


def test_package_files_named_in_the_docs_exist():
    # The "Code:" names of docs/method.md are relative to the package.
    code = re.findall(r"`((?:modeling|checkpoint|data|engine|evaluation|export|video)/[\w./]*\.py)`",
                      read("docs/method.md"))
    problems = {page: missing(package_names(without_links(read(page))), os.path.join(REPO, PACKAGE))
                for page in doc_pages()}
    problems["docs/method.md (Code:)"] = missing(set(code), os.path.join(REPO, PACKAGE))
    assert {page: names for page, names in problems.items() if names} == {}


def test_python_names_in_the_docs_resolve():
    unresolved = set()
    for page in doc_pages():
        for name in re.findall(r"(?<![\w./])(queryinst(?:\.[A-Za-z_]\w*)+)", read(page)):
            parts, obj, n = name.split("."), None, 1
            while n <= len(parts):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:n]))
                    n += 1
                except ImportError:
                    break
            for attr in parts[n - 1:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                unresolved.add(f"{page}: {name}")
    assert sorted(unresolved) == []


def test_commands_use_options_their_scripts_define():
    checked, unknown = 0, []
    for page in doc_pages():
        for line in commands(read(page)):
            m = re.search(r"(?<![\w/])" + SCRIPT + r"(.*)", line)
            if not m:
                continue
            script, rest = m.groups()
            if script in OTHER_REPOSITORIES:
                continue
            rest = re.split(r"\s#\s", rest)[0]  # a shell comment
            bad = set(re.findall(r"(?<![\S\[])\[?(--[\w-]+)", rest)) - script_options(script)
            if bad:
                unknown.append(f"{page}: {line.strip()!r} uses {sorted(bad)}")
            checked += 1
    assert unknown == []
    assert checked >= 30  # train_net, demo, export, converter, benchmark, results_table, ...


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", read("Makefile"), flags=re.M))
    used = set()
    for page in doc_pages():
        for line in commands(read(page)):
            for m in re.finditer(r"(?<![\w-])make ((?:[a-z][\w-]*(?: |$))+)", line):
                used |= set(m.group(1).split())
    assert {"demo", "test"} <= used
    assert used - targets == set()


def test_config_keys_named_in_the_docs_exist():
    from detectron2.config import get_cfg

    from queryinst import add_queryinst_config
    from queryinst.video import add_queryinst_vis_config

    cfg = get_cfg()
    add_queryinst_config(cfg)
    add_queryinst_vis_config(cfg)

    def exists(key):
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    unknown = set()
    for page in doc_pages():
        for key in re.findall(r"(?<![\w.])((?:MODEL|SOLVER|INPUT|DATASETS|DATALOADER|TEST)"
                              r"(?:\.[A-Z][A-Z0-9_]*)+)", read(page)):
            if key not in WRONG_ON_PURPOSE and not exists(key):
                unknown.add(f"{page}: {key}")
    assert sorted(unknown) == []


def test_relative_links_resolve():
    broken = []
    for page in doc_pages():
        text = re.sub(r"```.*?```", "", read(page), flags=re.S)
        targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img src="([^"]+)"', text)
        for target in targets:
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(REPO, path)):
                broken.append(f"{page}: {target} (no {path})")
            elif anchor and path.endswith(".md") and anchor not in anchors(path):
                broken.append(f"{page}: {target} (no heading #{anchor} in {path})")
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(t.partition("#")[0])
              for t in re.findall(r"\]\(([^)\s]+)\)", read("README.md"))}
    assert [p for p in doc_pages()[1:] if p not in linked] == []
    assert "docs/architecture.md" in linked  # written with the package layout (issue 25)


def test_newcomer_path_reaches_each_task_page_in_one_click():
    """Quick start, an official checkpoint, a custom COCO dataset, a video, ONNX: one link each
    from the README to the page of that task, and that page covers it."""
    readme = read("README.md")
    for page, heading in (("docs/getting_started.md", "the-two-commands"),
                          ("docs/official_weights.md", "evaluate-or-fine-tune-them-directly"),
                          ("docs/datasets.md", "custom-datasets-coco-format"),
                          ("docs/video.md", "quick-start-track-a-video"),
                          ("docs/deployment.md", "export-onnx--torchscript")):
        assert f"]({page}" in readme, page
        assert heading in anchors(page), (page, heading)


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
