#!/usr/bin/env python
"""e3fast's GPU benchmark: the fused ops and the U-Net training step, side by side, in one run.

    python benchmarks/gpu_bench.py --out gpu-results            # on a GPU, ~4 minutes
    python benchmarks/gpu_bench.py --device cpu --quick --out /tmp/smoke   # a smoke test of this script

Writes ``gpu_bench.json`` (the machine, the settings, every case with its parameters and what was
measured) and ``gpu_bench.md`` (tables) into ``--out``, both rewritten after every case.

What is measured (see :mod:`gpu_op_cases` and :mod:`gpu_unet_cases`): each fused op on every
e3fast backend usable on the device and torch's nearest plain op, forward and forward+backward,
float32 and bfloat16, both memory formats, with achieved bandwidth against the device's peak;
then the paper's U-Net training step (and inference) at 2x4x128^3 on each fast e3fast backend,
the e3nn reference composition and the plain U-Net eager and compiled, in fp32 and bf16 autocast.

Never hangs, never loses results: the measurements run in a worker process under a supervisor
(this script without ``--worker``). The worker stops starting cases at the deadline (the op
cases get ``--ops-share`` of the budget); the supervisor kills it shortly after the deadline if
it is still busy, or as soon as one case runs past its timeout (a hung kernel). A fatal device
error (an illegal memory access leaves the CUDA context unusable) ends the worker. After a fatal
error, a crash or a hang the supervisor starts a new worker, which resumes after the failed case
and skips the cases needing the same backend and op.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path[:0] = [str(ROOT), str(BENCHMARKS)]  # e3fast from this checkout, the gpu_* modules beside us

from gpu_bench_results import ResultsFile  # noqa: E402  (after the path set-up)

EXIT_NO_DEVICE = 2
EXIT_FATAL_DEVICE_ERROR = 3
MAX_WORKERS = 4  # the first worker and up to three restarts after fatal device errors
KILL_GRACE_SECONDS = 10  # how long past the deadline a busy worker may finish its case
WATCH_INTERVAL_SECONDS = 1.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MIN_WORKER_SECONDS = 15  # no restart with less time than this left
FATAL_ERROR_MARKERS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                       "misaligned address", "illegal instruction", "CUDA error: an illegal",
                       "CUBLAS_STATUS_EXECUTION_FAILED", "cudaErrorLaunchFailure")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-results", help="output folder (default: gpu-results)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions: a smoke test")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run, start-up included (default 240; --quick: 150)")
    parser.add_argument("--ops-share", type=float, default=0.3, help="share of the budget the fused ops may use")
    parser.add_argument("--only", choices=("ops", "unet"), default=None, help="run only these cases")
    parser.add_argument("--backends", default=None,
                        help="comma-separated e3fast backends to measure, of those usable on the device "
                        "(default: all; the reference backend is always kept, as the errors are measured against it)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled plain U-Net (default inductor; --quick: aot_eager)")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="float32 convolutions without TF32")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its algorithms (nnU-Net does; costs seconds per new shape)")
    parser.add_argument("--resume", action="store_true", help="keep the cases already in --out/gpu_bench.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # epoch seconds
    parser.add_argument("--ops-deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 150.0 if args.quick else 240.0
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.quick else "inductor"
    return args


def results_path(args) -> Path:
    return args.out / "gpu_bench.json"


# ====================================================================================== supervisor

def _worker_command(args, deadline: float, ops_deadline: float) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(args.out),
               "--device", args.device, "--compile-backend", args.compile_backend,
               "--deadline", repr(deadline), "--ops-deadline", repr(ops_deadline)]
    command += ["--quick"] * args.quick + ["--no-tf32"] * (not args.tf32)
    command += ["--cudnn-benchmark"] * args.cudnn_benchmark
    command += ["--only", args.only] if args.only else []
    command += ["--backends", args.backends] if args.backends else []
    return command


def _read_results(path: Path) -> ResultsFile | None:
    try:
        return ResultsFile(path)
    except (OSError, ValueError):  # not written yet
        return None


class Terminated(Exception):
    """The supervisor was asked to stop (SIGTERM): it stops its worker and writes what it has."""


def _raise_terminated(signal_number, frame):
    raise Terminated(signal.Signals(signal_number).name)


def _die_with_parent() -> None:
    """Run in the worker before it starts: the kernel kills it when the supervisor dies (Linux)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the supervisor's own clean-up has to do
        pass


