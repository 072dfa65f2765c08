"""Several processes, one run: torchrun's environment into DDP (NCCL on GPUs, gloo on CPUs), and
RunContext, what each process knows of its place in the run."""
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from devices import pick_device

DISTRIBUTED_TIMEOUT = datetime.timedelta(seconds=60)  # peers that never come: one line, not a hang


def setup_distributed(device_name):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; then DDP over NCCL
    on GPUs or gloo on CPUs, one process per GPU."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_name.startswith("cuda:"):
        raise ValueError(f"--device {device_name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                         f"pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = pick_device("cpu" if device_name == "auto" else device_name)
    # Outside torchrun (the variables set by hand, or left over) a missing peer would hang for
    # the default half hour; torchrun's own rendezvous waits for peers, and its runs keep the
    # default timeout, which a long step (rank 0 building the --cache) needs.
    timeout = None if "TORCHELASTIC_RUN_ID" in os.environ else DISTRIBUTED_TIMEOUT
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    except (RuntimeError, dist.DistError) as error:  # e.g. RANK and WORLD_SIZE left over in the environment
        names = ", ".join(f"{key}={os.environ.get(key)}" for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
        raise ValueError(f"the distributed environment ({names}) found no peers within "
                         f"{DISTRIBUTED_TIMEOUT.seconds} s ({type(error).__name__}); start one process per rank with "
                         f"torchrun, or unset these variables to train in one process") from None
    return dist.get_rank(), dist.get_world_size(), device


@dataclass
class RunContext:
    """This process's place in the run: its rank of world_size (1 without torchrun), its device,
    the project's outputs folder and its DataLoader workers. Rank 0 writes the files and prints."""
    rank: int
    world_size: int
    device: torch.device
    outputs: Path
    workers: int

    def say(self, *args, **kwargs):
        if self.rank == 0:
            print(*args, **kwargs)

    def sum(self, values):
        """A list of floats summed over all processes."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()


def default_workers(world_size=1):
    """DataLoader workers per process when --workers is not given: the cores left to each process
    after its own, from 1 to 8."""
    return min(8, max(1, (os.cpu_count() or 2) // world_size - 1))


def run_context(args, rank, world_size, device):
    workers = args.workers if args.workers is not None else default_workers(world_size)
    return RunContext(rank, world_size, device, Path(args.project) / "outputs", workers)
