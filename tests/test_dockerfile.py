"""The Dockerfile's pins agree with setup.py, and the image is set up as documented.

No Docker engine runs on the CPU machines, so these tests read the files: every pip package the Dockerfile installs
is pinned with ==, each pin satisfies setup.py's specifier for that package, every runtime / train / gpu
dependency is pinned (torch comes from the base image tag), the image ends as a non-root user, and .dockerignore
keeps the code, configs and launch scripts in the build context.
"""
from __future__ import annotations

import ast
import re
import shlex
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
RUN_COMMAND = "docker run --gpus all -v DATA:/data IMAGE launch/train.sh configs/gemma2/9b_full.yaml"
BASE_IMAGE = re.compile(r"^pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>12\.\d+)-cudnn9-devel$")
PIP_FLAGS = {"--no-build-isolation", "--no-deps"}  # anything else needs a look (and this list extended)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comment lines dropped, backslash continuations joined."""
    logical, out = "", []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        logical = ""
    return out


def shell_commands(line: str) -> list[list[str]]:
    """Split a shell line into the token lists of its commands at &&, ||, ; and | outside quotes."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(instrs: list[tuple[str, str]]) -> list[list[str]]:
    """Token lists after `pip install` of every shell command in RUN instructions (env assignments dropped)."""
    found = []
    for keyword, args in instrs:
        if keyword != "RUN":
            continue
        for tokens in shell_commands(args):
            while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
                tokens = tokens[1:]
            if tokens[:2] == ["pip", "install"] or tokens[:4] == ["python", "-m", "pip", "install"]:
                found.append(tokens[tokens.index("install") + 1 :])
    return found


def setup_requirements() -> dict[str, list[Requirement]]:
    """BASE and EXTRAS from setup.py, read with ast (running setup.py would call setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("BASE", "EXTRAS"):
                values[node.targets[0].id] = ast.literal_eval(node.value)
    assert set(values) == {"BASE", "EXTRAS"}, "setup.py must define BASE = [...] and EXTRAS = {...} as literals"
    groups = {"base": values["BASE"], **values["EXTRAS"]}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


@pytest.fixture(scope="module")
def docker():
    instrs = instructions(DOCKERFILE.read_text(encoding="utf-8"))
    pins: dict[str, Version] = {}
    problems = []
    for tokens in pip_installs(instrs):
        for token in tokens:
            if token.startswith("-"):
                if token not in PIP_FLAGS:
                    problems.append(f"unexpected pip option {token!r}")
                continue
            if token == ".":
                continue
            req = Requirement(token)
            specs = list(req.specifier)
            if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
                problems.append(f"{token!r} is not pinned with ==X")
                continue
            name, version = canonicalize_name(req.name), Version(specs[0].version)
            if name in pins and pins[name] != version:
                problems.append(f"{name} is pinned twice: {pins[name]} and {version}")
            pins[name] = version
    assert not problems, problems
    return instrs, pins


def test_every_pin_satisfies_setup_py(docker):
    _, pins = docker
    groups = setup_requirements()
    checked = 0
    for group, reqs in groups.items():
        for req in reqs:
            name = canonicalize_name(req.name)
            if name in pins:
                checked += 1
                assert req.specifier.contains(pins[name], prereleases=True), (
                    f"Dockerfile pins {name}=={pins[name]} but setup.py {group} wants {req}"
                )
    assert checked >= 10, f"only {checked} pins matched setup.py: is the Dockerfile parsed?"


def test_runtime_train_and_gpu_dependencies_are_all_pinned(docker):
    _, pins = docker
    groups = setup_requirements()
    needed = {canonicalize_name(r.name) for g in ("base", "train", "gpu") for r in groups[g]}
    assert "torch" not in pins, "torch comes from the base image; a pip torch would replace its CUDA build"
    missing = sorted(needed - {"torch"} - set(pins))
    assert not missing, f"Dockerfile does not pin {missing}"


def test_base_image_is_pinned_and_its_torch_satisfies_setup_py(docker):
    instrs, _ = docker
    froms = [args for keyword, args in instrs if keyword == "FROM"]
    assert len(froms) == 1, froms
    match = BASE_IMAGE.match(froms[0])
    assert match, f"base image {froms[0]!r} is not a pinned pytorch/pytorch:<ver>-cuda12.x-cudnn9-devel tag"
    torch_req = next(r for r in setup_requirements()["base"] if canonicalize_name(r.name) == "torch")
    assert torch_req.specifier.contains(Version(match["torch"])), f"{froms[0]} has torch {match['torch']}, setup.py wants {torch_req}"
    # The build asserts the image's torch is the one the tag names; keep that check in step with the tag.
    run_text = " ".join(args for keyword, args in instrs if keyword == "RUN")
    assert f"startswith('{match['torch']}')" in run_text and f"startswith('{match['cuda']}')" in run_text


def test_flash_attn_builds_against_the_image_torch(docker):
    instrs, _ = docker
    run_text = " ".join(args for keyword, args in instrs if keyword == "RUN")
    segment = next(s for s in re.split(r"&&", run_text) if "flash-attn==" in s)
    assert "--no-build-isolation" in segment and "MAX_JOBS=" in segment


def test_image_runs_as_non_root_user(docker):
    instrs, _ = docker
    users = [args for keyword, args in instrs if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    user = users[-1].split(":")[0]
    assert any(keyword == "RUN" and f"useradd" in args and user in args for keyword, args in instrs)


def test_run_command_is_documented_and_its_files_exist():
    comments = [line.lstrip("# ").strip() for line in DOCKERFILE.read_text().splitlines() if line.startswith("#")]
    assert RUN_COMMAND in comments
    for path in RUN_COMMAND.split("IMAGE ", 1)[1].split():
        assert (ROOT / path).is_file(), f"the documented command uses {path}, which does not exist"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics for the patterns used here: a pattern excludes a path or any directory
    above it; `**` spans directories, `*` and `?` do not; a later `!pattern` re-includes."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_code_and_drops_data():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    keep = ["setup.py", "README.md", "launch/train.sh", "configs/gemma2/9b_full.yaml", "configs/deepspeed/zero3.json",
            "data/__init__.py", "data/scoring.py", "training/report.py", "inference/modeling.py"]
    assert [p for p in keep if dockerignored(p, patterns)] == []
    drop = [".git/HEAD", "runs/x/checkpoint/model.safetensors", "wandb/run-1/files", "data/__pycache__/x.pyc",
            ".ci/venv/bin/python", "train.csv", "shared/data/train.csv"]
    assert [p for p in drop if not dockerignored(p, patterns)] == []
    # Every file of the project's code must make it into the context (not what a user's runs left in the tree,
    # e.g. the zero_to_fp32.py DeepSpeed writes into each checkpoint).
    files = project_files("*.py")
    assert "training/train.py" in files and not any(f.startswith("runs/") for f in files)
    assert [f for f in files if dockerignored(f, patterns)] == []


def project_files(pattern: str) -> list[str]:
    """The files that belong to the project: what git tracks plus new files it does not ignore; outside a git
    checkout (an unpacked sdist), the files under the project's own top-level folders."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", pattern],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return sorted(set(out.split()))
    except (OSError, subprocess.CalledProcessError):
        own = ("bench", "configs", "data", "inference", "launch", "tests", "training")
        return sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob(pattern)
                      if p.relative_to(ROOT).parts[0] in own + (p.name,) and "__pycache__" not in p.parts)


def test_parsers_on_a_small_example():
    text = "# c\nFROM x\nRUN a && \\\n    MAX_JOBS=2 pip install --no-deps foo==1.0 \\\n    bar==2\nUSER u\n"
    instrs = instructions(text)
    assert instrs == [("FROM", "x"), ("RUN", "a &&      MAX_JOBS=2 pip install --no-deps foo==1.0      bar==2"), ("USER", "u")]
    assert pip_installs(instrs) == [["--no-deps", "foo==1.0", "bar==2"]]
    assert shell_commands("""a "x && y; z" && b 'c;d' | e""") == [["a", "x && y; z"], ["b", "c;d"], ["e"]]
    assert dockerignored("a/b/c.pyc", ["**/*.pyc"]) and dockerignored("c.pyc", ["**/*.pyc"])
    assert dockerignored("runs/x/y", ["runs"]) and not dockerignored("myruns/x", ["runs"])
    assert not dockerignored("keep.csv", ["*.csv", "!keep.csv"]) and dockerignored("a.csv", ["*.csv"])
