"""Where the trainer runs: one process, data parallel (accelerate's DDP, or mixed precision in one
process) or sharded (FSDP2), behind one small interface picked once (:func:`make_runtime`), so the
trainer's loop and update read the same in all three.

A runtime answers: which process this is and how many there are; a sum over the processes (every
mean of the update is over all processes' tokens); a barrier; the autocast context; the
parameters whole for a rollout (sharded: gathered once); how the policy and optimizer are wrapped;
the backward and gradient clipping; and what to do after the frozen reference's pass.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from contextlib import nullcontext

import torch

from agents.token_ppo.config import TokenPPOConfig


def require(module: str, extra: str, feature: str):
    """Import an optional engine, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{feature} needs the {module!r} package: pip install 'textenvs[{extra}]'."
        ) from e


def end_with_launcher() -> bool:
    """Ask the kernel (Linux) to send this process SIGTERM when its parent dies: a worker of
    ``accelerate launch`` / ``torchrun`` then ends with its launcher, even one killed by SIGKILL,
    instead of training on and later writing over the checkpoint its user meant to resume.
    Returns whether it is armed (False off Linux, where the docs say how to stop a run)."""
    from textenvs.system import die_with_parent

    return die_with_parent()


def make_accelerator(config: TokenPPOConfig):
    """An ``accelerate.Accelerator`` when this process is one of several (started by ``accelerate
    launch`` or ``torchrun``: it then ends with its launcher, :func:`end_with_launcher`) or mixed
    precision is asked for; None otherwise (plain PyTorch).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched:
        end_with_launcher()
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if not launched and config.mixed_precision == "no" and launcher_precision == "no":
        return None
    accelerate = require("accelerate", "accelerate", "Data-parallel or mixed-precision token PPO")
    return accelerate.Accelerator(
        cpu=torch.device(config.device).type == "cpu",
        mixed_precision=None if config.mixed_precision == "no" else config.mixed_precision,
    )


class SingleProcess:
    """Plain PyTorch in this process."""

    accelerator = None
    rank, world = 0, 1
    sharded = False

    @property
    def is_main(self) -> bool:
        """Process 0 (the only one in a plain run): it writes checkpoints, logs and reports."""
        return self.rank == 0

    def checked_device(self, configured: str) -> str | torch.device:
        """The device to run on (the configured one here), once the launch is checked."""
        return configured

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the processes (``x`` itself with one process); no gradient."""
        return x

    def mean_over_processes(self, x: torch.Tensor, device) -> float:
        return float(self.sum(x.to(device)) / self.world)

    def wait(self) -> None:
        """A barrier of every process (nothing to wait for in one)."""

    def autocast(self):
        return nullcontext()

    def for_rollouts(self):
        """What a rollout's or an evaluation's forwards run inside (collective where sharded):
        nothing to do here, the parameters are whole."""
        return nullcontext()

    def shard(self, model, value_head, reference) -> list[torch.nn.Module]:
        """The FSDP units of the policy (none: nothing is sharded)."""
        return []

    def prepare(self, policy, optimizer):
        return policy, optimizer

    def backward_and_clip(self, loss: torch.Tensor, params, max_norm: float) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def after_reference(self, reference) -> None:
        """After the frozen reference's pass (nothing to free here)."""

    def close(self) -> None:
        """At the end of a run: every process waits for the others, then the process group is
        torn down (a group left to the interpreter's exit can abort a process mid-teardown)."""


