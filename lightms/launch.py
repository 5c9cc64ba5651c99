"""`python -m lightms.launch`: runs a training script on several workers with MindSpore's msrun.

    python -m lightms.launch --devices 2 train.py --lr 0.1
    # two machines, two workers each (run on both, with --node-rank 0 and 1):
    python -m lightms.launch --devices 2 --num-nodes 2 --node-rank 0 --master-addr 10.0.0.1 \\
        --master-port 8118 train.py

A thin wrapper: it builds the msrun command (`mindspore.parallel.cluster.run`) and runs it;
the script needs no change (its `Trainer` joins the workers). Workers' output goes to
`--log-dir` (`worker_<rank>.log`) and to this terminal. SIGTERM or Ctrl-C stops every worker
after the same step, rank 0 writes one resumable checkpoint, and the launcher exits 128 + signal.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
from typing import List, Optional


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def msrun_command(script: str, script_args: List[str], devices: int, num_nodes: int = 1, node_rank: int = 0,
                  master_addr: str = "127.0.0.1", master_port: Optional[int] = None, log_dir: str = "msrun_logs",
                  cluster_timeout: int = 120) -> List[str]:
    """The msrun command line for `script` on `devices` workers per machine and `num_nodes` machines.

    Raises:
        ValueError: For a non-positive worker count or a node rank outside the machines.
    """
    if devices < 1 or num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ValueError(f"lightms.launch: --devices {devices} and --num-nodes {num_nodes} must be >= 1 and "
                         f"--node-rank {node_rank} in [0, {num_nodes}).")
    port = master_port if master_port is not None else free_port()
    return [sys.executable, "-m", "mindspore.parallel.cluster.run", f"--worker_num={devices * num_nodes}",
            f"--local_worker_num={devices}", f"--master_addr={master_addr}", f"--master_port={port}",
            f"--node_rank={node_rank}", f"--log_dir={log_dir}", "--join=True",
            f"--cluster_time_out={cluster_timeout}", script, *script_args]


# Set by the launcher with its own MS_NODE_TIMEOUT: the Trainer then does not take that value for the user's.
LAUNCHER_NODE_TIMEOUT = "LIGHTMS_LAUNCHER_NODE_TIMEOUT"


def launch_environment(environ=os.environ) -> dict:
    """The environment of msrun's processes: this interpreter first on PATH (msrun starts `python script.py`),
    and, unless set already, `MS_NODE_TIMEOUT=10`: msrun's scheduler then ends the run 10 s after its workers
    are gone. The workers replace it as they join with the script's `DDPStrategy(timeout=...)`, how long they
    wait for each other (a short wait fails runs whose workers fall out of step, as rank 0 writing a checkpoint).
    """
    env = dict(environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if "MS_NODE_TIMEOUT" not in env:
        env["MS_NODE_TIMEOUT"] = env[LAUNCHER_NODE_TIMEOUT] = "10"
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightms.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, required=True, help="workers on this machine")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=None, help="default: a free port (one machine only)")
    parser.add_argument("--log-dir", default="msrun_logs")
    parser.add_argument("--cluster-timeout", type=int, default=120,
                        help="seconds the workers of all machines have to join (machines started further apart fail)")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.num_nodes > 1 and args.master_port is None:
        parser.error("--master-port is needed with --num-nodes > 1 (every machine must use the same one)")
    command = msrun_command(args.script, args.args, args.devices, args.num_nodes, args.node_rank, args.master_addr,
                            args.master_port, args.log_dir, args.cluster_timeout)
    # A session of its own: Ctrl-C at the terminal reaches this launcher only (msrun's own handler would kill
    # the workers before they write a checkpoint), which hands it on as below.
    msrun = subprocess.Popen(command, env=launch_environment(), start_new_session=True)
    received = []

    def forward(signum, frame):
        # msrun dies on SIGTERM and leaves its workers running: the workers get it instead. Each stops at the
        # same step as the others (they agree at every chunk end), rank 0 writes one resumable checkpoint.
        received.append(signum)
        for pid in worker_pids(msrun.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = msrun.wait()
    return 128 + received[0] if received else code


def worker_pids(root: int) -> List[int]:
    """The msrun workers below process `root` (Linux: read from /proc; their environment has MS_ROLE=MS_WORKER)."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if b"MS_ROLE=MS_WORKER" in environ.read().split(b"\0"):
                    found.append(pid)
                    continue  # not its children (data-loading processes inherit MS_ROLE)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    pending += [int(child) for child in children.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


if __name__ == "__main__":
    sys.exit(main())
