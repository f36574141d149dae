"""A compiled training step: the loss and its gradients as one traced tensor program.

Pyro traces and scores the model and guide in Python on every step (effect handlers, trace
dictionaries, site checks); the tensors it computes are the same from step to step for a
model of static structure. :class:`CompiledStep` records them once: ``make_fx`` traces one
eager step (the loss of ``objective(model, guide)``, then ``torch.autograd.grad``) into an
FX graph of ATen operations, forward and backward, with the parameters, buffers, the batch and
the KL weight as its inputs. Replaying that graph gives the step without any of Pyro's Python
work; ``torch.compile`` (Inductor) then fuses its elementwise work. Random draws are graph
operations, so every step draws afresh.

A trace is only right for a step with the same structure, so each is checked before use:

- one graph per signature (batch shape, dtype, device, the number of True entries of each
  boolean input, and every submodule's train/eval mode and ``base_only`` switch), so a last
  smaller batch, a batch with another number of labelled rows (whose selection sets the
  shapes inside the step) or the end of a guide warm-up traces anew;
- Python that reads a tensor's value (``.item()``, ``if tensor:``) runs at trace time and
  its result is frozen into the graph, so the next step with that signature runs eagerly and
  the replayed graph, from the same random state, must give the same loss, the same gradients
  and consume the same random numbers; a step that differs is not compiled, and training
  goes on eagerly with one line that says why;
- a KL schedule whose weight changes from step to step feeds the weight as a graph input.

Inductor compiles the graph of a signature once it has been replayed
:data:`COMPILE_AFTER_REPLAYS` times (the full batch of a training run at its first steps, the
last smaller batch only in long runs); until then the FX graph is replayed, which already
skips Pyro's Python. On the CPU, the compiled graph runs its
float32 linear layers through oneDNN with the weight packed for the batch
(:func:`onednn_linears`), which is faster than the BLAS ``addmm`` torch calls eagerly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pyrovae.inference.algorithms.schedules import KLWeight

__all__ = [
    "AUTO_MIN_STEPS",
    "COMPILE_AFTER_REPLAYS",
    "COMPILE_MODES",
    "ONEDNN_MIN_ROWS",
    "CompiledStep",
    "NotCompilable",
    "TracedProgram",
    "compile_wanted",
    "onednn_linears",
]

COMPILE_MODES = ("auto", "on", "off")
"""``train.compile``: ``"auto"`` compiles runs of at least :data:`AUTO_MIN_STEPS` steps."""

AUTO_MIN_STEPS = 4000
"""Under ``"auto"``, a fit of at least this many optimizer steps compiles its step.

