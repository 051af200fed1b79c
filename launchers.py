"""Where sweep.py's runs train: train.py subprocesses on this machine (`LocalLauncher`), or Ray tasks
on a cluster (`RayLauncher`). Both have has_room(), start(run, arguments) -> handle,
wait(timeout) -> [(handle, exit status, seconds)] and shutdown().
"""
import logging
import os
import subprocess
import sys
import time

import torch


def launch(arguments, log_path, env=None):
    """Start `python train.py ...` with its output appended to `log_path`. -> the process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ python {' '.join(arguments)}\n")
        log.flush()
        # The child keeps its own copy of the file; ours closes when the `with` ends.
        return subprocess.Popen([sys.executable, *arguments], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)


def train_to_end(arguments, log_path):
    """One attempt as a Ray task, on whichever node Ray picks, on the GPUs that Ray gave it in
    CUDA_VISIBLE_DEVICES. -> (exit status, seconds)."""
    start = time.monotonic()
    return launch(arguments, log_path, render_on_own_gpu(dict(os.environ))).wait(), time.monotonic() - start


def render_on_own_gpu(env):
    """`env` with MUJOCO_EGL_DEVICE_ID set to its first CUDA_VISIBLE_DEVICES id. EGL ignores
    CUDA_VISIBLE_DEVICES: without it every run renders on GPU 0. EGL numbers the GPUs as the
    driver does, which a GPU named by its UUID does not tell, so then nothing is set."""
    first = env.get("CUDA_VISIBLE_DEVICES", "").split(",")[0]
    return {**env, "MUJOCO_EGL_DEVICE_ID": first} if first.isdigit() else env


def visible_gpus():
    """The ids of this machine's GPUs as CUDA_VISIBLE_DEVICES names them (it may already select some)."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",")[:count] if listed else [str(i) for i in range(count)]


def local_slots(workers, runs_per_gpu, use_gpus):
    """The environment additions of the runs that may train at once: `runs_per_gpu` per GPU, each
    seeing only its GPU, or `workers` runs on the CPU (seeing no GPU)."""
    gpus = visible_gpus() if use_gpus else []
    devices = [gpu for gpu in gpus for _ in range(runs_per_gpu)] or [""] * workers
    # torch uses every core by default; N runs each doing so oversubscribe the CPU. So split them.
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
    return [render_on_own_gpu({"CUDA_VISIBLE_DEVICES": device, "OMP_NUM_THREADS": threads})
            for device in devices]


class LocalLauncher:
    """train.py subprocesses on this machine, one per free slot."""

    def __init__(self, slots):
        self.free = list(slots)
        self.live = {}  # process -> (slot, start time)

    def describe(self):
        gpus = ",".join(dict.fromkeys(slot["CUDA_VISIBLE_DEVICES"] for slot in self.free))
        return (f"local: {len(self.free)} at a time on {f'GPUs {gpus}' if gpus else 'the CPU'}, "
                f"OMP_NUM_THREADS={self.free[0]['OMP_NUM_THREADS']}")

    def has_room(self):
        return bool(self.free)

    def start(self, run, arguments):
        slot = self.free.pop()
        process = launch(arguments, run.log, {**os.environ, **slot})
        self.live[process] = (slot, time.monotonic())
        return process

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        while not (done := [p for p in self.live if p.poll() is not None]) and time.monotonic() < deadline:
            time.sleep(0.2)
        results = []
        for process in done:
            slot, start = self.live.pop(process)
            self.free.append(slot)
            results.append((process, process.returncode, time.monotonic() - start))
        return results

    def shutdown(self):
        """Stop what still runs (after Ctrl-C); a later sweep resumes it from its checkpoint."""
        for process in self.live:
            process.terminate()
        for process in self.live:
            process.wait()


class RayLauncher:
    """Each attempt a Ray task; Ray queues them until the cluster has the resources."""

    def __init__(self, address, num_cpus, cpus_per_run, gpus_per_run):
        import ray  # Only this mode needs Ray, and importing it takes seconds.
        self.ray = ray
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        if gpus_per_run is None:
            gpus_per_run = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
        # Ray must not retry on its own: the same command would be refused (--run-dir of a run).
        self.task = ray.remote(train_to_end).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run,
                                                     max_retries=0)
        self.request = f"{cpus_per_run:g} CPU and {gpus_per_run:g} GPU per run"
        self.pending = set()

    def describe(self):
        resources = self.ray.cluster_resources()
        return (f"Ray cluster with {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs, "
                f"{self.request}")

    def has_room(self):
        return True

    def start(self, run, arguments):
        ref = self.task.remote(arguments, run.log)
        self.pending.add(ref)
        return ref

    def wait(self, timeout):
        ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        results = []
        for ref in ready:
            self.pending.discard(ref)
            try:
                exit_status, seconds = self.ray.get(ref)
            except self.ray.exceptions.RayError as error:  # The worker or its node died, or launch failed.
                logging.warning("Ray: %s", str(error).strip().splitlines()[0])
                exit_status, seconds = None, 0.0
            results.append((ref, exit_status, seconds))
        return results

    def shutdown(self):
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.ray.shutdown()
