"""The whole GPU check in one command, for a lent GPU machine that has torch but not this project's other
packages, and no network:

    python3 scripts/gpu_check.py --out DIR [--wheels .gpu-wheels] [--cpu] [--deadline-s 530]

Parts, in order, each in its own process with its own time budget (a slow part cannot eat the rest), all under
one overall deadline:
  install       the wheels from scripts/gpu_wheels.sh into a private folder (pip --target, no index, no deps),
                put first on PYTHONPATH for every later part; then datasets, pydantic and DeepSpeed must import
  environment   nvidia-smi, the Python, torch, CUDA, transformers, ... versions, the device
  tests         the `gpu` test tier (pytest -m gpu): each test's outcome and time, and the figures it measured
  bench         scripts/bench.py model on gpu-125m, gpu-350m and gpu-1b, torch.compile off and on: tokens/s,
                MFU, peak memory; the compiled 350m and 1b also write torch.profiler's top-kernel tables
DIR receives gpu_check.json (rewritten after every part, so a run cut short keeps what it measured),
tests.log, bench.log and the profiler tables. Exit code 0 when every part passed.

--cpu rehearses the same parts on a CPU (the tier with MINICOLOSSUS_GPU_TIER=cpu, benchmarks shrunk to a
layer of width 96), so that everything but the GPU itself is tried before a GPU is lent. Standard library only:
it runs before the wheels are installed.
"""

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUST_IMPORT = (
    "datasets",
    "datatrove",
    "pydantic",
)  # DeepSpeed is optional: its test skips when its wheel did not travel
# (config, compiled), most wanted first: the two models the MFU targets are about, compiled, then the rest
BENCHES = (
    ("gpu-350m", True),
    ("gpu-1b", True),
    ("gpu-350m", False),
    ("gpu-1b", False),
    ("gpu-125m", True),
    ("gpu-125m", False),
)
PROFILED = ("gpu-350m", "gpu-1b")  # their compiled runs also write the profiler's tables
# seconds: (on a GPU, on the CPU rehearsal)
BUDGETS = {
    "install": (60, 120),
    "environment": (40, 60),
    "tests": (270, 900),
    "bench eager": (30, 60),
    "bench compiled": (60, 150),
}
TEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
# The CPU rehearsal's benchmark: each config's code path at a size two cores run in seconds (flex has no
# backward on a CPU, so eager attention there). 96 wide: an even head size for 12 and 16 heads.
CPU_BENCH_SHRINK = [
    "--model.overrides.hidden_size=96",
    "--model.overrides.num_hidden_layers=1",
    "--model.overrides.intermediate_size=64",
    "--model.overrides.vocab_size=256",
    "--model.overrides.attn_backend=eager",
    "--batch",
    "1",
    "--seq-len",
    "32",
]
ENVIRONMENT = """
import importlib, json, platform, torch
versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
for name in ("transformers", "accelerate", "tokenizers", "datasets", "pydantic", "deepspeed", "triton", "numpy",
             "pyarrow"):
    try:
        versions[name] = importlib.import_module(name).__version__
    except Exception as error:
        versions[name] = f"not importable: {type(error).__name__}: {error}"[:200]
device = {"cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    properties = torch.cuda.get_device_properties(0)
    device.update(name=properties.name, multiprocessors=properties.multi_processor_count,
                  memory_gib=round(properties.total_memory / 2**30, 1), capability=list(torch.cuda.get_device_capability()),
                  nccl=".".join(map(str, torch.cuda.nccl.version())))
print(json.dumps({"versions": versions, "device": device}))
"""


