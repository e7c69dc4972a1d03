#!/usr/bin/env python3
"""A one-machine stand-in for the SLURM commands snakemake-executor-plugin-slurm calls.

Each command in this folder (``sbatch``, ``sacct``, ...) is a small shell wrapper that runs
``fake_slurm.py <command> ARGS``. Every call is appended to the JSON-lines file named by
``$FAKE_SLURM_LOG`` (one object per line: ``cmd``, ``argv``, ``time``; for ``sbatch`` also
the ``job_id``, the job ``script`` and the ``cwd``, for ``srun`` the ``job_id`` it ran in).
The same file holds the jobs' ``start`` and ``end`` events, so it is also the fake
cluster's whole state. Only the standard library is used.

What each command does, in the formats the plugin (2.x) parses:

- ``sbatch --parsable ... --wrap="CMD"`` (or a script file / ``/dev/stdin``): takes the next
  job id (1001, 1002, ...), prints it, and runs the script in the background in a new
  session, in the ``-D`` folder, with ``--output`` (``%j`` replaced) as stdout and stderr and
  the SLURM variables a batch job sees (``SLURM_JOB_ID``, ``SLURM_GPUS`` for ``--gpus``, ...).
  The job's state is PENDING, RUNNING, then COMPLETED (exit code 0) or FAILED; CANCELLED
  after ``scancel``. With ``FAKE_SLURM_SYNC=1`` sbatch returns only when the job has ended,
  so a test need not wait for the plugin's status checks (which back off by 10 s a check
  while nothing finishes).
- ``sacct``: one line per recorded job matching ``--name`` / ``-j``, with the ``--format``
  (``-o``) fields (JobIdRaw, JobID, State, ExitCode, Reason, NodeList, Account, Partition,
  JobName, Comment), ``|``-separated with ``--parsable2``. Steps (``-j 1001.0``) do not exist.
- ``squeue``: the same jobs, ``--format`` with ``%i`` (id), ``%T`` (state), ``%j`` (name).
- ``scancel ID...``: SIGTERM to the job's process group (as a time limit would).
- ``srun [options] CMD...``: runs CMD in place (no GPUs are bound); with several tasks
  (``--nodes=N --ntasks-per-node=1``, ``--ntasks``) one copy per task at once, each with its
  ``SLURM_PROCID`` / ``SLURM_NODEID``, all on this machine.
- ``sinfo -o %P``: the partitions in ``$FAKE_SLURM_PARTITIONS`` (default ``cpu*,gpu``; ``*``
  marks the default).
- ``sacctmgr`` / ``sshare``: the accounts in ``$FAKE_SLURM_ACCOUNTS`` (default ``test``), one a
  line, so the plugin's account check accepts those and rejects others.
- ``scontrol show config``: ``MinJobAge`` (300 s, SLURM's default) and ``MaxArraySize``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FIRST_JOB_ID = 1001
# Options that take their value as the next argument, per command (all others are flags, or
# carry their value after '=' or attached, as in -n1).
SUBMIT_VALUES = {
    "-A", "--account", "-p", "--partition", "-t", "--time", "-D", "--chdir", "-J",
    "--job-name", "-o", "--output", "-e", "--error", "--comment", "--mem", "--mem-per-cpu",
    "--mem-per-gpu", "-C", "--constraint", "--clusters", "-M", "--qos", "-n", "--ntasks",
    "-N", "--nodes", "-c", "--cpus-per-task", "--cpus-per-gpu", "-G", "--gpus", "--gres",
    "--jobid", "--wrap", "--array", "-a", "--exclude", "-x", "--reservation", "--signal",
    "--ntasks-per-node", "--ntasks-per-gpu",
}  # fmt: skip
QUERY_VALUES = {
    "-j", "--jobs", "-o", "--format", "-u", "--user", "-S", "--starttime", "-E", "--endtime",
    "--name", "-M", "--clusters", "--units", "-t", "--states", "-p", "--partition",
}  # fmt: skip


# -- the log: every call, and the jobs' state ---------------------------------------------
def log_path() -> Path:
    try:
        return Path(os.environ["FAKE_SLURM_LOG"])
    except KeyError:
        sys.exit("fake_slurm: set FAKE_SLURM_LOG to the JSON-lines log to write")


def append(record: dict[str, Any]) -> None:
    with open(log_path(), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps({"time": time.time(), **record}) + "\n")


def read_log() -> list[dict[str, Any]]:
    path = log_path()
    if not path.exists():
        return []
    with open(path) as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        return [json.loads(line) for line in fh if line.strip()]


def jobs() -> dict[str, dict[str, Any]]:
    """Every submitted job, by id, with its current state."""
    found: dict[str, dict[str, Any]] = {}
    for rec in read_log():
        if rec.get("cmd") == "sbatch" and "job_id" in rec:
            found[rec["job_id"]] = {**rec, "state": "PENDING", "exit_code": "0:0"}
        elif rec.get("event") in ("start", "end") and rec["job_id"] in found:
            job = found[rec["job_id"]]
            job["state"] = rec.get("state", "RUNNING")
            job["pid"] = rec.get("pid", job.get("pid"))
            if "returncode" in rec:
                job["exit_code"] = f"{rec['returncode']}:0"
    return found


def options(argv: list[str], takes_value: set[str]) -> tuple[dict[str, str], list[str]]:
    """SLURM-style options (last one wins) and the arguments after them."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
        elif arg in takes_value and i + 1 < len(argv):
            key, value = arg, argv[i + 1]
            i += 1
        elif not arg.startswith("--") and len(arg) > 2:  # -n1
            key, value = arg[:2], arg[2:]
        else:
            key, value = arg, ""
        opts[key] = value
        i += 1
    return opts, argv[i:]


