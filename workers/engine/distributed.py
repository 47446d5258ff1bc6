"""One job on several devices: torch.distributed under the one training loop of ``workers.engine.train``.

A spec with ``training.distributed.devices = N > 1`` trains in N processes started by torch's elastic launcher
(``launch_command``: ``python -m torch.distributed.run --standalone --nproc-per-node N -m workers.engine.distributed
...``). Every process calls ``train(..., parallel=Parallel.from_environment(spec, device))``, and the loop asks its
``Parallel`` at the few points where several processes differ from one:

- **Process group** from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...): gloo on CPU, nccl
  on CUDA (one device per local rank).
- **Data**: every rank draws the same global micro-batch (the 1-device cursor, so a checkpoint holds one data
  position) and trains on its own contiguous ``batch_size / N`` rows of it (``shard``): the global batch is the
  1-device batch.
- **ddp**: ``DistributedDataParallel`` averages the gradients (no sync on the micro-batches before the last).
  **fsdp**: FSDP2 ``fully_shard`` on every block and on the root (parameters, gradients and optimizer state
  sharded; the gradient norm is the global one: ``clip_grad_norm_`` reduces over the DTensor shards).
  **expert_parallel**: each rank keeps ``E / N`` routed experts of every MoE layer; the rows the router sends to an
  expert travel to its rank and back with ``all_to_all_single_autograd`` (``ExpertDispatch``); the rest of the model
  is DDP with the experts left out of its all-reduce.
- **Figures**: a step's losses, dropped fraction and expert load are averaged over the ranks before they are logged
  (every rank has the same number of tokens, so the mean of the ranks' means is the global mean), and router loads
  are summed before the aux-free bias update, so every rank keeps the same biases.
- **Stops**: SIGTERM on any rank, or the worker's stop file (``STOP_FILE`` in the run folder: ``stop`` or
  ``preempt``), is agreed by an all-reduce before each step, so every rank stops at the same step and takes the
  final checkpoint together.
- **Sink and checkpoints**: only rank 0 has a real sink and commits checkpoints. The format is the 1-device one
  (``model.safetensors`` holds the whole model: evaluation, export and a 1-device resume read it as always;
  ``rng.pt`` holds every rank's generators under ``"ranks"``). With fsdp the optimizer state is sharded: every rank
  writes its shards into the checkpoint with ``torch.distributed.checkpoint`` (``optimizer/``), and a resume on
  another number of devices reshards it. With expert parallelism each rank writes its own optimizer file
  (``optimizer-rank{r}.pt``: its experts' moments), so such a checkpoint resumes on the same number of devices.

Data preparation (tokenizing) is the caller's: the ranks open the prepared folder (``PreparedData.load``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from workers.engine.kernels import activate, grouped_matmul

if TYPE_CHECKING:
    from workers.engine.data import Batch
    from workers.engine.model import MoEFeedForward, MoETransformer
    from workers.engine.spec import Spec

#: Written into the run folder by the process that supervises the ranks: ``stop`` (checkpoint and return
#: "stopped") or ``preempt`` (checkpoint and return "preempted"). Read by rank 0 before each step.
STOP_FILE = "distributed-stop"
#: Rank 0 writes how the run ended here (``TrainResult`` as JSON, or ``{"error": ...}`` for a spec or data that
#: cannot train); the supervisor reads it once the launcher exits.
RESULT_FILE = "distributed-result.json"


@dataclass
class Parallel:
    """Where this process stands in the job's process group, and the few operations the loop needs of it.

    ``Parallel.single()`` is the 1-process case: every operation is the identity, so the loop has one code path.
    """

    rank: int = 0
    world: int = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"
    expert_parallel: bool = False
    run_root: Path | None = None  # where the stop file is looked for (rank 0)
    _shadow: MoETransformer | None = field(default=None, repr=False)

    @classmethod
    def single(cls) -> Parallel:
        return cls()

    @classmethod
    def from_environment(cls, spec: Spec, device: torch.device, run_root: Path | None = None) -> Parallel:
        """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA).

        The ranks must agree with the spec: a launcher started with another process count is refused.
        """
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        want = spec.training.distributed
        if world != want.devices:
            raise RuntimeError(f"{world} processes were launched for training.distributed.devices = {want.devices}")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            # A rank that dies leaves the others waiting in a collective: the launcher notices the death and ends
            # them; the timeout is the backstop for a hang it cannot see.
            dist.init_process_group(backend, timeout=timedelta(minutes=10))
        return cls(
            rank=dist.get_rank(),
            world=dist.get_world_size(),
            strategy=want.strategy,
            expert_parallel=want.expert_parallel,
            run_root=run_root,
        )

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded_optimizer(self) -> bool:
        """Whether each rank holds a different part of the optimizer state (so each writes its own)."""
        return self.distributed and (self.strategy == "fsdp" or self.expert_parallel)

    # -- the model ----------------------------------------------------------------------------------------

    def wrap(self, model: MoETransformer, device: torch.device) -> nn.Module:
        """Apply the layout to ``model`` (identical on every rank: same seed) and return what the training step
        calls. ``model`` itself stays the handle for its methods (fsdp and expert parallelism change it in place;
        ddp returns a wrapper around it). Build the optimizer after this: it must see the final parameters."""
        if not self.distributed:
            return model
        if self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world,))
            blocks = [*model.blocks, *(module.block for module in model.mtp_modules)]
            for block in blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model
        ignored: list[str] = []
        if self.expert_parallel:
            ignored = self._shard_experts(model)
            # Each rank's experts are its own: DDP must not average them with another rank's.
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        # broadcast_buffers=False: the router biases stay equal because every rank applies the same summed loads
        # (reduce_router_loads), and the load accumulators are per rank until then.
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index or 0] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    def _shard_experts(self, model: MoETransformer) -> list[str]:
        """Keep this rank's ``E / world`` experts of every MoE layer; returns the expert parameters' names."""
        names = []
        layers = {id(layer): layer for layer in model._all_moe_layers()}
        for name, module in model.named_modules():
            if id(module) not in layers:
                continue
            layer = layers[id(module)]
            local = layer.num_experts // self.world
            chunk = slice(self.rank * local, (self.rank + 1) * local)
            layer.w_in = nn.Parameter(layer.w_in.detach()[chunk].clone())  # (E/W, C, 2H or H)
            layer.w_out = nn.Parameter(layer.w_out.detach()[chunk].clone())  # (E/W, H, C)
            layer.expert_dispatch = ExpertDispatch(layer, self.world)
            # A rank's loss is the mean over its own tokens and DDP averages the other gradients over the ranks;
            # an expert gathers the gradients of every rank's tokens, so it takes the same 1/world.
            for param in (layer.w_in, layer.w_out):
                param.register_hook(lambda grad: grad / self.world)
            names += [f"{name}.w_in", f"{name}.w_out"]
        return names

    def expert_parameters(self, model: nn.Module) -> set[int]:
        """ids of the parameters that differ between ranks (expert parallelism's local experts)."""
        return {
            id(p) for m in model.modules() if getattr(m, "expert_dispatch", None) is not None for p in (m.w_in, m.w_out)
        }

    @contextlib.contextmanager
    def no_sync(self, step_model: nn.Module, last_micro_batch: bool) -> Iterator[None]:
        """DDP: skip the gradient all-reduce on the micro-batches before a step's last (their gradients are
        reduced with the last one's)."""
        if isinstance(step_model, nn.parallel.DistributedDataParallel) and not last_micro_batch:
            with step_model.no_sync():
                yield
        else:
            yield

    def shard(self, batch: Batch) -> Batch:
        """This rank's contiguous share of the global micro-batch (the spec makes devices divide its rows)."""
        if not self.distributed:
            return batch
        rows = batch.input_ids.shape[0] // self.world
        part = slice(self.rank * rows, (self.rank + 1) * rows)
        mask = None if batch.attention_mask is None else batch.attention_mask[part]
        return type(batch)(batch.input_ids[part], batch.labels[part], mask)

    # -- collectives the loop uses -------------------------------------------------------------------------

    def mean(self, values: Tensor) -> Tensor:
        """``values`` averaged over the ranks (in place)."""
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.world
        return values

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag true on any rank is true on all (one all-reduce)."""
        if not self.distributed:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def stop_requested(self) -> tuple[bool, bool]:
        """(stop, preempt) asked through the stop file (read on rank 0 only; ``agree`` spreads it)."""
        if not self.is_main or self.run_root is None:
            return False, False
        try:
            asked = (self.run_root / STOP_FILE).read_text().strip()
        except FileNotFoundError:
            return False, False
        return asked == "stop", asked == "preempt"

    @torch.no_grad()
    def reduce_router_loads(self, model: MoETransformer) -> None:
        """Sum every rank's router load accumulators (before the aux-free bias update)."""
        if not self.distributed:
            return
        layers = model._all_moe_layers()
        if not layers:
            return
        loads = torch.stack([layer.router.load_accum for layer in layers])  # (L, E) int64
        dist.all_reduce(loads, op=dist.ReduceOp.SUM)
        for layer, row in zip(layers, loads, strict=True):
            layer.router.load_accum.copy_(row)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """The global gradient norm before clipping, clipping to ``max_norm`` (``inf``: measure only)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not (self.distributed and self.expert_parallel):
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if isinstance(norm, torch.distributed.tensor.DTensor):
                norm = norm.full_tensor()  # fsdp: the shards' norms reduced to the global one
            return float(norm)
        # Expert parallel: the replicated gradients are equal on every rank, the experts' are each rank's own.
        experts = self.expert_parameters(model)
        grads = [p.grad for p in params if p.grad is not None]
        local = [g for p, g in zip(params, grads, strict=True) if id(p) in experts]
        shared = [g for p, g in zip(params, grads, strict=True) if id(p) not in experts]
        squares = torch.stack(
            [
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in part])) ** 2
                if part
                else torch.zeros((), device=self._device())
                for part in (shared, local)
            ]
        )
        dist.all_reduce(squares[1:], op=dist.ReduceOp.SUM)
        total = squares.sum().sqrt()
        # torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) when that is below 1.
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale)
        return float(total)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` (rank order) on rank 0; None elsewhere."""
        if not self.distributed:
            return [value]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- checkpoints ---------------------------------------------------------------------------------------

    def shadow(self, spec: Spec) -> MoETransformer:
        """A whole, unsharded copy of the model on the CPU, for reading and writing ``model.safetensors`` (built
        once; the full model always fits the host's memory where its shards fit the devices)."""
        from workers.engine.model import build_model

        if self._shadow is None:
            self._shadow = build_model(spec)
        return self._shadow

    def full_model_state(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The whole model's ``state_dict`` on rank 0's CPU (collective; None on the other ranks)."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            gathered = get_model_state_dict(model, options=options)
            return {k: v for k, v in gathered.items() if isinstance(v, Tensor)} if self.is_main else None
        state: dict[str, Tensor] = {k: v.detach() for k, v in model.state_dict().items()}
        for name, module in model.named_modules():
            if getattr(module, "expert_dispatch", None) is None:
                continue
            for part in ("w_in", "w_out"):
                local = getattr(module, part).detach().contiguous()
                pieces = [torch.empty_like(local) for _ in range(self.world)]
                dist.all_gather(pieces, local)
                state[f"{name}.{part}"] = torch.cat(pieces)
        return {k: v.cpu() for k, v in state.items()} if self.is_main else None

    def load_full_model_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Load a whole model's ``state_dict`` (every rank has it) into this rank's part of ``model``."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))
            return
        experts = {}
        for name, module in model.named_modules():
            if getattr(module, "expert_dispatch", None) is not None:
                local = module.w_in.shape[0]
                chunk = slice(self.rank * local, (self.rank + 1) * local)
                for part in ("w_in", "w_out"):
                    experts[f"{name}.{part}"] = state[f"{name}.{part}"][chunk]
        model.load_state_dict({**state, **experts}, strict=True)

    def write_optimizer(self, model: nn.Module, optimizer: Any, folder: Path) -> None:
        """This rank's optimizer state into checkpoint scratch folder ``folder`` (collective)."""
        if self.strategy == "fsdp" and not optimizer.state:
            # Before the first step there is no state, and get_optimizer_state_dict would create it by taking a
            # zero-learning-rate step: Adam's step count would then be off by one from a 1-device run's.
            if self.is_main:
                (folder / "optimizer-empty").write_text("no optimizer step yet\n")
        elif self.strategy == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder / "optimizer")
        else:
            torch.save({"optimizer": optimizer.state_dict()}, folder / f"optimizer-rank{self.rank}.pt")
        self.barrier()  # every rank's files are on disk before rank 0 hashes them into the manifest

    def read_optimizer(self, model: nn.Module, optimizer: Any, folder: Path) -> None:
        """Inverse of ``write_optimizer``."""
        if (folder / "optimizer-empty").is_file():
            optimizer.state.clear()
            return
        if self.strategy == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

            state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
            dcp.load(state, checkpoint_id=folder / "optimizer")
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
            return
        file = folder / f"optimizer-rank{self.rank}.pt"
        if not file.is_file():
            from workers.engine.train import EngineConfigError

            raise EngineConfigError(
                f"checkpoint {folder.name} holds no expert-parallel optimizer state for rank {self.rank}: "
                "resume it on the number of devices that wrote it"
            )
        optimizer.load_state_dict(torch.load(file, map_location=self._device(), weights_only=True)["optimizer"])


class ExpertDispatch:
    """Expert parallelism for one MoE layer: rows grouped by (global) expert go to the rank holding that expert,
    are multiplied there by its local experts, and come back in their original order.

    Rank ``r`` holds experts ``[r·L, (r+1)·L)`` with ``L = E / world``. Autograd runs the same exchanges backwards
    (``all_to_all_single_autograd``), so an expert's gradient collects every rank's rows.
    """

    def __init__(self, layer: MoEFeedForward, world: int) -> None:
        self.activation = layer.activation
        self.hidden = layer.hidden
        self.world = world
        self.local = layer.num_experts // world

    def __call__(self, xs: Tensor, kept: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        W, L = self.world, self.local
        send = kept.view(W, L)  # (W, L) rows this rank sends to each rank's experts
        recv = torch.empty_like(send)  # (W, L) rows each rank sends to this rank's experts
        dist.all_to_all_single(recv, send)
        send_splits = send.sum(dim=1).tolist()
        recv_splits = recv.sum(dim=1).tolist()
        group = dist.group.WORLD
        assert group is not None
        arrived = all_to_all_single_autograd(xs.contiguous(), recv_splits, send_splits, group)  # (R, C)
        # Arrived rows are grouped by (source rank, local expert); the grouped matmul wants them by expert.
        by_expert = _source_major_to_expert_major(recv)  # (R,)
        counts = recv.sum(dim=0)  # (L,) rows per local expert
        h = activate(grouped_matmul(arrived.index_select(0, by_expert), w_in, counts), self.activation, self.hidden)
        ys = grouped_matmul(h, w_out, counts)  # (R, C) by expert
        back = ys.index_select(0, torch.argsort(by_expert))  # (R, C) by source rank again
        out: Tensor = all_to_all_single_autograd(back.contiguous(), send_splits, recv_splits, group)  # (M, C)
        return out


def _source_major_to_expert_major(counts: Tensor) -> Tensor:
    """For rows laid out by (source s, expert e) with ``counts[s, e]`` rows each, the row indices in
    (expert e, source s) order."""
    W, L = counts.shape
    flat = counts.reshape(-1)  # (W*L,) segment lengths, source-major
    starts = torch.cumsum(flat, 0) - flat  # (W*L,) first row of each segment
    lengths = counts.t().reshape(-1)  # expert-major segment lengths
    firsts = starts.view(W, L).t().reshape(-1)  # expert-major segment starts
    total = int(flat.sum())
    offsets = torch.cumsum(lengths, 0) - lengths  # where each segment begins in the expert-major layout
    within = torch.arange(total, device=counts.device) - torch.repeat_interleave(offsets, lengths)
    return torch.repeat_interleave(firsts, lengths) + within


# ------------------------------------------------------------------------------------------------------------
# Launching the ranks (the worker side) and a rank's entry point
# ------------------------------------------------------------------------------------------------------------


def launch_command(
    *, spec_file: Path, prepared: Path, out_dir: Path, device: str, devices: int, faults: dict[str, Any] | None = None
) -> list[str]:
    """The command line that trains ``spec_file`` on ``devices`` processes with torch's elastic launcher.

    ``--standalone`` gives the job a private rendezvous on a free local port; ``--max-restarts 0``: a rank that
    dies fails the attempt (the launcher ends the other ranks and exits non-zero) and the job resumes from its last
    checkpoint as any failed attempt would, under the worker's control rather than the launcher's.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={devices}",
        "--max-restarts=0",
        "-m",
        "workers.engine.distributed",
        f"--spec={spec_file}",
        f"--prepared={prepared}",
        f"--out={out_dir}",
        f"--device={device}",
    ]
    if faults:
        command.append(f"--faults={json.dumps(faults)}")
    return command


def launch_environment(devices: int, device: str) -> dict[str, str]:
    """Environment for the launcher: on a CPU, the cores are shared out between the ranks (torchrun's default of
    one thread per rank would leave most of them idle)."""
    env = dict(os.environ)
    if device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // devices))
    return env


class DiscardSink:
    """The sink of ranks other than 0: their figures are rank 0's (the loop averages them first)."""

    def emit(self, step: int, metrics: Any) -> None:
        pass

    def event(self, kind: str, data: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _die_with_parent() -> None:
    """Linux: SIGTERM this rank when its launcher dies, even by SIGKILL (no orphan ranks training on). The same
    request ``builder.core.process.die_with_parent`` makes; repeated here because the engine imports nothing of the
    web side."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: Sequence[str] | None = None) -> int:
    """One rank: ``python -m workers.engine.distributed --spec S --prepared DIR --out RUN --device cpu|cuda``.

    Exit status 0 when the run ended (rank 0 wrote ``RESULT_FILE``: completed, stopped, preempted, failed, or a spec
    or data that cannot train); anything else is a crash the supervisor retries from the last checkpoint.
    """
    from workers.engine.data import DataFormatError, PreparedData
    from workers.engine.sinks import JsonlSink, MetricsSink
    from workers.engine.spec import load_spec
    from workers.engine.train import EngineConfigError, FaultInjection, resolve_device, train

    parser = argparse.ArgumentParser(prog="python -m workers.engine.distributed")
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--prepared", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--faults", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _die_with_parent()

    spec = load_spec(json.loads(args.spec.read_text()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda" and local_rank >= torch.cuda.device_count():
        # Every rank sees the same count: all refuse, and no retry can help (rank 0 says why).
        message = (
            f"training.distributed.devices asks for {spec.training.distributed.devices} GPUs; "
            f"this worker has {torch.cuda.device_count()}"
        )
        if int(os.environ.get("RANK", "0")) == 0:
            _write_result(args.out, {"error": message})
        return 0
    device = resolve_device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel = Parallel.from_environment(spec, device, run_root=args.out)
    faults = FaultInjection(**json.loads(args.faults)) if args.faults else None
    # Rank 0's points go to the run's JSON lines file, which the supervisor tails into the platform's sink;
    # the other ranks' would be the same numbers (the loop averages them first).
    sink: MetricsSink = JsonlSink(args.out / "metrics.jsonl") if parallel.is_main else DiscardSink()
    outcome: dict[str, Any]
    try:
        result = train(
            spec,
            PreparedData.load(args.prepared),
            args.out,
            sink,
            resume=True,
            device=str(device),
            parallel=parallel,
            faults=faults,
        )
        outcome = {**asdict(result), "checkpoint": None if result.checkpoint is None else str(result.checkpoint)}
    except (EngineConfigError, DataFormatError) as exc:
        outcome = {"error": str(exc)}  # the same on every rank: no retry can help
    finally:
        sink.close()
    if parallel.is_main:
        _write_result(args.out, outcome)
    dist.destroy_process_group()
    return 0


def _write_result(out: Path, outcome: dict[str, Any]) -> None:
    tmp = out / f".{RESULT_FILE}.partial"
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, out / RESULT_FILE)


if __name__ == "__main__":
    sys.exit(main())