class Check:
    """Runs the parts, keeps their results, and writes the report after each."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.deadline_s
        # offline: a GPU machine may have no network, and a library that tries the hub would wait for its timeouts
        self.env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        if args.cpu:
            self.env["MINICOLOSSUS_GPU_TIER"] = "cpu"
        self.report = {
            "mode": "cpu rehearsal" if args.cpu else "gpu",
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "parts": {},
        }

    def budget(self, part: str) -> float:
        return min(BUDGETS[part][self.args.cpu], max(0.0, self.deadline - time.monotonic()))

    def run(self, part: str, command: list[str], log: Path | None = None, **env: str) -> dict:
        """One child process under the part's budget: exit code, seconds, and its output (to `log` if given)."""
        budget, start = self.budget(part), time.monotonic()
        if budget < 5:
            return {"ok": False, "error": "skipped: the overall deadline has passed", "seconds": 0, "stdout": ""}
        child = subprocess.Popen(
            command, cwd=REPO, env={**self.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            stdout, stderr = child.communicate(timeout=budget)
            code = child.returncode
        except subprocess.TimeoutExpired:
            # everything it started goes too (torchrun's ranks run in sessions of their own, compile workers):
            # left running, they would hold the GPU through the parts after it
            for pid in [*descendants(child.pid), child.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            code = None
        result = {
            "ok": code == 0,
            "exit_code": code,
            "seconds": round(time.monotonic() - start, 1),
            "budget_s": round(budget),
        }
        if code is None:
            result["error"] = f"over its budget of {budget:.0f} s"
        if log is not None:
            with log.open("a") as file:
                file.write(f"$ {' '.join(command)}\n{stdout}{stderr}\n")
        elif code != 0:
            result["output_tail"] = (stdout + stderr)[-3000:]
        result["stdout"] = stdout
        return result

    def save(self, part: str, result: dict, done: dict | None = None) -> None:
        """Record the part's result, rewrite the report, and say how `done` (the part, or its latest run) went."""
        result.pop("stdout", None)
        self.report["parts"][part] = result
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2) + "\n")
        done = done or result
        status = "ok" if "error" not in done and done.get("ok", True) else f"FAILED: {done.get('error', '')}"
        print(f"{done.get('name', part)}: {status} ({done.get('seconds', 0)} s)", flush=True)

    def install(self) -> None:
        wheels = sorted(Path(self.args.wheels).glob("*.whl")) if self.args.wheels else []
        result = {"ok": True, "wheels": [wheel.name for wheel in wheels]}
        if wheels:
            site = Path(self.args.site)
            result = {
                **self.run(
                    "install",
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--no-index",
                        "--no-deps",
                        "--no-compile",
                        "--no-cache-dir",
                        "--upgrade",
                        "--target",
                        str(site),
                        *map(str, wheels),
                    ],
                ),
                "wheels": result["wheels"],
            }
            self.env["PYTHONPATH"] = os.pathsep.join([str(site), self.env["PYTHONPATH"]])
        if result["ok"]:
            imported = self.run("install", [sys.executable, "-c", f"import {', '.join(MUST_IMPORT)}"])
            if not imported["ok"]:
                result.update(
                    ok=False,
                    output_tail=imported.get("output_tail", ""),
                    error=f"{', '.join(MUST_IMPORT)} do not all import: make the wheels with "
                    f"scripts/gpu_wheels.sh and pass their folder as --wheels",
                )
        self.save("install", result)

    def environment(self) -> bool:
        result = self.run("environment", [sys.executable, "-c", ENVIRONMENT])
        if result["ok"]:
            result.update(json.loads(result["stdout"].strip().splitlines()[-1]))
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            result["nvidia_smi"] = smi.stdout.splitlines()
        except (OSError, subprocess.TimeoutExpired) as error:
            result["nvidia_smi"] = f"not run: {error}"
        print("\n".join(result["nvidia_smi"]) if isinstance(result["nvidia_smi"], list) else result["nvidia_smi"])
        print(json.dumps({key: result.get(key) for key in ("versions", "device")}))
        has_cuda = result.get("device", {}).get("cuda_available", False)
        if not self.args.cpu and not has_cuda:
            result.update(ok=False, error="no CUDA device is visible: run on a GPU machine, or with --cpu")
        self.save("environment", result)
        return result["ok"]

    def tests(self) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            figures = Path(scratch) / "figures.jsonl"
            # -v: a line per test as it ends, so a tier cut short by its budget still says how far it got
            result = self.run(
                "tests",
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-m",
                    "gpu",
                    "-v",
                    "-p",
                    "no:cacheprovider",
                    "--durations=0",
                    "--durations-min=1",
                    "tests",
                ],
                log=self.out / "tests.log",
                MINICOLOSSUS_GPU_REPORT=str(figures),
            )
            result["tests"] = [
                {"test": match[1], "outcome": match[2].lower()}
                for match in map(TEST_LINE.match, result["stdout"].splitlines())
                if match
            ]
            result["figures"] = (
                [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
            )
        outcomes = [test["outcome"] for test in result["tests"]]
        result["summary"] = {outcome: outcomes.count(outcome) for outcome in sorted(set(outcomes))}
        result["ok"] = result["ok"] and bool(outcomes)  # pytest's exit 5 (nothing collected) is a failure too
        self.save("tests", result)

    def bench(self) -> None:
        rows, ok, start = [], True, time.monotonic()
        for config, compiled in BENCHES:
            command = [
                sys.executable,
                "scripts/bench.py",
                "model",
                "--config",
                f"configs/{config}.toml",
                f"--parallel.compile={'true' if compiled else 'false'}",
                "--json",
            ]
            command += (
                [*CPU_BENCH_SHRINK, "--steps", "1", "--warmup", "1"]
                if self.args.cpu
                else ["--steps", "10", "--warmup", "3"]
            )
            if compiled and config in PROFILED:
                command += ["--profile", str(self.out / f"profile-{config}.txt")]
            result = self.run("bench compiled" if compiled else "bench eager", command, log=self.out / "bench.log")
            row = {"name": f"bench {config} compile={compiled}", "seconds": result.get("seconds")}
            if result["ok"]:
                row.update(json.loads(result["stdout"].strip().splitlines()[-1]))
            else:
                row["error"] = result.get("error") or f"exit code {result['exit_code']} (see bench.log)"
            ok = ok and result["ok"]
            rows.append(row)
            self.save("bench", {"ok": ok, "seconds": round(time.monotonic() - start, 1), "rows": rows}, done=row)


def descendants(pid: int) -> list[int]:
    """The processes under `pid`, children first, read from /proc (Linux) while they are alive."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command)", which may hold spaces
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = [child for parent in frontier for child in parents.get(parent, [])]
        found += children
        frontier = children
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, the logs and profiles")
    parser.add_argument("--wheels", default=".gpu-wheels", help="folder of wheels from scripts/gpu_wheels.sh")
    parser.add_argument(
        "--site",
        default=str(Path(tempfile.gettempdir()) / "minicolossus-site"),
        help="private folder the wheels are installed into",
    )
    parser.add_argument("--cpu", action="store_true", help="rehearse every part on a CPU, at tiny sizes")
    parser.add_argument("--deadline-s", type=float, default=530, help="overall time limit (default 530)")
    args = parser.parse_args(argv)
    if args.wheels and Path(args.wheels).exists() and not Path(args.wheels).is_dir():
        print(f"error: --wheels {args.wheels}: not a folder; make one with scripts/gpu_wheels.sh", file=sys.stderr)
        return 2
    check = Check(args)
    check.install()
    if check.environment():
        check.tests()
        check.bench()
    parts = check.report["parts"]
    print(f"report: {check.out / 'gpu_check.json'}")
    return 0 if all(part.get("ok") for part in parts.values()) and "bench" in parts else 1


if __name__ == "__main__":
    sys.exit(main())
