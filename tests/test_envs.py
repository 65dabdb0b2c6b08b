"""The per-rule conda environments (envs/*.yaml), checked offline.

No conda channel is reachable here, so the environments cannot be solved in the tests. What can
be checked is checked: every rule that runs code names an env file that exists; each file is
valid YAML with exactly the channels conda-forge + nodefaults; every spec parses as a conda
MatchSpec (py-rattler) or a pip requirement and is pinned to one version; the pins are the
versions installed in the environment the tests run in; and each env provides every third-party
package its rules' scripts import (followed through prvr's own modules).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest
import rattler
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / "envs"
RULE_FILES = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]
CHANNELS = ["conda-forge", "nodefaults"]
# conda-forge names that differ from the PyPI distribution name (after canonicalisation).
CONDA_TO_PYPI = {"pytorch": "torch"}
# Conda packages that are not Python distributions of the test environment.
NOT_PYPI = {"python"}
CODE_DIRECTIVES = ("script", "shell", "run", "notebook", "wrapper")

_RULE_RE = re.compile(r"^(?:rule|checkpoint)\s+(\w+)\s*:", re.M)


def canon(name: str) -> str:
    """PEP 503 canonical name (conda-forge and PyPI spell `_`/`-`/case differently)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def rules() -> list[tuple[str, Path, str]]:
    """(rule name, file, body) for every rule and checkpoint of the workflow."""
    out = []
    for path in RULE_FILES:
        text = path.read_text()
        starts = list(_RULE_RE.finditer(text))
        for i, m in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
            body = text[m.end() : end]
            # The body ends where the next top-level statement starts.
            top = re.search(r"^\S", body, re.M)
            out.append((m.group(1), path, body[: top.start()] if top else body))
    return out


def directive(body: str, name: str) -> str | None:
    """The string value of directive `name` in a rule body (same line or the next one)."""
    m = re.search(rf"^\s+{name}:[ \t]*\n?\s*r?([\"'])(.+?)\1", body, re.M)
    return m.group(2) if m else None


def has_directive(body: str, name: str) -> bool:
    return re.search(rf"^\s+{name}:", body, re.M) is not None


def load_env(path: Path) -> dict:
    with open(path) as f:
        env = yaml.safe_load(f)
    assert isinstance(env, dict), f"{path}: not a YAML mapping"
    return env


def env_specs(path: Path) -> tuple[list[str], list[str]]:
    """(conda specs, pip requirements) of one env file."""
    conda, pip = [], []
    for dep in load_env(path).get("dependencies") or []:
        if isinstance(dep, str):
            conda.append(dep)
        elif isinstance(dep, dict) and set(dep) == {"pip"} and isinstance(dep["pip"], list):
            pip.extend(dep["pip"])
        else:
            raise AssertionError(f"{path}: unexpected dependency entry {dep!r}")
    return conda, pip


def env_packages(path: Path) -> dict[str, str]:
    """canonical PyPI name -> pinned version, over conda and pip specs of one env file."""
    conda, pip = env_specs(path)
    out = {}
    for spec in conda:
        ms = rattler.MatchSpec(spec)
        name = ms.name.normalized
        if name in NOT_PYPI:
            continue
        out[canon(CONDA_TO_PYPI.get(name, name))] = str(ms.version).removeprefix("==")
    for req in pip:
        r = Requirement(req)
        out[canon(r.name)] = str(r.specifier).removeprefix("==")
    return out


def installed_version(dist: str) -> str:
    return md.version(dist).split("+")[0]


def referenced_envs() -> dict[str, Path]:
    """rule name -> env file, for every rule with a conda directive."""
    out = {}
    for name, path, body in rules():
        env = directive(body, "conda")
        if env is not None:
            out[name] = (path.parent / env).resolve()
    return out


def all_env_files() -> list[Path]:
    return sorted(ENVS.glob("*.yaml")) + sorted(ENVS.glob("*.yml"))


