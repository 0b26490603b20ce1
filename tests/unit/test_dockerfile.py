"""The Dockerfile, checked without building it (no Docker engine runs where these tests run).

What can be known statically: every file a COPY takes from the repository exists; what a COPY
takes from an earlier stage is made by that stage; every program the manifests in k8s/ start
in the image is there (a console script of the project, a file copied into the final stage,
or a base tool); the final stage, the image every manifest runs, installs bcc and iproute2 on
a Debian whose python3-bpfcc matches the image's Python. Whether the image builds, and whether
bcc compiles in it on a node, only a build and a cluster can tell (docs/kubernetes.md).
Each check returns its problems; a copy broken on purpose must have some.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from membrane.registry import SERVICES

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "ghcr.io/membrane-project/membrane"
VENV_BIN = "/opt/membrane/bin"
# coreutils and the shell of the Debian base image
BASE_TOOLS = frozenset({"cp", "sh", "/bin/sh"})
AGENT_PACKAGES = ("python3-bpfcc", "libbpfcc", "iproute2")
# Debian bookworm's python3 (which python3-bpfcc is built for) is 3.11
PYTHON_OF_DEBIAN = {"bookworm": "3.11"}


@dataclasses.dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, rest = logical.strip().partition(" ")
            yield keyword.upper(), rest.strip()
        logical = ""


def stages(text: str) -> list[Stage]:
    args: dict[str, str] = {}
    result: list[Stage] = []
    for keyword, rest in instructions(text):
        if keyword == "ARG" and not result:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            result.append(Stage(base, name))
        elif result:
            result[-1].instructions.append((keyword, rest))
    return result


def copies(stage: Stage) -> Iterator[tuple[str, list[str], str]]:
    """(--from stage or "", sources, destination) of each COPY."""
    for keyword, rest in stage.instructions:
        if keyword != "COPY":
            continue
        words = shlex.split(rest)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        origin = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), "")
        yield origin, paths[:-1], paths[-1]


def runs(stage: Stage) -> str:
    return "\n".join(rest for keyword, rest in stage.instructions if keyword == "RUN")


def console_scripts() -> set[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return set(tomllib.load(f)["project"]["scripts"])


def image_files(stage: Stage) -> set[str]:
    """The paths the final stage puts into the image: COPY destinations (a source copied into a
    directory keeps its name) and the virtualenv's console scripts."""
    files = set()
    for _, sources, destination in copies(stage):
        files.add(destination)
        if destination.endswith("/"):
            files.update(destination + Path(s).name for s in sources)
    if any(destination == "/opt/membrane" for _, _, destination in copies(stage)):
        files.update(f"{VENV_BIN}/{s}" for s in console_scripts())
    return files


def entrypoint(stage: Stage) -> list[str]:
    (value,) = [rest for keyword, rest in stage.instructions if keyword == "ENTRYPOINT"]
    words: list[str] = yaml.safe_load(value)  # the exec form is a JSON (so YAML) list
    return words