# -- the commands ----------------------------------------------------------------------------
def sbatch(argv: list[str]) -> int:
    opts, rest = options(argv, SUBMIT_VALUES)
    if "--wrap" in opts:
        script = f"#!/bin/sh\n# This script was created by sbatch --wrap.\n\n{opts['--wrap']}\n"
    elif rest:
        script = sys.stdin.read() if rest[0] in ("-", "/dev/stdin") else Path(rest[0]).read_text()
    else:
        print("sbatch: error: no batch script and no --wrap", file=sys.stderr)
        return 1
    workdir = opts.get("-D") or opts.get("--chdir") or os.getcwd()
    with open(log_path(), "a+") as fh:  # take the next id and record it under one lock
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        submitted = sum(1 for line in fh if '"cmd": "sbatch"' in line and '"job_id"' in line)
        job_id = str(FIRST_JOB_ID + submitted)
        fh.write(
            json.dumps(
                {
                    "time": time.time(),
                    "cmd": "sbatch",
                    "argv": argv,
                    "job_id": job_id,
                    "name": opts.get("--job-name") or opts.get("-J", "sbatch"),
                    "account": opts.get("-A") or opts.get("--account", ""),
                    "partition": opts.get("-p") or opts.get("--partition", ""),
                    "comment": opts.get("--comment", ""),
                    "cwd": os.getcwd(),
                    "script": script,
                }
            )
            + "\n"
        )
    output = opts.get("--output") or opts.get("-o") or "slurm-%j.out"
    output = str(Path(workdir, output.replace("%j", job_id)))
    env = dict(os.environ)  # --export=ALL
    env.update(
        SLURM_JOB_ID=job_id,
        SLURM_JOBID=job_id,
        SLURM_JOB_NAME=opts.get("--job-name", "sbatch"),
        SLURM_SUBMIT_DIR=os.getcwd(),
        SLURM_CLUSTER_NAME="fake",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_NUM_NODES="1",
    )
    for option, variable in (
        ("-A", "SLURM_JOB_ACCOUNT"),
        ("-p", "SLURM_JOB_PARTITION"),
        ("--gpus", "SLURM_GPUS"),
        ("--cpus-per-task", "SLURM_CPUS_PER_TASK"),
        ("--cpus-per-gpu", "SLURM_CPUS_PER_GPU"),
        ("--mem", "SLURM_MEM_PER_NODE"),
        ("--ntasks", "SLURM_NTASKS"),
        ("--nodes", "SLURM_JOB_NUM_NODES"),
        ("--nodes", "SLURM_NNODES"),
    ):
        if opts.get(option):
            env[variable] = opts[option]
    job = subprocess.Popen(
        [sys.executable, __file__, "_job", job_id, output],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, for scancel
    )
    if os.environ.get("FAKE_SLURM_SYNC") == "1":
        job.wait()
    print(job_id if "--parsable" in opts else f"Submitted batch job {job_id}")
    return 0


def run_job(job_id: str, output: str) -> int:
    """The background half of sbatch: run the script, record how it ended."""
    script = jobs()[job_id]["script"]
    cancelled = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal cancelled
        cancelled = True

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as out:
        proc = subprocess.Popen(["/bin/sh", "-c", script], stdout=out, stderr=subprocess.STDOUT)
        signal.signal(signal.SIGTERM, on_term)  # scancel signals the group: wait for the job
        append({"event": "start", "job_id": job_id, "pid": os.getpid(), "state": "RUNNING"})
        returncode = proc.wait()
    state = "CANCELLED" if cancelled else "COMPLETED" if returncode == 0 else "FAILED"
    append({"event": "end", "job_id": job_id, "returncode": returncode, "state": state})
    return 0


def selected(opts: dict[str, str]) -> list[dict[str, Any]]:
    found = jobs()
    name = opts.get("--name")
    ids = opts.get("-j") or opts.get("--jobs")
    wanted = list(found.values())
    if name is not None:
        wanted = [job for job in wanted if job["name"] in name.split(",")]
    if ids is not None:  # "1001.0" asks for a job step: there are none
        wanted = [found[i] for i in ids.split(",") if i in found]
    return wanted


