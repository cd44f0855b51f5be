"""constraints.txt locks the CPU install: every requirement of setup.py is pinned there within its range, the
Dockerfile pins the same versions, CI and the quickstart install through it, and this environment is the lock's."""
from __future__ import annotations

import importlib.metadata as md
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT
from tests.test_dockerfile import DOCKERFILE, instructions, pip_installs, setup_requirements

LOCK = ROOT / "constraints.txt"


def lock() -> dict[str, Version]:
    pins = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{LOCK.name}:{n}: {line!r} is not pinned with =="
        pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins


def test_every_setup_requirement_is_locked_within_its_range():
    pins = lock()
    for group in ("base", "train", "test"):  # the CPU install: .[train,test]; gpu extras cannot install here
        for req in setup_requirements()[group]:
            name = canonicalize_name(req.name)
            assert name in pins, f"{req} ({group}) is not in {LOCK.name}"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"{LOCK.name} pins {name}=={pins[name]} outside setup.py's {req} ({group})")


def test_dockerfile_pins_the_locked_versions():
    pins = lock()
    shared = 0
    for tokens in pip_installs(instructions(DOCKERFILE.read_text())):
        for token in tokens:
            if token.startswith("-") or token == ".":
                continue
            req = Requirement(token)
            name = canonicalize_name(req.name)
            if name in pins:
                shared += 1
                assert Version(next(iter(req.specifier)).version) == pins[name], (
                    f"Dockerfile pins {token}, {LOCK.name} {name}=={pins[name]}")
    assert shared >= 10, shared


def test_ci_and_quickstart_install_through_the_lock():
    for script in (ROOT / ".ci" / "run", ROOT / "launch" / "quickstart.sh"):
        installs = [line for line in script.read_text().splitlines() if re.search(r"\bpip install\b.*-e ", line)]
        assert installs and all("-c constraints.txt" in line for line in installs), (script, installs)


def test_this_environment_is_the_locked_one():
    """The versions under these tests are the versions users get (run after a locked install, as CI does)."""
    wrong = []
    for name, version in lock().items():
        try:
            installed = Version(md.version(name))
        except md.PackageNotFoundError:
            wrong.append(f"{name} not installed (locked {version})")
            continue
        if installed != version:
            wrong.append(f"{name} {installed} (locked {version})")
    assert not wrong, f"environment differs from {LOCK.name} (install with pip install -c constraints.txt): {wrong}"