class Accelerated(SingleProcess):
    """accelerate: DDP over the processes of a launch (or mixed precision in one process). Each
    process holds the whole model; the engine all-reduces the gradients."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    def checked_device(self, configured: str) -> torch.device:
        """The accelerator's device, once it is the configured device's type and the launch
        shards nothing this trainer cannot serve."""
        device = self.accelerator.device
        if torch.device(configured).type != device.type:
            raise ValueError(
                f"config.device is {configured!r} but the accelerator runs on {device}: "
                "pass the device type the launcher uses (--device cuda on GPUs)."
            )
        self.refuse_parameter_sharding()
        return device

    def refuse_parameter_sharding(self) -> None:
        """Data parallel here means DDP: every process holds the whole model.

        Rollouts run the policy token by token on each process's own env, a different number of
        forwards per process; engines that shard the parameters (FSDP, DeepSpeed ZeRO-3) gather
        them in a collective at every forward, which would wait for ever, and engines that shard
        the optimizer state (DeepSpeed ZeRO-1/2) would need sharded checkpoints, which this
        trainer's checkpoints are not. Both are refused before anything is built.
        """
        from accelerate.utils import DistributedType

        kind = self.accelerator.state.distributed_type
        if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError(
                f"Token PPO does not run under accelerate's {kind.value} engine: each process "
                "generates its own episodes, a different number of forwards per process, which "
                "that engine's sharded forwards cannot serve. It shards itself: launch with "
                "agents/accelerate/ddp.yaml and pass --fsdp true (FSDP2 per transformer block, "
                "the parameters gathered once per rollout, sharded checkpoints); or --lora-r "
                "(with --mixed-precision bf16) to fit a large model on each GPU."
            )

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, reduction="sum")

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def autocast(self):
        return self.accelerator.autocast()

    def prepare(self, policy, optimizer):
        return self.accelerator.prepare(policy, optimizer)

    def close(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()  # destroys the process group

    def backward_and_clip(self, loss: torch.Tensor, params, max_norm: float) -> None:
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(params, max_norm)


class Sharded(Accelerated):
    """FSDP2 (``agents/fsdp.py``): parameters, gradients and Adam states sharded per transformer
    block; rollouts and evaluations run inside one gather of every unit (``rollout="gathered"``)
    or on the sharded units in lockstep (``"sharded"``: no process ever holds the whole model);
    the update runs sharded (the same minibatches on every process)."""

    sharded = True

    def __init__(self, accelerator, rollout: str = "gathered") -> None:
        from textenvs.system import return_large_frees_at_once

        super().__init__(accelerator)
        self.rollout = rollout
        self.units: list[torch.nn.Module] = []
        # the update gathers and frees each block's parameters and gradients over and over:
        # freed at once, they are not held twice (peak memory per process, benchmarks.scale)
        return_large_frees_at_once()

    def shard(self, model, value_head, reference) -> list[torch.nn.Module]:
        """Every block, the LM (embeddings, head) over them, the value head; the reference too."""
        from agents.fsdp import shard

        self.units = shard(model, value_head)
        self.model, self.value_head = model, value_head
        if reference is not None:
            shard(reference)
        return self.units

    @contextlib.contextmanager
    def for_rollouts(self):
        """Every unit gathered once (``rollout="gathered"``); or the LM's forwards in lockstep
        on its sharded units, only the value head (one row of weights) gathered
        (``"sharded"``). Collective."""
        from agents.fsdp import gathered, in_lockstep

        if self.rollout == "gathered":
            with gathered(self.units):
                yield
            return
        with gathered([self.value_head]), in_lockstep(self.model, self.units):
            yield

    # fully_shard already wraps the modules, and its gradients are reduced by their own hooks:
    # the plain PyTorch prepare and backward, not accelerate's
    prepare = SingleProcess.prepare
    backward_and_clip = SingleProcess.backward_and_clip

    def after_reference(self, reference) -> None:
        # FSDP keeps a root's parameters whole after its forward (for the backward that
        # follows); the reference has no backward: free its embeddings and head now
        if reference is not None:
            reference.reshard()


def make_runtime(config: TokenPPOConfig, accelerator) -> SingleProcess:
    """The runtime of ``config`` under ``accelerator`` (None: this process alone)."""
    if config.fsdp and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        raise ValueError(
            "fsdp=True shards over the processes of a distributed launch, and this process "
            "is not one: run `accelerate launch --config_file agents/accelerate/ddp.yaml "
            "--num_processes N -m agents.token_ppo --fsdp true ...` (or torchrun)."
        )
    if accelerator is None:
        if config.fsdp:
            raise ValueError(
                "fsdp=True needs the launch's accelerator: TokenPPO(config, "
                "accelerator=agents.token_ppo.make_accelerator(config))."
            )
        return SingleProcess()
    return Sharded(accelerator, config.fsdp_rollout) if config.fsdp else Accelerated(accelerator)
