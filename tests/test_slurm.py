"""The cluster path: profiles/slurm on a real (single-node, localhost) Slurm.

The slow test brings a cluster up with profiles/slurm/local_cluster.sh (installing Debian's
Slurm packages when missing: needs root and apt-get, skipped otherwise), runs the tiny workflow
through `snakemake --workflow-profile profiles/slurm`, and checks that every output equals the
one of a local run of the same code and config, that every job went through Slurm and finished,
and that the rules the profile gives a GPU got one (the node has fake GPUs). Every wait has a
timeout; the daemons the test started are stopped even when it fails.

The fast tests check the profile against the workflow (rule names, GPU rules) and the script.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_envs import rules

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
SCRIPT = REPO / "profiles" / "slurm" / "local_cluster.sh"
SYSCONF = Path("/etc/slurm/slurm.conf")

# The tiny workflow: 8 procedural demo videos, tiny random-weight models, 2 shards per feature set.
TINY = {
    "targets": ["tiny"],
    "runs": {"dldkdpp": {}},
    "datasets": {
        "tiny": {
            "demo": {"n_videos": 8, "seed": 1},
            "videos": "results/tiny/raw/videos",
            "captions": {s: f"results/tiny/raw/demo{s}.caption.txt" for s in ("train", "val", "test")},
            "clip": {"model": "local-dir:results/tiny/models/clip", "pretrained": None, "batch_size": 16},
            "frames": {"fps": 1.0, "max_steps": 8},
            "student_video": [
                {"kind": "clip", "model": "local-dir:results/tiny/models/student_clip", "pretrained": None}
            ],
            "student_text": {"model": "results/tiny/models/roberta", "max_tokens": 16},
            "extract": {"shard_size": 4, "workers": 1, "timeout_s": 60},
            "train": {"n_epoch": 2, "batch_size": 4, "hidden": 32, "n_heads": 4, "progress": False},
        }
    },
}
# Time limits (seconds). Measured on 2 busy cores: cluster start 7-18 s (+ ~25-45 s of apt-get on
# a fresh machine); both runs side by side 280-340 s.
START_TIMEOUT = 300
RUN_TIMEOUT = 480  # both runs, side by side
STOP_TIMEOUT = 120
# Output files whose content records wall-clock time; compared without those fields.
TIMING_KEYS = {"seconds", "seconds_per_epoch", "elapsed", "time"}
TIMING_KEYS |= {"fingerprint"}  # last.pt's resume key: a hash of the input stores' per-write uids


def load_profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


def gpu_rules() -> set[str]:
    return {r for r, res in (load_profile().get("set-resources") or {}).items() if res.get("gpu")}


# --- fast checks of the profile -------------------------------------------------------------


def test_profile_resources_name_existing_rules():
    names = {name for name, _, _ in rules()}
    profile = load_profile()
    assert profile["executor"] == "slurm"
    unknown = set(profile.get("set-resources") or {}) - names
    assert not unknown, f"{PROFILE}: set-resources names no rule {sorted(unknown)}"


def test_rules_using_a_device_get_a_gpu():
    # A rule that takes the `device` setting runs models: on a cluster it should ask for a GPU.
    device_rules = {name for name, _, body in rules() if '"device"' in body}
    assert device_rules, "no rule takes the device setting"
    missing = device_rules - gpu_rules()
    assert not missing, f"{PROFILE}: rules that run models without gpu: 1: {sorted(missing)}"
    extra = gpu_rules() - device_rules
    assert not extra, f"{PROFILE}: gpu: 1 on rules that never use a device: {sorted(extra)}"


def test_default_profile_is_minimal():
    default = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    # Every key here silently overrides a user's --profile; nothing that changes what runs.
    assert set(default) <= {"printshellcmds", "show-failed-logs", "rerun-triggers"}, sorted(default)


def test_local_cluster_script_parses_and_explains_itself():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "start" in proc.stdout and "stop" in proc.stdout
    proc = subprocess.run(["bash", str(SCRIPT), "bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2


# --- the cluster -----------------------------------------------------------------------------


def _why_no_cluster() -> str | None:
    if not sys.platform.startswith("linux"):
        return "a local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "needs root: local_cluster.sh installs Debian's Slurm packages and starts daemons"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "needs apt-get (Debian/Ubuntu) to install Slurm"
    if SYSCONF.exists() and not (
        SYSCONF.is_symlink() and "Written by profiles/slurm/local_cluster.sh" in SYSCONF.read_text()
    ):
        return f"{SYSCONF} exists: this machine has its own Slurm configuration"
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_base() -> int:
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(20000, 60000)
        if all(_port_free(base + i) for i in range(4)):
            return base
    raise RuntimeError("no 4 consecutive free TCP ports on 127.0.0.1")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"({path} unreadable)"


class Bounded:
    """A command in its own process group, output to a log; ended with its children on timeout."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict, log: Path):
        self.cmd, self.log, self.t0 = cmd, log, time.monotonic()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.seconds: float | None = None

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and self.seconds is None:
            self.seconds = time.monotonic() - self.t0
        return rc

    @staticmethod
    def wait_all(runs: list[Bounded], deadline: float) -> list[int]:
        """Exit statuses; ends every run and raises if one runs past `deadline` (monotonic)."""
        while None in [r.poll() for r in runs]:  # poll each (records its end time)
            if time.monotonic() > deadline:
                late = [r for r in runs if r.poll() is None]
                for r in runs:
                    r.kill()
                raise AssertionError(
                    "timed out:\n" + "\n".join(f"{' '.join(r.cmd)}\n{_tail(r.log)}" for r in late)
                )
            time.sleep(0.5)
        return [r.poll() for r in runs]

    def kill(self) -> None:
        # SIGINT first, as Ctrl-C: Snakemake then cancels the Slurm jobs it submitted (on SIGTERM
        # it would wait for them); whatever is left of the cluster's jobs, `stop` cancels.
        for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture
def slurm_cluster():
    """A single-node Slurm on localhost; yields its state directory; always stopped after."""
    reason = _why_no_cluster()
    if reason:
        pytest.skip(reason)
    # Short path: the munge and MariaDB sockets live in it (Unix socket paths are limited).
    state = Path(tempfile.mkdtemp(prefix="prvr-slurm-", dir="/tmp"))
    env = {
        **os.environ,
        "PRVR_SLURM_DIR": str(state),
        "PRVR_SLURM_PORT": str(_free_port_base()),
        # More CPUs and GPUs than the machine has: independent jobs overlap their start-up.
        "PRVR_SLURM_CPUS": "8",
        "PRVR_SLURM_GPUS": "4",
    }
    env.pop("SLURM_CONF", None)
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=START_TIMEOUT
        )
        if proc.returncode != 0:
            logs = "\n".join(f"--- {p.name}\n{_tail(p, 1500)}" for p in sorted((state / "log").glob("*")))
            pytest.fail(f"local_cluster.sh start failed ({proc.returncode}):\n{proc.stderr}\n{logs}")
        print(f"cluster up in {time.monotonic() - t0:.1f} s: {proc.stderr.strip()}")
        yield state
    finally:
        stop = subprocess.run(
            ["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=STOP_TIMEOUT
        )
        leftover = subprocess.run(
            ["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=60
        ).stdout
        shutil.rmtree(state, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr
        assert "running" not in leftover, leftover


def copy_checkout(dest: Path) -> Path:
    """The repo's tracked and untracked-but-not-ignored files (no results/, no .venv)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


# --- comparing two runs' outputs -----------------------------------------------------------


def _zarr_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_dir() and (p / "zarr.json").is_file() and p.suffix == ".zarr")


def _compare_zarr(a: Path, b: Path, problems: list[str]) -> None:
    import warnings

    import zarr

    with warnings.catch_warnings():  # Snakemake's .snakemake_timestamp inside directory() outputs
        warnings.simplefilter("ignore")
        ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
        _walk_zarr(ga, gb, str(a), problems)


VOLATILE_ATTRS = ("store_uid", "sources")  # per-write identities (new uuid on every write)


def _stable_attrs(attrs) -> dict:
    return {k: v for k, v in dict(attrs).items() if k not in VOLATILE_ATTRS}


def _walk_zarr(ga, gb, where: str, problems: list[str]) -> None:
    import zarr

    if _stable_attrs(ga.attrs) != _stable_attrs(gb.attrs):
        problems.append(f"{where}: attributes differ")
    ka, kb = sorted(ga.keys()), sorted(gb.keys())
    if ka != kb:
        problems.append(f"{where}: members {ka} != {kb}")
        return
    for k in ka:
        u, v = ga[k], gb[k]
        if isinstance(u, zarr.Group):
            _walk_zarr(u, v, f"{where}/{k}", problems)
        elif u.shape != v.shape or u.dtype != v.dtype or not np.array_equal(u[...], v[...]):
            problems.append(f"{where}/{k}: values differ")
        elif dict(u.attrs) != dict(v.attrs):
            problems.append(f"{where}/{k}: attributes differ")


def _drop_timing(obj):
    if isinstance(obj, dict):
        return {k: _drop_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_drop_timing(v) for v in obj]
    return obj


def compare_results(a: Path, b: Path) -> tuple[list[str], int]:
    """Differences between two results/ trees; and how many files were compared."""
    problems: list[str] = []
    stores_a = {p.relative_to(a) for p in _zarr_dirs(a)}
    stores_b = {p.relative_to(b) for p in _zarr_dirs(b)}
    if stores_a != stores_b:
        problems.append(f"feature stores differ: {sorted(map(str, stores_a ^ stores_b))}")
    for rel in sorted(stores_a & stores_b):
        _compare_zarr(a / rel, b / rel, problems)

    def plain_files(root):
        return {
            p.relative_to(root)
            for p in root.rglob("*")
            if p.is_file() and p.name != ".snakemake_timestamp" and not any(q.suffix == ".zarr" for q in p.parents)
        }

    files_a, files_b = plain_files(a), plain_files(b)
    if files_a != files_b:
        problems.append(f"files differ: {sorted(map(str, files_a ^ files_b))}")
    for rel in sorted(files_a & files_b):
        fa, fb = a / rel, b / rel
        if fa.read_bytes() == fb.read_bytes():
            continue
        if rel.suffix == ".json" and _drop_timing(json.loads(fa.read_text())) == _drop_timing(
            json.loads(fb.read_text())
        ):
            continue
        if rel.name == "log.csv" and _csv_without_timing(fa) == _csv_without_timing(fb):
            continue
        if rel.suffix == ".md" and _md_without_timing(fa) == _md_without_timing(fb):
            continue
        if rel.suffix == ".pt" and _same_checkpoint(fa, fb):
            continue
        if rel.suffix == ".safetensors" and _same_safetensors(fa, fb):
            continue
        problems.append(f"{rel}: content differs")
    return problems, len(stores_a) + len(files_a)


def _same_checkpoint(a: Path, b: Path) -> bool:
    """Two torch checkpoints (our own files) hold equal values, timing fields aside."""
    import torch

    def same(x, y) -> bool:
        if isinstance(x, dict):
            keys = set(x) - TIMING_KEYS
            return isinstance(y, dict) and keys == set(y) - TIMING_KEYS and all(same(x[k], y[k]) for k in keys)
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(map(same, x, y))
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, np.ndarray):
            return isinstance(y, np.ndarray) and np.array_equal(x, y)
        return x == y

    return same(torch.load(a, weights_only=False), torch.load(b, weights_only=False))


def _same_safetensors(a: Path, b: Path) -> bool:
    """Same tensors and metadata (the header's metadata order is a Rust HashMap's: random)."""
    from safetensors import safe_open

    with safe_open(a, "np") as fa, safe_open(b, "np") as fb:
        if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(np.array_equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def _csv_without_timing(path: Path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    keep = [i for i, h in enumerate(rows[0]) if h not in TIMING_KEYS]
    return [[r[i] for i in keep] for r in rows]


def _md_without_timing(path: Path) -> list[str]:
    """A markdown report without its wall-time sections (a heading naming "time" to the next)."""
    out, skipping = [], False
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            skipping = "time" in line.lower()
        if not skipping:
            out.append(line)
    return out


def test_compare_results_sees_a_changed_value(tmp_path):
    import zarr

    for side in ("a", "b"):
        g = zarr.open_group(str(tmp_path / side / "x.zarr"), mode="w")
        g.create_array("rows", data=np.arange(6, dtype="float32").reshape(3, 2))
        (tmp_path / side / "m.json").write_text(json.dumps({"R@1": 1.0, "seconds": 3.0 if side == "a" else 4.0}))
    assert compare_results(tmp_path / "a", tmp_path / "b") == ([], 2)
    g = zarr.open_group(str(tmp_path / "b" / "x.zarr"), mode="r+")
    g["rows"][1, 1] = np.nextafter(np.float32(3), np.float32(4))
    (tmp_path / "b" / "m.json").write_text(json.dumps({"R@1": 1.5, "seconds": 4.0}))
    problems, _ = compare_results(tmp_path / "a", tmp_path / "b")
    assert len(problems) == 2 and "values differ" in problems[0] and "m.json" in problems[1], problems


# --- the end-to-end test ------------------------------------------------------------------


def _sacct(state: Path) -> list[dict]:
    env = {**os.environ, "SLURM_CONF": str(state / "etc" / "slurm.conf")}
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-S", "now-1days", "-o", "JobID,State,Comment,AllocTRES"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    jobs = []
    for line in out.splitlines():
        jobid, st, comment, tres = line.split("|")
        if comment.startswith("rule_"):
            jobs.append({"id": jobid, "state": st, "rule": comment[5:].split("_wildcards")[0], "tres": tres})
    return jobs


@pytest.mark.slow
@pytest.mark.slurm
def test_cluster_run_equals_local_run(tmp_path, slurm_cluster):
    state = slurm_cluster
    # One copy of the code, then two identical working copies: local and cluster.
    src = copy_checkout(tmp_path / "src")
    (src / "tiny.yaml").write_text(yaml.safe_dump(copy.deepcopy(TINY), sort_keys=False))
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    shutil.copytree(src, local, symlinks=True)
    shutil.copytree(src, cluster, symlinks=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "SLURM_CONF": str(state / "etc" / "slurm.conf"),
    }
    smk = [sys.executable, "-m", "snakemake", "--configfile", "tiny.yaml"]

    cluster_cmd = [
        *smk,
        "--workflow-profile",
        "profiles/slurm",
        # A tiny run: poll Slurm every few seconds (the profile's default is 40 s), no account.
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-no-account",
    ]
    # Both runs at once: the local run computes while the cluster run waits on Slurm.
    t0 = time.monotonic()
    runs = [
        Bounded(cluster_cmd, cluster, env, tmp_path / "cluster.log"),
        Bounded([*smk, "--cores", "2"], local, env, tmp_path / "local.log"),
    ]
    try:
        rc_cluster, rc_local = Bounded.wait_all(runs, t0 + RUN_TIMEOUT)
    finally:
        for r in runs:
            r.kill()
    log = (tmp_path / "cluster.log").read_text(errors="replace")
    assert rc_local == 0, _tail(tmp_path / "local.log")
    assert rc_cluster == 0, log[-8000:]
    print(f"cluster run {runs[0].seconds:.0f} s, local run {runs[1].seconds:.0f} s (side by side)")

    # Every job of the workflow ran as a Slurm job and completed; model rules got a GPU.
    jobs = _sacct(state)
    assert jobs, "sacct lists no job of the run"
    assert all(j["state"] == "COMPLETED" for j in jobs), jobs
    submitted = log.count("has been submitted with SLURM jobid")
    ran_rules = {j["rule"] for j in jobs}
    assert "train" in ran_rules and "extract_shard" in ran_rules, ran_rules
    for j in jobs:
        has_gpu = "gres/gpu=1" in j["tres"]
        assert has_gpu == (j["rule"] in gpu_rules()), j
    assert submitted == len(jobs), f"{submitted} submissions, {len(jobs)} Slurm jobs"

    # The same outputs, value for value.
    problems, n = compare_results(local / "results", cluster / "results")
    assert n > 20, f"only {n} outputs compared"
    assert not problems, "\n".join(problems)
    metrics = json.loads((cluster / "results/tiny/eval/dldkdpp/test_metrics.json").read_text())
    assert "SumR" in json.dumps(metrics)
