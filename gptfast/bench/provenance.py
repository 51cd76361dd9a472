"""Where a benchmark number came from: device, driver, library versions, commit, command.

Every result file embeds `collect()`. It holds no host name.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

# The keys every provenance dict has (values may be None where a fact is unknown, e.g. no GPU).
KEYS = (
    "device",
    "device_kind",
    "gpu_name",
    "gpu_count",
    "driver_version",
    "cuda_version",
    "cpu_model",
    "cpu_count",
    "torch_threads",
    "python",
    "torch",
    "triton",
    "transformers",
    "numpy",
    "platform",
    "load_avg",
    "date_utc",
    "git_commit",
    "git_dirty",
    "command",
)


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """stdout of `cmd`, stripped, or None when it cannot run or fails."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(module: str) -> str | None:
    """The version of an installed package, found without importing it."""
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _repo_root() -> Path | None:
    """The git work tree holding this package, else the one holding the current directory."""
    for start in (Path(__file__).resolve().parent, Path.cwd()):
        root = _run(["git", "rev-parse", "--show-toplevel"], cwd=start)
        if root:
            return Path(root)
    return None


def _git() -> tuple[str | None, bool | None]:
    root = _repo_root()
    if root is None:
        # A copy of the tree without .git (as sent to a GPU machine): the caller says which
        # commit it is (see benchmarks/gpu_check.sh).
        commit = os.environ.get("GPTFAST_GIT_COMMIT") or None
        dirty = os.environ.get("GPTFAST_GIT_DIRTY")
        return commit, (dirty not in ("0", "false", "") if dirty is not None else None)
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    # --no-optional-locks: never take index.lock, other people may be committing in this tree.
    status = _run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return commit, (bool(status) if status is not None else None)


def _gpu() -> dict:
    """GPU facts from torch (if CUDA is usable) and nvidia-smi (driver version)."""
    facts = dict(gpu_name=None, gpu_count=0, driver_version=None, cuda_version=None)
    torch = sys.modules.get("torch")
    if torch is None:
        import torch
    facts["cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
        facts["gpu_count"] = torch.cuda.device_count()
        facts["gpu_name"] = torch.cuda.get_device_name(0)
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    if smi:
        name, _, driver = smi.splitlines()[0].partition(",")
        facts["driver_version"] = driver.strip() or None
        facts["gpu_name"] = facts["gpu_name"] or name.strip()
    return facts


def _command_line() -> str:
    """This process's command line as typed: `python -m pkg ...` for a package run with -m."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    head = [f"python -m {script.parent.name}"] if script.name == "__main__.py" else [script.name]
    return " ".join(head + [shlex.quote(a) for a in sys.argv[1:]])


def collect(command: str | None = None, *, device: str | None = None) -> dict:
    """Facts about this run for a result file.

    Parameters
    ----------
    command : str, optional
        The exact command line; default: this process's `sys.argv`, shell-quoted.
    device : str, optional
        The device the numbers were measured on ("cuda", "cuda:1", "cpu"); default "cuda" when
        torch sees a GPU, else "cpu". `device` names the GPU or the CPU model accordingly.

    Returns
    -------
    dict
        One value per name in `KEYS`; unknown facts are None. No host name.

    Examples
    --------
    >>> facts = collect("gptfast bench --quick")
    >>> facts["command"]
    'gptfast bench --quick'
    """
    facts = _gpu()
    if device is None:
        device = "cuda" if facts["gpu_count"] else "cpu"
    device_kind = device.split(":")[0]
    if command is None:
        command = _command_line()
    commit, dirty = _git()
    cpu_model = _cpu_model()
    facts.update(
        device=(facts["gpu_name"] if device_kind == "cuda" else cpu_model) or device,
        device_kind=device_kind,
        cpu_model=cpu_model,
        cpu_count=os.cpu_count(),
        # CPU timings depend on it as much as on the load: a tiny op with 2 threads on a busy
        # machine can take 1000x its quiet single-thread time
        torch_threads=sys.modules["torch"].get_num_threads(),
        python=platform.python_version(),
        torch=_version("torch"),
        triton=_version("triton"),
        transformers=_version("transformers"),
        numpy=_version("numpy"),
        platform=f"{platform.system()} {platform.machine()}",
        load_avg=load_average(),
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=commit,
        git_dirty=dirty,
        command=command,
    )
    return {key: facts[key] for key in KEYS}


def load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (None where the OS has none): a busy shared
    machine explains noisy CPU numbers."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_note(facts: dict) -> str:
    """One line on how busy the machine was: load per CPU and torch's thread count."""
    load = facts.get("load_avg")
    cpus = facts.get("cpu_count")
    text = f"torch threads {facts.get('torch_threads')}, {cpus} CPUs"
    if load:
        text += f", load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)"
        if cpus and load[0] > 0.75 * cpus:
            text += ": the machine is busy, CPU timings are noisy"
    return text


def device_slug(facts: dict) -> str:
    """A short file-name-safe name for the measured device: "nvidia-h100-80gb-hbm3", "cpu"."""
    if facts.get("device_kind") != "cuda":
        return "cpu"
    name = str(facts.get("device") or "cuda").lower()
    slug = "".join(c if c.isalnum() else "-" for c in name)
    return "-".join(part for part in slug.split("-") if part) or "cuda"