def sacct(argv: list[str]) -> int:
    # -nu USER is -n -u USER; what follows the options (the plugin passes "| tail -1") is ignored
    argv = [part for arg in argv for part in (["-n", "-u"] if arg == "-nu" else [arg])]
    opts, _ = options(argv, QUERY_VALUES)
    fmt = opts.get("--format") or opts.get("-o") or "JobID,JobName,Partition,Account,State,ExitCode"
    fields = [re.sub(r"%-?\d*$", "", f).lower() for f in fmt.split(",")]
    value = {
        "jobidraw": lambda j: j["job_id"],
        "jobid": lambda j: j["job_id"],
        "state": lambda j: j["state"],
        "exitcode": lambda j: j["exit_code"],
        "reason": lambda j: "None",
        "nodelist": lambda j: "localhost",
        "account": lambda j: j["account"],
        "partition": lambda j: j["partition"],
        "jobname": lambda j: j["name"],
        "comment": lambda j: j["comment"],
    }
    sep = "|" if "--parsable2" in opts or "-P" in opts else " "
    if "--noheader" not in opts and "-n" not in opts:
        print(sep.join(fields))
    for job in selected(opts):
        print(sep.join(value.get(f, lambda j: "")(job) for f in fields))
    return 0


def squeue(argv: list[str]) -> int:
    opts, _ = options(argv, QUERY_VALUES)
    fmt = opts.get("--format") or opts.get("-o") or "%i %j %T"
    for job in selected(opts):
        line = fmt.replace("%i", job["job_id"]).replace("%T", job["state"])
        print(line.replace("%j", job["name"]))
    return 0


def scancel(argv: list[str]) -> int:
    _, ids = options(argv, QUERY_VALUES)
    found = jobs()
    for job_id in ids:
        job = found.get(job_id)
        if job and job.get("pid") and job["state"] == "RUNNING":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job["pid"], signal.SIGTERM)
    return 0


def srun(argv: list[str]) -> int:
    """One task runs in place; several (``--ntasks``, or ``--nodes`` x ``--ntasks-per-node``)
    run at once, one per stand-in node, with the variables SLURM gives each task. With
    ``--kill-on-bad-exit=1`` the first task that fails ends the others, as on a cluster."""
    opts, command = options(argv, SUBMIT_VALUES)
    if not command:
        print("srun: fatal: No command given to execute.", file=sys.stderr)
        return 1
    nodes = int(opts.get("--nodes") or opts.get("-N") or 1)
    per_node = int(opts.get("--ntasks-per-node") or 1)
    tasks = int(opts.get("--ntasks") or opts.get("-n") or nodes * per_node)
    if tasks == 1:
        os.execvp(command[0], command)
    steps = []
    for task in range(tasks):
        env = dict(os.environ)
        env.update(
            SLURM_NNODES=str(nodes),
            SLURM_STEP_NUM_NODES=str(nodes),
            SLURM_NTASKS=str(tasks),
            SLURM_PROCID=str(task),
            SLURM_NODEID=str(task // per_node),
            SLURM_LOCALID=str(task % per_node),
        )
        steps.append(subprocess.Popen(command, env=env))
    kill_on_bad_exit = opts.get("--kill-on-bad-exit", opts.get("-K")) in ("", "1")
    while any(step.poll() is None for step in steps):
        if kill_on_bad_exit and any(step.returncode not in (None, 0) for step in steps):
            for step in steps:
                if step.poll() is None:
                    step.terminate()
        time.sleep(0.05)
    return next((step.returncode for step in steps if step.returncode), 0)


def sinfo(argv: list[str]) -> int:
    partitions = os.environ.get("FAKE_SLURM_PARTITIONS", "cpu*,gpu").split(",")
    print("\n".join(["PARTITION", *partitions]))
    return 0


def accounts(argv: list[str]) -> int:
    for account in os.environ.get("FAKE_SLURM_ACCOUNTS", "test").split(","):
        print(f"{account:>20}")
    return 0


def scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "config"]:
        print("MaxArraySize            = 1001\nMinJobAge               = 300 sec")
        return 0
    print(f"scontrol: fake_slurm does not implement: {' '.join(argv)}", file=sys.stderr)
    return 1


COMMANDS = {
    "sbatch": sbatch,
    "sacct": sacct,
    "squeue": squeue,
    "scancel": scancel,
    "srun": srun,
    "sinfo": sinfo,
    "sacctmgr": accounts,
    "sshare": accounts,
    "scontrol": scontrol,
}


def main() -> int:
    command, argv = sys.argv[1], sys.argv[2:]
    if command == "_job":
        return run_job(*argv)
    record: dict[str, Any] = {"cmd": command, "argv": argv}
    if command == "srun":  # a job step: note which job it ran in
        record["job_id"] = os.environ.get("SLURM_JOB_ID")
        append(record)
    elif command != "sbatch":  # sbatch records itself, with the id it takes
        append(record)
    return COMMANDS[command](argv)


if __name__ == "__main__":
    sys.exit(main())