def _run_worker(command: list[str], path: Path, deadline: float) -> tuple[int | None, str | None]:
    """Run a worker; kill it at ``deadline + KILL_GRACE_SECONDS`` or when its case runs past the
    case's timeout. Returns ``(exit code, None)`` or ``(None, why it was killed)``."""
    worker = subprocess.Popen(command, preexec_fn=_die_with_parent)
    try:
        while worker.poll() is None:
            time.sleep(WATCH_INTERVAL_SECONDS)
            killed_because = None
            if time.time() > deadline + KILL_GRACE_SECONDS:
                killed_because = "killed at the deadline while running it"
            else:
                results = _read_results(path)
                overdue = results.overdue_case(time.time()) if results else None
                if overdue:
                    killed_because = f"killed: still running after {overdue[1]:.0f} s (hung?)"
            if killed_because:
                return None, killed_because
        return worker.returncode, None
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def _interruption(exit_code: int | None, killed_because: str | None) -> str:
    if killed_because:
        return killed_because
    if exit_code == EXIT_FATAL_DEVICE_ERROR:
        return "fatal device error"
    if exit_code == EXIT_NO_DEVICE:
        return "no device to run on"
    return f"the worker died (exit code {exit_code})"


def _supervise_workers(args, path: Path, deadline: float, ops_deadline: float) -> str | None:
    """Start workers until one finishes the plan; returns why the run stopped early (None: it did not)."""
    for _ in range(MAX_WORKERS):
        if deadline - time.time() < MIN_WORKER_SECONDS:
            return "deadline"
        began, recorded = time.time(), len(ResultsFile(path).data["results"])
        exit_code, killed_because = _run_worker(_worker_command(args, deadline, ops_deadline), path, deadline)
        results = ResultsFile(path)
        results.note_attempt(exit_code, time.time() - began)
        if exit_code == 0:
            results.save()
            return None
        had_case_in_progress = results.data.get("in_progress") is not None
        why = _interruption(exit_code, killed_because)
        results.settle_interrupted(why, "killed" if killed_because else "crashed")
        results.save()
        print(f"gpu_bench: worker ended: {why}", flush=True)
        if time.time() > deadline:
            return "deadline"
        if exit_code == EXIT_NO_DEVICE:
            return results.data.get("stop_reason") or "no device"
        if len(results.data["results"]) == recorded and not had_case_in_progress:
            return f"the worker failed before any case (exit code {exit_code}); see the log"
    return "restarts exhausted"


def supervise(args) -> int:
    """Run workers until the plan is done, the deadline passes or restarts run out."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args)
    if not args.resume:
        for stale in (path, path.with_suffix(".md")):
            stale.unlink(missing_ok=True)
    start = time.time()
    deadline, ops_deadline = start + args.budget, start + args.ops_share * args.budget
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        stop_reason = _supervise_workers(args, path, deadline, ops_deadline)
    except (Terminated, KeyboardInterrupt) as stop:
        stop_reason = f"stopped from outside ({stop if isinstance(stop, Terminated) else 'SIGINT'})"
        results = ResultsFile(path)
        results.settle_interrupted(stop_reason, "killed")
        results.save()
    results = ResultsFile(path)
    results.finalize(stop_reason)
    print(f"gpu_bench: wrote {path} and {path.with_suffix('.md')}", flush=True)
    return 0 if results.data.get("finished") else 1


# ====================================================================================== worker

class GroupCache:
    """The state of the current case group: made by the group's first case, dropped at the next group.
    A setup that failed fails the group's later cases the same way without being retried."""

    def __init__(self):
        self.group, self.state, self.failure = None, None, None

    def state_for(self, case):
        if case.group != self.group:
            self.group, self.state, self.failure = case.group, None, None
            gc.collect()
            try:
                self.state = case.setup()
            except Exception as error:  # noqa: BLE001 -- recorded per case
                self.failure = GroupSetupError(f"setup of {case.group} failed: {type(error).__name__}: {error}",
                                               oom=_is_out_of_memory(error), fatal=_is_fatal(error))
        if self.failure is not None:
            raise self.failure
        return self.state


class GroupSetupError(RuntimeError):
    def __init__(self, message: str, oom: bool, fatal: bool):
        super().__init__(message)
        self.oom, self.fatal = oom, fatal


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or getattr(error, "oom", False)