# --- third-party imports of a rule's script, followed through prvr's own modules ---------------


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imported_names(path: Path) -> set[str]:
    """Dotted names imported anywhere in a file (functions included; relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    try:
        package = list(path.relative_to(ROOT).with_suffix("").parts)
    except ValueError:
        package = []
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def third_party_imports(script: Path) -> set[str]:
    """Top-level third-party modules a script needs, through every prvr module it reaches."""
    todo, seen, found = [script], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path):
            top = name.split(".")[0]
            if top == "prvr":
                parts = name.split(".")
                # the module itself and every package __init__ on the way
                for i in range(1, len(parts) + 1):
                    f = _module_file(".".join(parts[:i]))
                    if f is not None:
                        todo.append(f)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


# --- tests --------------------------------------------------------------------------------------


def test_every_rule_running_code_has_an_existing_env():
    problems = []
    for name, path, body in rules():
        if not any(has_directive(body, d) for d in CODE_DIRECTIVES):
            continue  # aggregation rules (e.g. `all`) run nothing
        env = directive(body, "conda")
        if env is None:
            problems.append(f"{path.name}: rule {name} has no conda: directive")
        elif not (path.parent / env).resolve().is_file():
            problems.append(f"{path.name}: rule {name}: conda env {env} does not exist")
    assert not problems, "\n".join(problems)
    assert referenced_envs(), "no rule references a conda env"


def test_every_env_file_is_used():
    used = set(referenced_envs().values())
    unused = [p.name for p in all_env_files() if p.resolve() not in used]
    assert not unused, f"env files no rule references: {unused}"


@pytest.mark.parametrize("path", all_env_files(), ids=lambda p: p.name)
def test_env_file_structure(path):
    env = load_env(path)
    assert set(env) <= {"name", "channels", "dependencies"}, f"{path.name}: keys {sorted(env)}"
    assert env.get("channels") == CHANNELS, f"{path.name}: channels must be exactly {CHANNELS}"
    conda, pip = env_specs(path)
    assert conda, f"{path.name}: no dependencies"
    names = [rattler.MatchSpec(s).name.normalized for s in conda]
    assert len(names) == len(set(names)), f"{path.name}: duplicate conda packages {names}"
    assert "python" in names, f"{path.name}: python is not pinned"
    if pip:
        assert "pip" in names, f"{path.name}: a pip: section needs pip among the conda packages"
        pip_names = [canon(Requirement(r).name) for r in pip]
        assert len(pip_names) == len(set(pip_names)), f"{path.name}: duplicate pip packages"
        overlap = set(pip_names) & {canon(CONDA_TO_PYPI.get(n, n)) for n in names}
        assert not overlap, f"{path.name}: both from conda and pip: {sorted(overlap)}"


@pytest.mark.parametrize("path", all_env_files(), ids=lambda p: p.name)
def test_specs_parse_and_are_pinned(path):
    conda, pip = env_specs(path)
    problems = []
    for spec in conda:
        ms = rattler.MatchSpec(spec)  # raises on an invalid spec
        name, version = ms.name.normalized, str(ms.version or "")
        if ms.channel is not None or ms.build is not None:
            problems.append(f"{spec}: give only name and version")
        if name == "python":
            ok = re.fullmatch(r"3\.\d+\.\*", version) is not None
        else:
            ok = re.fullmatch(r"==[0-9][0-9A-Za-z.]*", version) is not None
        if not ok:
            problems.append(f"{spec}: not pinned to one version (use name==X.Y.Z)")
    for req in pip:
        r = Requirement(req)  # raises on an invalid requirement
        specs = list(r.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            problems.append(f"pip {req}: not pinned to one version")
        if r.url or r.marker or r.extras:
            problems.append(f"pip {req}: plain name==version only")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", all_env_files(), ids=lambda p: p.name)
def test_pins_are_the_tested_versions(path):
    conda, _ = env_specs(path)
    problems = []
    for spec in conda:
        ms = rattler.MatchSpec(spec)
        if ms.name.normalized == "python":
            want = f"{sys.version_info.major}.{sys.version_info.minor}.*"
            if str(ms.version) != want:
                problems.append(f"{spec}: the tests run Python {sys.version.split()[0]}")
    for dist, pinned in env_packages(path).items():
        try:
            have = installed_version(dist)
        except md.PackageNotFoundError:
            problems.append(f"{dist}=={pinned}: not installed in the test environment")
            continue
        if have != pinned:
            problems.append(f"{dist}: pinned {pinned}, tests run {have}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_envs_provide_what_rule_scripts_import():
    dists = md.packages_distributions()
    problems = []
    for name, path, body in rules():
        script, env = directive(body, "script"), directive(body, "conda")
        if script is None or env is None:
            continue
        script_path = (path.parent / script).resolve()
        if not script_path.is_file():
            problems.append(f"rule {name}: script {script} does not exist")
            continue
        provided = set(env_packages((path.parent / env).resolve()))
        for module in sorted(third_party_imports(script_path)):
            if module == "snakemake":
                problems.append(f"rule {name}: {script} imports snakemake")
                continue
            candidates = {canon(d) for d in dists.get(module, [])}
            if not candidates:
                problems.append(f"rule {name}: imports {module}, not installed for the tests")
            elif not candidates & provided:
                problems.append(
                    f"rule {name}: {script} (through prvr) imports {module} "
                    f"({'/'.join(sorted(candidates))}), missing from {env}"
                )
    assert not problems, "\n".join(problems)


def test_import_scan_follows_prvr_modules(tmp_path):
    # The scan must see imports made inside functions and through prvr packages' modules.
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from prvr.config import load_config\n")
    assert "yaml" in third_party_imports(script)  # prvr.config reads YAML
    script.write_text("import os, json\n")
    assert third_party_imports(script) == set()


def test_lint_finds_no_missing_env_or_log():
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert "Lints for" in out or proc.returncode == 0, out[-3000:]
    bad = [
        line.strip()
        for line in out.splitlines()
        if re.match(r"\s+\* (No log directive defined|.*conda environment)", line)
    ]
    assert not bad, "\n".join(bad) + "\n\n" + out[-3000:]
