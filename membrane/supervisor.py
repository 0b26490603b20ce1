"""The local cluster's process supervisor: starts the plan in order, restarts what crashes.

It runs detached (``membrane up`` starts it) with the state directory's ``run/plan.json`` as
its program, writes ``run/processes.json`` so that ``membrane status`` can show what runs, and
on SIGTERM stops everything in reverse order and removes ``run/``; on SIGUSR1 it stops only the
node agents, for good, so that ``down`` deregisters their nodes while NATS still runs. Children
are told by the kernel to die with it (PR_SET_PDEATHSIG), so even a killed supervisor leaves
nothing behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from membrane.servers import terminate, wait_for_port
from membrane.state import Plan, ProcessSpec, ProcessState, StateDir

PR_SET_PDEATHSIG = 1
STABLE_AFTER = 30.0  # a process up this long has its restart backoff reset
STOP_TIMEOUT = 10.0


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    spec: ProcessSpec
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    backoff: float = 1.0
    held: bool = False

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen(
                self.spec.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.spec.env},
                preexec_fn=die_with_parent,
            )
        self.started_at = time.time()

    def state(self) -> ProcessState:
        running = self.process is not None and self.process.poll() is None
        return ProcessState(
            name=self.spec.name,
            pid=self.process.pid if self.process else 0,
            restarts=self.restarts,
            started_at=self.started_at,
            log=str(self.log_path),
            running=running,
            held=self.held,
        )


class Supervisor:
    def __init__(self, state: StateDir) -> None:
        self.state = state
        plan = msgspec.json.decode(state.plan_file.read_bytes(), type=Plan)
        state.logs.mkdir(parents=True, exist_ok=True)
        self.children = [Child(spec, state.logs / f"{spec.name}.log") for spec in plan.processes]
        self.stopping = False
        self.stop_agents = False  # SIGUSR1: stop the node agents, keep the rest running

    def say(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} supervisor: {message}", flush=True)

    def write_status(self) -> None:
        tmp = self.state.status_file.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode([c.state() for c in self.children]))
        tmp.replace(self.state.status_file)

    def start_all(self) -> None:
        for child in self.children:
            if self.stopping:
                return
            child.start()
            self.say(f"started {child.spec.name} (pid {child.process.pid if child.process else 0})")
            if child.spec.ready_port:
                wait_for_port(
                    child.spec.ready_host,
                    child.spec.ready_port,
                    child.spec.name,
                    timeout=30,
                    process=child.process,
                )
            self.write_status()

    def hold_agents(self) -> None:
        """Stop the node agents for good, so that ``down`` can deregister their nodes while
        NATS still runs (an agent stopped otherwise keeps its node: it comes back)."""
        for child in self.children:
            if child.spec.node and not child.held:
                child.held = True
                if child.process is not None:
                    terminate([child.process], STOP_TIMEOUT)
                    child.process = None
                self.say(f"stopped {child.spec.name} (held)")
        self.write_status()

    def watch(self) -> None:
        while not self.stopping:
            if self.stop_agents:
                self.hold_agents()
            now = time.time()
            changed = False
            for child in self.children:
                if child.held:
                    continue
                proc = child.process
                if proc is not None and proc.poll() is not None:
                    code = proc.returncode
                    child.process = None
                    if now - child.started_at > STABLE_AFTER:
                        child.backoff = 1.0
                    child.next_start = now + child.backoff
                    self.say(
                        f"{child.spec.name} exited with {code}; restarting in {child.backoff:.0f}s"
                    )
                    child.backoff = min(child.backoff * 2, 30.0)
                    changed = True
                if child.process is None and now >= child.next_start:
                    child.restarts += 1
                    child.start()
                    self.say(f"restarted {child.spec.name} (restart {child.restarts})")
                    changed = True
            if changed:
                self.write_status()
            time.sleep(0.2)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            proc = child.process
            if proc is None or proc.poll() is not None:
                continue
            terminate([proc], STOP_TIMEOUT)  # one at a time: services go before NATS and Redis
            self.say(f"stopped {child.spec.name}")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    state = StateDir(Path(args[0]))
    supervisor = Supervisor(state)

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stopping = True

    def on_usr1(signum: int, _frame: object) -> None:
        supervisor.stop_agents = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, on_usr1)
    state.pid_file.write_text(str(os.getpid()))
    try:
        supervisor.start_all()
        supervisor.watch()
    except Exception as exc:  # a failed start: say why, then clean up like a stop
        supervisor.say(f"error: {exc}")
        supervisor.stopping = True
        return_code = 1
    else:
        return_code = 0
    finally:
        supervisor.stop_all()
        shutil.rmtree(state.run, ignore_errors=True)
        supervisor.say("all processes stopped")
    return return_code


if __name__ == "__main__":
    raise SystemExit(main())
