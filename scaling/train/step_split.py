"""Where a training step's time goes: a profiled step, attributed to parts of the model.

    with StepProfiler(model) as sp:
        ...one training step (engine.backward, engine.step, next(loader) inside `sp.range`)...
    sp.split(wall_s) -> {"attention": 0.41, "mlp": 0.30, ...}  # fractions of the step

Forward: module hooks open a `torch.profiler.record_function` range per module while the
profiler runs (installed for the profiled step only, so normal steps pay nothing), and
every op's self time goes to the category of its innermost range. Backward: the autograd
engine tags each backward function with the sequence number of the forward op that made
it; the backward's time goes to that forward op's category. Non-model parts (data wait,
optimizer, communication) are ranges opened by the caller (`sp.range("optimizer")`);
collective ops are recognised by name wherever they run (ZeRO's gathers inside forward).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from vidscale.models.attention import CrossAttention, SelfAttention
from vidscale.models.dit import DiTBlock, FinalLayer, Mlp, VideoDiT

CATEGORIES = ("attention", "mlp", "adaln_norms", "embedding", "optimizer", "data_wait",
              "communication", "other")
_PREFIX = "vs::"
_COMM = ("c10d::", "nccl:", "gloo:", "record_param_comms", "all_reduce", "allreduce", "all_gather",
         "allgather", "reduce_scatter", "_reduce_scatter", "all_to_all", "alltoall", "broadcast_",
         "ProcessGroup", "send", "recv_")


def module_category(name: str, m: nn.Module) -> str | None:
    """Category of a module's own work (its children's ranges override it)."""
    if isinstance(m, (SelfAttention, CrossAttention)):
        return "attention"
    if isinstance(m, Mlp):
        return "mlp"
    if isinstance(m, (DiTBlock, FinalLayer, nn.LayerNorm)) or name.endswith("adaLN"):
        return "adaln_norms"  # the block's own work: adaLN, norms, modulation, gated residuals
    if name.split(".")[-1] in ("x_embed", "t_embed", "y_embed", "rope", "linear") and not isinstance(m, VideoDiT):
        return "embedding"  # patch/timestep/caption embedding, RoPE tables, output projection
    return None


def _is_comm(name: str) -> bool:
    return any(k in name for k in _COMM)


class StepProfiler:
    """Profile one step of `model` and attribute its time to CATEGORIES."""

    def __init__(self, model: nn.Module, cuda: bool = False):
        self.model = model
        self.cuda = cuda
        """Attribute the GPU kernels' time (each to the op that launched it), not the host's."""
        self._handles: list = []
        self._prof: profile | None = None

    # -- ranges -------------------------------------------------------------------------
    @contextlib.contextmanager
    def range(self, category: str):
        assert category in CATEGORIES, category
        with record_function(_PREFIX + category):
            yield

    def _install(self) -> None:
        for name, m in self.model.named_modules():
            cat = module_category(name, m)
            if cat is None:
                continue
            stack: list = []

            def pre(mod, args, cat=cat, stack=stack):
                rf = record_function(_PREFIX + cat)
                rf.__enter__()
                stack.append(rf)

            def post(mod, args, out, stack=stack):
                stack.pop().__exit__(None, None, None)

            self._handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def __enter__(self) -> "StepProfiler":
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._install()
        self._prof = profile(activities=acts)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        assert self._prof is not None
        self._prof.__exit__(*exc)

    # -- attribution ----------------------------------------------------------------------
    def seconds(self) -> dict[str, float]:
        """Seconds per category: self time of every op (with `cuda`: of the kernels it launched), attributed."""
        assert self._prof is not None, "profile a step first"
        events = list(self._prof.events())

        def range_of(e) -> str | None:
            p = e
            while p is not None:
                if p.name.startswith(_PREFIX):
                    return p.name[len(_PREFIX):]
                p = p.cpu_parent
            return None

        # forward ops that autograd recorded: sequence number -> category
        fwd_cat: dict[int, str] = {}
        for e in events:
            if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine") and e.cpu_parent is not None:
                c = range_of(e)
                if c is not None:
                    fwd_cat.setdefault(e.sequence_nr, c)
        out = dict.fromkeys(CATEGORIES, 0.0)
        for e in events:
            t = (e.self_device_time_total if self.cuda else e.self_cpu_time_total) / 1e6
            if t <= 0:
                continue
            if _is_comm(e.name) or (e.cpu_parent is not None and _is_comm(e.cpu_parent.name)):
                out["communication"] += t
                continue
            c = range_of(e)
            if c is None or c == "other":
                # inside a backward function: the category of the forward op that made it
                p = e
                while p is not None and not p.name.startswith("autograd::engine::evaluate_function"):
                    p = p.cpu_parent
                if p is not None and p.sequence_nr in fwd_cat:
                    c = fwd_cat[p.sequence_nr]
            out[c if c in out else "other"] += t
        return out

    def split(self, wall_s: float) -> dict[str, float]:
        """Fractions of the step's wall time; what the profile did not see counts as 'other'."""
        sec = self.seconds()
        seen = sum(sec.values())
        scale = wall_s if wall_s > seen else seen
        frac = {k: v / scale for k, v in sec.items()}
        frac["other"] += max(0.0, 1 - sum(frac.values()))
        return {k: round(v, 4) for k, v in frac.items()}


def profile_step(tr) -> tuple[dict, dict[str, float], float]:
    """Run one `Trainer` step under the profiler: (its outputs, the split, its wall seconds).

    The wall time includes the host sync that ends the step (only profiled steps pay it)."""
    import time

    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    with StepProfiler(tr.model, cuda=tr.device.type == "cuda") as sp:
        tr.split_profiler = sp  # train_step opens its data_wait / optimizer ranges
        try:
            sync()
            t0 = time.perf_counter()
            out = tr.train_step()
            sync()
            dt = time.perf_counter() - t0
        finally:
            tr.split_profiler = None
    return out, sp.split(dt), dt