Measured on 2 CPU cores (benchmarks/train_overhead.py, MNIST 784-400-50, batch 128): the trace
and the Inductor compile cost about 10 s once, and the compiled step saves about 2 ms of 9 ms,
so the compile pays for itself after about 5,000 steps (ten MNIST epochs); shorter fits (tests,
smoke runs, the digits data) train eagerly."""

COMPILE_AFTER_REPLAYS = 8
"""A verified graph is compiled by Inductor (seconds) once it has been replayed this often, so
that signatures met once or twice (a last smaller block) only replay their FX graph."""

# A replayed step agrees with the eager one to this relative norm (float32 sums reordered).
_RTOL = 1e-4


class NotCompilable(Exception):
    """A part of the step that the tracer cannot replay; the message says which."""


def compile_wanted(mode: str | bool, count: int, threshold: int = AUTO_MIN_STEPS) -> bool:
    """Whether work of ``count`` steps (or passes) compiles under ``mode`` (see
    :data:`COMPILE_MODES`; ``True`` / ``False`` are ``"on"`` / ``"off"``); ``"auto"``
    compiles from ``threshold`` on."""
    if isinstance(mode, bool):
        return mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and count >= threshold)


@dataclass
class _Graph:
    replay: Callable[..., Any]
    verified: bool = False
    replays: int = 0
    compiled: Callable[..., Any] | None = None


class TracedProgram:
    """A computation on a module's parameters, traced once per signature and replayed.

    Subclasses define :meth:`_run`, the eager computation; this class traces it (``make_fx``,
    the module's parameters and buffers as graph inputs through ``functional_call``),
    verifies the trace against an eager run on the next call with the same signature, and
    compiles a verified graph with Inductor once it has been replayed
    :data:`COMPILE_AFTER_REPLAYS` times.

    Args:
        module: the module whose parameters and buffers the computation reads.
        params: the parameters passed to :meth:`_run` (to differentiate by), all of ``module``.
        inductor: compile verified graphs with ``torch.compile``.
        what: what is traced, for the line that says a signature runs eagerly.
    """

    def __init__(self, module: nn.Module, params: list[Tensor], inductor: bool, what: str) -> None:
        names = {id(p): name for name, p in module.named_parameters()}
        if any(id(p) not in names for p in params):
            raise NotCompilable("some trained parameters are pyro.param sites, not module ones")
        self._module = module
        self.params = params
        self.inductor = inductor
        self.what = what
        self._param_names = [names[id(p)] for p in params]
        self._other_names = [
            name for name, p in module.named_parameters() if id(p) not in {id(q) for q in params}
        ]
        self._buffers = dict(module.named_buffers())
        self._graphs: dict[tuple, _Graph | None] = {}
        self.reasons: list[str] = []
        """Why signatures were left eager, in order (each printed once)."""

    @property
    def module(self) -> nn.Module:
        """The module whose parameters and buffers are the graphs' inputs."""
        return self._module

    def _run(self, params: list[Tensor], *inputs: Any) -> Any:
        """The eager computation: a tuple of tensors (and Nones, lists of them)."""
        raise NotImplementedError

    def run(self, *inputs: Any) -> Any:
        """``_run(params, *inputs)``: traced, verified or replayed, by signature. Tensor
        inputs are graph inputs; other inputs are part of the signature."""
        key = self._signature(inputs)
        if key not in self._graphs:
            return self._trace(key, inputs)
        graph = self._graphs[key]
        if graph is None:
            return self._run(self.params, *inputs)
        if not graph.verified:
            return self._verify(key, graph, inputs)
        if self.inductor and graph.compiled is None:
            graph.replays += 1
            if graph.replays >= COMPILE_AFTER_REPLAYS:
                graph.compiled = torch.compile(onednn_linears(graph.replay), dynamic=False)
        run = graph.compiled if graph.compiled is not None else graph.replay
        with torch.no_grad():
            return run(*self._state(), self._tensors(inputs))

    @property
    def compiled_signatures(self) -> int:
        """How many signatures run from a verified graph."""
        return sum(1 for g in self._graphs.values() if g is not None and g.verified)

    @property
    def inductor_signatures(self) -> int:
        """How many signatures run a graph compiled by Inductor."""
        return sum(1 for g in self._graphs.values() if g is not None and g.compiled is not None)

    def _state(self) -> tuple[list[Tensor], list[Tensor]]:
        rest = list(self._buffers.values())
        if self._other_names:
            others = dict(self.module.named_parameters())
            rest = [others[n].detach() for n in self._other_names] + rest
        return [p.detach() for p in self.params], rest

    @staticmethod
    def _tensors(inputs: tuple) -> list[Tensor]:
        """The tensors of the inputs, those inside containers and dataclasses registered as
        pytrees (a labelled batch) included: the graph's data inputs."""
        return [i for i in pytree.tree_leaves(inputs) if isinstance(i, Tensor)]

    def _trace(self, key: tuple, inputs: tuple) -> Any:
        """Traces on these inputs, then replays from the same random state: the result, and
        the graph for the next calls with this signature."""
        device = self._tensors(inputs)[0].device
        before = _rng_state(device)
        leaves, structure = pytree.tree_flatten(inputs)
        statics = [None if isinstance(i, Tensor) else i for i in leaves]
        names = self._param_names + self._other_names + list(self._buffers)
        bound = _Bound(self.module, self._run)

        def joint(params: list[Tensor], rest: list[Tensor], tensors: list[Tensor]) -> Any:
            state = {f"module.{n}": t for n, t in zip(names, [*params, *rest], strict=True)}
            feed = iter(tensors)
            args = pytree.tree_unflatten(
                [next(feed) if s is None else s for s in statics], structure
            )
            with _ConcreteScalars():
                return functional_call(bound, state, (params, *args))

        try:
            params, rest = list(self.params), self._state()[1]
            replay = make_fx(joint)(params, rest, self._tensors(inputs))
        except Exception as err:  # the tracer's failures have no common type
            _set_rng_state(device, before)
            self._give_up(key, f"it could not be traced ({_first_line(err)})")
            return self._run(self.params, *inputs)
        _set_rng_state(device, before)
        self._graphs[key] = _Graph(replay)
        with torch.no_grad():
            return replay(*self._state(), self._tensors(inputs))

    def _verify(self, key: tuple, graph: _Graph, inputs: tuple) -> Any:
        """Runs eagerly and replays the graph from the same random state; keeps the graph
        only if both agree. The eager result is returned."""
        device = self._tensors(inputs)[0].device
        before = _rng_state(device)
        eager = self._run(self.params, *inputs)
        after = _rng_state(device)
        _set_rng_state(device, before)
        try:
            with torch.no_grad():
                replayed = graph.replay(*self._state(), self._tensors(inputs))
        except Exception as err:  # a shape frozen into the graph, e.g.; no common type
            _set_rng_state(device, after)
            self._give_up(key, f"its replay failed ({_first_line(err)})")
            return eager
        consumed_same = _rng_equal(_rng_state(device), after)
        _set_rng_state(device, after)
        problem = _difference(_leaves(eager), _leaves(replayed), consumed_same)
        if problem is not None:
            self._give_up(key, problem)
            return eager
        graph.verified = True
        return eager

    def _give_up(self, key: tuple, reason: str) -> None:
        self._graphs[key] = None
        shape = "x".join(map(str, key[0][0])) if key[0] else "?"
        line = f"pyrovae: the {self.what} for inputs of shape {shape} runs eagerly: {reason}"
        self.reasons.append(line)
        print(line, file=sys.stderr)

    def _signature(self, inputs: tuple) -> tuple:
        tensors = self._tensors(inputs)
        shapes = tuple(tuple(t.shape) for t in tensors)
        kinds = tuple((t.dtype, t.device) for t in tensors)
        # A boolean input selects rows (a labelled batch's ``known``): the shapes of what it
        # selects are traced as constants, so its count is part of the signature.
        counts = tuple(int(t.sum()) for t in tensors if t.dtype == torch.bool)
        leaves, structure = pytree.tree_flatten(inputs)
        statics = (tuple(i for i in leaves if not isinstance(i, Tensor)), structure)
        modes = tuple((m.training, getattr(m, "base_only", None)) for m in self.module.modules())
        return (shapes, kinds, statics, modes, counts)


class CompiledStep(TracedProgram):
    """``loss_fn(x)`` and the gradients of ``loss_fn(x) / len(x)`` w.r.t. ``params``, traced.

    Args:
        loss_fn: the loss module ``objective(model, guide)`` (an ``nn.Module`` whose model and
            guide are ``nn.Module`` programs).
        params: the parameters the optimizer steps, all of them parameters of ``loss_fn``.
        kl_schedule: the run's KL schedule, or None. One whose handler is a ``KLWeight`` (or
            none, for weight 1) feeds the step's weight as an input; one whose handler is the
            same object at every step (free bits) is traced under it.
        inductor: compile the main graph with ``torch.compile``; False replays the FX graph.

    Raises:
        NotCompilable: programs that are not modules, parameters outside ``loss_fn``, or a
            KL schedule that is neither kind.

    Example:
        >>> import torch
        >>> from pyrovae.inference import elbo
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.model import VAE, Gaussian, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> loss_fn = elbo()(vae, guide)
        >>> step = CompiledStep(loss_fn, list(loss_fn.parameters()), inductor=False)
        >>> x = torch.randn(8, 5)
        >>> loss, grads = step(x, step=0)  # traced
        >>> loss, grads = step(x, step=1)  # checked against the eager step, then replayed
        >>> loss.shape, len(grads) == len(list(loss_fn.parameters())), step.reasons
        (torch.Size([]), True, [])
    """

    def __init__(
        self,
        loss_fn: nn.Module,
        params: list[Tensor],
        kl_schedule: Any = None,
        inductor: bool = True,
    ) -> None:
        programs = (getattr(loss_fn, "model", None), getattr(loss_fn, "guide", None))
        if not all(isinstance(p, nn.Module) for p in programs):
            raise NotCompilable("the model and guide are not both nn.Modules")
        super().__init__(loss_fn, params, inductor, "training step")
        self.loss_fn = loss_fn
        self._weight, self._handler = _schedule_parts(kl_schedule)

    def __call__(self, x: Any, step: int) -> tuple[Tensor, list[Tensor | None]]:
        """The detached loss (summed over the batch) and the per-parameter gradients of the
        batch mean, for optimizer step ``step`` (the KL weight's step)."""
        loss, grads = self.run(x, self._weight(step, x))
        return loss, list(grads)

    def _run(self, params: list[Tensor], x: Any, weight: Tensor) -> Any:
        with self._handler(weight):
            loss = self.loss_fn(x)
        grads = torch.autograd.grad(loss / x.shape[0], params, allow_unused=True)
        return loss.detach(), tuple(grads)


def onednn_linears(graph: fx.GraphModule) -> fx.GraphModule:
    """The graph with each float32 CPU linear layer run by oneDNN, the weight packed per call.

    ``aten.addmm(bias, x, aten.t(weight))`` (what ``nn.Linear`` traces to) becomes one call of
    oneDNN's linear on a weight reordered for ``x``'s rows, where ``x`` has at least
    :data:`ONEDNN_MIN_ROWS` rows. On a 2-core AMD EPYC the 784-400 layers of the MNIST VAE run
    about 15% faster than through ``addmm`` (MKL). Other devices and dtypes, and torch builds
    without oneDNN, keep the graph as it is. The graph is edited in place.
    """
    if not _onednn_available():
        return graph
    linear = _onednn_linear()
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.addmm.default:
            continue
        bias, x, weight_t = node.args
        if node.kwargs or not (
            isinstance(weight_t, fx.Node) and weight_t.target is torch.ops.aten.t.default
        ):
            continue
        weight = weight_t.args[0]
        values = [getattr(n, "meta", {}).get("val") for n in (bias, x, weight)]
        if not all(
            isinstance(v, Tensor) and v.device.type == "cpu" and v.dtype == torch.float32
            for v in values
        ) or (values[0].dim() != 1 or values[1].dim() != 2 or len(values[1]) < ONEDNN_MIN_ROWS):
            continue
        with graph.graph.inserting_before(node):
            packed = graph.graph.call_function(linear, (x, weight, bias))
        packed.meta = dict(node.meta)
        node.replace_all_uses_with(packed)
        graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


ONEDNN_MIN_ROWS = 512
"""Linear layers on fewer rows keep ``addmm``: the weight's reorder (about 0.3 ms for 784 x 400)
costs more than oneDNN saves on them."""


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


_LINEAR = None


def _onednn_linear() -> Any:
    """``pyrovae::onednn_linear(x, weight, bias)``: ``F.linear`` through oneDNN, registered as
    a custom operator (once, when first needed) so that Inductor calls it as one kernel."""
    global _LINEAR
    if _LINEAR is None:

        @torch.library.custom_op("pyrovae::onednn_linear", mutates_args=())
        def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, x.shape[0])
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

        @onednn_linear.register_fake
        def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            return x.new_empty(x.shape[0], weight.shape[0])

        _LINEAR = torch.ops.pyrovae.onednn_linear.default
    return _LINEAR