def _is_fatal(error: BaseException) -> bool:
    """Errors after which the CUDA context cannot be trusted (the worker must be replaced)."""
    import torch

    if getattr(error, "fatal", False):
        return True
    if isinstance(error, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return any(marker in str(error) for marker in FATAL_ERROR_MARKERS)


def failure_record(error: BaseException) -> dict:
    status = "oom" if _is_out_of_memory(error) else "error"
    return {"status": status, "error": f"{type(error).__name__}: {error}"[:2000], "fatal": _is_fatal(error)}


def _release_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _skip_reason(case, results: ResultsFile, deadline_of) -> str | None:
    broken = results.poisoned_need(case.needs)
    if broken:
        return f"skipped: an earlier fatal device error, crash or hang broke {broken}"
    seconds_left = deadline_of(case.section) - time.monotonic()
    if seconds_left < case.min_seconds:
        return f"no time left in the {case.section} budget ({seconds_left:.0f} s left, {case.min_seconds:.0f} s needed)"
    return None


def _summary_line(case_id: str, outcome: dict) -> str:
    if outcome.get("status") != "ok":
        return f"  {outcome.get('status')}: {outcome.get('reason') or outcome.get('error')}"[:400]
    extras = [f"median {outcome['median_ms']:.3f} ms" if outcome.get("median_ms") else "no timed repetition"]
    if outcome.get("gbps"):
        extras.append(f"{outcome['gbps']:.3g} GB/s")
    for key in ("max_rel_err_vs_reference", "rel_err_vs_e3nn"):
        if outcome.get(key) is not None:
            extras.append(f"{key} {outcome[key]:.2g}")
    return "  ok: " + ", ".join(extras)


def run_plan(plan, results: ResultsFile, deadline_of, device) -> int:
    """Run the cases not yet recorded; 0 when done, EXIT_FATAL_DEVICE_ERROR after a fatal error."""
    import torch

    groups = GroupCache()
    began = time.monotonic()
    for case in plan:
        if results.has(case.id):
            continue
        reason = _skip_reason(case, results, deadline_of)
        if reason:
            results.record(case.id, {"status": "skipped", "reason": reason})
            print(f"[{time.monotonic() - began:6.1f} s] {case.id}: {reason}", flush=True)
            continue
        print(f"[{time.monotonic() - began:6.1f} s] {case.id}", flush=True)
        results.start(case.id)
        try:
            outcome = case.run(groups.state_for(case))
        except Exception as error:  # noqa: BLE001 -- every failure is a result
            traceback.print_exc()  # into the log; the record keeps the message
            outcome = failure_record(error)
        results.record(case.id, outcome)
        print(_summary_line(case.id, outcome), flush=True)
        if outcome.get("fatal"):
            results.poison(case.needs)
            results.save()
            return EXIT_FATAL_DEVICE_ERROR
        if case.params.get("compiled"):
            torch._dynamo.reset()
        _release_memory(device)
    results.data["finished"] = True
    results.data["stop_reason"] = None
    results.save()
    return 0


def _monotonic(epoch_seconds: float) -> float:
    return time.monotonic() + (epoch_seconds - time.time())


def build_plan(args, settings, backends: list[str], peak_gbps, deadline_of) -> list:
    from gpu_op_cases import op_cases
    from gpu_unet_cases import unet_cases

    plan = []
    if args.only in (None, "ops"):
        plan += op_cases(settings, backends, peak_gbps, deadline_of)
    if args.only in (None, "unet"):
        plan += unet_cases(settings, backends, deadline_of)
    return plan


def chosen_backends(usable: list[str], wanted: str | None) -> list[str]:
    """The usable backends named in ``wanted`` (all if None), the reference backend always among them."""
    if not wanted:
        return usable
    names = {name.strip() for name in wanted.split(",") if name.strip()} | {"reference"}
    return [backend for backend in usable if backend in names]


def run_worker(args) -> int:
    import torch

    import e3fast
    from gpu_case import Settings
    from gpu_machine import machine_info, peak_bandwidth_gbps

    results = ResultsFile(results_path(args))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        results.data["stop_reason"] = "no CUDA device visible to torch"
        results.save()
        print("gpu_bench: no CUDA device visible to torch (use --device cpu for a smoke test)", flush=True)
        return EXIT_NO_DEVICE
    make_settings = Settings.quick if args.quick else Settings.full
    settings = make_settings(device, compile_backend=args.compile_backend, tf32=args.tf32,
                             cudnn_benchmark=args.cudnn_benchmark)
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    if "machine" not in results.data:
        results.data["machine"] = machine_info(device, ROOT)
    results.data["settings"] = settings.as_record()
    results.data["backends"] = backends = chosen_backends(e3fast.available_backends(device), args.backends)
    peak_gbps, _ = peak_bandwidth_gbps(device)
    deadline = _monotonic(args.deadline) if args.deadline else time.monotonic() + args.budget
    ops_deadline = _monotonic(args.ops_deadline) if args.ops_deadline else deadline

    def deadline_of(section: str) -> float:
        return min(ops_deadline, deadline) if section == "ops" else deadline

    plan = build_plan(args, settings, backends, peak_gbps, deadline_of)
    if not results.data["plan"]:
        results.set_plan(plan)
    return run_plan(plan, results, deadline_of, device)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_worker(args) if args.worker else supervise(args)


if __name__ == "__main__":
    sys.exit(main())