def image_containers(directory: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(directory.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = ((doc or {}).get("spec") or {}).get("template", {}).get("spec", {})
            for container in spec.get("initContainers", []) + spec.get("containers", []):
                if container["image"].split(":")[0] == IMAGE:
                    yield f"{path.name}/{container['name']}", container


# --- checks -----------------------------------------------------------------------------------


def copy_source_problems(text: str, root: Path) -> list[str]:
    problems = []
    known: dict[str, Stage] = {}
    for stage in stages(text):
        for origin, sources, _ in copies(stage):
            if not origin:
                problems += [
                    f"COPY {s}: no such file in the repository"
                    for s in sources
                    if not any(root.glob(s))
                ]
            elif origin not in known:
                problems.append(f"COPY --from={origin}: no earlier stage of that name")
            else:
                made = runs(known[origin]).split() + [d for _, _, d in copies(known[origin])]
                problems += [
                    f"COPY --from={origin} {s}: the stage does not make it"
                    for s in sources
                    if s not in made
                ]
        if stage.name:
            known[stage.name] = stage
    return problems


def entrypoint_problems(text: str, k8s: Path) -> list[str]:
    final = stages(text)[-1]
    files, scripts = image_files(final), console_scripts()
    problems = []
    for where, container in image_containers(k8s):
        command = container.get("command") or entrypoint(final)
        program = command[0]
        if program.startswith("/"):
            if program not in files:
                problems.append(f"{where}: {program} is not in the image")
        elif program not in scripts and program not in BASE_TOOLS:
            problems.append(f"{where}: {program} is neither a console script nor a base tool")
        if program == "cp":  # what it copies must be in the image too
            problems += [
                f"{where}: copies {a}, which is not in the image"
                for a in command[1:-1]
                if a not in files
            ]
        args = [] if "command" in container else container.get("args", [])
        if args[:1] == ["run"] and args[1] not in SERVICES:
            problems.append(f"{where}: `membrane run {args[1]}`: no such service")
    return problems


def agent_stage_problems(text: str) -> list[str]:
    """The final stage (the default target, the image the agent DaemonSet runs)."""
    final = stages(text)[-1]
    installed = re.findall(r"apt-get install ([^&]*)", runs(final))
    packages = {w for line in installed for w in line.split() if not w.startswith("-")}
    problems = [
        f"{p} is not installed in the final stage" for p in AGENT_PACKAGES if p not in packages
    ]
    if "dist-packages/bcc" not in runs(final):
        problems.append("Debian's bcc package is not linked into the virtualenv")
    python = re.search(r"python:(\d+\.\d+)-.*?(\w+)$", final.base)
    if python is None or PYTHON_OF_DEBIAN.get(python.group(2)) != python.group(1):
        problems.append(f"{final.base}: not a Python whose minor matches Debian's python3-bpfcc")
    return problems


# --- tests ------------------------------------------------------------------------------------


@pytest.fixture
def text() -> str:
    return DOCKERFILE.read_text()


def test_every_copy_source_exists(text: str) -> None:
    assert copy_source_problems(text, ROOT) == []


def test_copy_check_catches_a_missing_file_and_an_unmade_one(text: str) -> None:
    broken = text.replace("COPY shared ./shared", "COPY shared2 ./shared").replace(
        "-o /membrane-cni", "-o /plugin"
    )
    problems = copy_source_problems(broken, ROOT)
    assert any("COPY shared2" in p for p in problems)
    assert any("--from=cni /membrane-cni" in p for p in problems)


def test_every_program_the_manifests_start_is_in_the_image(text: str) -> None:
    assert entrypoint_problems(text, ROOT / "k8s") == []


def test_entrypoint_check_catches_a_missing_script_and_service(text: str, tmp_path: Path) -> None:
    agent = (ROOT / "k8s" / "agent.yaml").read_text()
    (tmp_path / "agent.yaml").write_text(
        agent.replace('"run", "datapath"', '"run", "datapth"').replace(
            "/opt/membrane/bin/membrane-kernel-headers", "/opt/membrane/bin/headers"
        )
    )
    problems = entrypoint_problems(text, tmp_path)
    assert any("run datapth`: no such service" in p for p in problems)
    assert any("/opt/membrane/bin/headers is not in the image" in p for p in problems)
    unshipped = text.replace("COPY --from=cni /membrane-cni /opt/membrane/cni/membrane-cni", "")
    assert any(
        "copies /opt/membrane/cni/membrane-cni" in p
        for p in entrypoint_problems(unshipped, ROOT / "k8s")
    )


def test_the_agent_image_has_bcc_for_its_python(text: str) -> None:
    assert agent_stage_problems(text) == []


def test_agent_stage_check_catches_missing_bcc_and_a_mismatched_python(text: str) -> None:
    broken = text.replace(" python3-bpfcc", "").replace("python:3.11-slim", "python:3.12-slim")
    problems = agent_stage_problems(broken)
    assert any("python3-bpfcc" in p for p in problems)
    assert any("python:3.12" in p for p in problems)