def _schedule_parts(
    schedule: Any,
) -> tuple[Callable[[int, Tensor], Tensor], Callable[[Tensor], AbstractContextManager]]:
    """The KL weight of a step as a tensor, and the handler a step runs under given it."""
    none = torch.ones(())

    def no_weight(step: int, x: Tensor) -> Tensor:
        return none.to(x.device, x.dtype)

    if schedule is None:
        return no_weight, lambda weight: nullcontext()
    handler = schedule.handler(0)
    if schedule.handler(1) is handler:  # the same handler at every step (free bits)
        return no_weight, lambda weight: handler

    def weight(step: int, x: Tensor) -> Tensor:
        handler = schedule.handler(step)
        if isinstance(handler, nullcontext):
            beta = 1.0
        elif isinstance(handler, KLWeight) and not isinstance(handler.beta, Tensor):
            beta = handler.beta
        else:
            raise NotCompilable(
                f"the KL schedule {type(schedule).__name__} has a handler that is neither a "
                "KL weight nor the same at every step"
            )
        return torch.tensor(beta, dtype=x.dtype, device=x.device)

    weight(0, torch.zeros(()))  # refuses other schedules now, not in the first step
    return weight, KLWeight


class _ConcreteScalars(TorchDispatchMode):
    """Lets Python read a tensor's value while tracing (Pyro's ``.item()`` for the reported
    loss, ``warn_if_nan``): the value is computed, not recorded, so it is frozen into the
    graph; :meth:`CompiledStep._verify` finds steps where that matters."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is torch.ops.aten._local_scalar_dense.default:
            with disable_proxy_modes_tracing():
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _difference(eager: list, replayed: list, consumed_same: bool) -> str | None:
    """Why a replayed run differs from the eager one, or None."""
    if not consumed_same:
        return "the trace draws different random numbers than the eager run"
    if len(eager) != len(replayed):
        return "the trace returns other outputs than the eager run"
    for a, b in zip(eager, replayed, strict=True):
        if (a is None) != (b is None) or (a is not None and not _close(a, b)):
            value = (
                f" ({b.item():.6g} against {a.item():.6g})"
                if a is not None and a.numel() == 1
                else ""
            )
            return (
                f"the traced result differs from the eager one{value}; it reads tensor values "
                "in Python"
            )
    return None


def _leaves(value: Any) -> list[Tensor | None]:
    if isinstance(value, tuple | list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


class _Bound(nn.Module):
    """Calls ``fn`` as its forward, so that ``functional_call`` can give ``module`` (its only
    submodule) other parameter and buffer tensors while ``fn`` runs."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def _close(a: Tensor, b: Tensor) -> bool:
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return bool(
            torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
    scale = max(a.norm().item(), 1e-30)
    return (a - b).norm().item() <= _RTOL * scale + 1e-12


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _rng_equal(a: Tensor, b: Tensor) -> bool:
    return bool(torch.equal(a, b))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
