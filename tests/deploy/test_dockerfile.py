"""The Dockerfile: a CUDA runtime base, a non-root agent, and the README's install command."""

from __future__ import annotations

import re

from tests.deploy.conftest import DEPLOY, REPO

DOCKERFILE = DEPLOY / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def install_commands(text: str) -> list[str]:
    """The venv and pip commands in a shell text, whitespace normalised."""
    commands = re.split(r"&&|\n|;", text)
    return [" ".join(c.split()) for c in commands if re.search(r"\bpip install\b|-m venv\b", c)]


def operations_section() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("\n## Operations")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else None]


def test_cuda_runtime_base_and_a_non_root_user() -> None:
    steps = instructions()
    [base] = [args for word, args in steps if word == "FROM"]
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    order = [word for word, _ in steps]
    assert order.index("USER") < order.index("ENTRYPOINT")
    assert ("STOPSIGNAL", "SIGTERM") in steps


def test_the_install_is_the_readmes() -> None:
    runs = " && ".join(args for word, args in instructions() if word == "RUN")
    docker = install_commands(runs)
    assert any("pip install" in c for c in docker) and any("-m venv" in c for c in docker)
    readme = install_commands(operations_section())
    missing = [c for c in docker if c not in readme]
    assert missing == [], (
        f"the README's Operations section does not install as the Dockerfile does: {missing}"
    )
