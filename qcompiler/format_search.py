"""Searching number formats for a network's weights: candidates run in onnxruntime, costs modelled.

A candidate is an assignment of one format per weight layer (and one activation format for the
network). `FormatEvaluator` builds it as ONNX (each weight lowered with `lower_constant`, so the
runtime computes exactly the format's values; each layer input fake-quantized in the activation
format) and measures its outputs against the float model's on held-out samples: output SQNR,
and top-1 accuracy where the data has labels.

Two strategies share it:

- ``network``: every format for all layers at once, cheapest first (Hill et al.'s search, over
  formats instead of one network's fixed-point grid), one evaluation per format;
- ``layer``: the damage of each layer alone in each format (one evaluation each), then the
  assignment with the least modelled energy whose summed output noise fits the goal, exactly
  (an integer program, `qcompiler.precision_ilp.solve_ilp` with the roles of cost and damage
  swapped), checked end to end at a bracketed series of noise budgets (loosened while the answer
  meets the goal, tightened while it misses: the noises of layers add only approximately, and a
  top-1 goal has no noise equivalent).

Candidates run as the written model will, all onnxruntime optimizations on: formats it has kernels
for (int8 with uint8 activations) run in them, with pair-safe weights where this CPU's kernels add
int16 pairs; the others are dequantized and accumulate in fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompiler.data import DataSource
from qcompiler.energy_model import EnergyTable
from qcompiler.errors import QCError
from qcompiler.format_lowering import FLOAT8_STORAGE, lower_constant
from qcompiler.format_metadata import FORMAT_KEY
from qcompiler.ir import copy_model, to_proto
from qcompiler.op_roles import input_roles
from qcompiler.quant.formats import IntFormat, NumberFormat, parse_format
from qcompiler.quant.uniform import affine_params, sqnr_db
from qcompiler.runtime import make_session, run_checked, with_extra_outputs

FP32 = parse_format("fp32")
#: Activation formats a candidate can fake-quantize its layer inputs in (what QuantizeLinear stores, or a Cast).
ACTIVATION_FORMATS = ("fp32", "fp16", "uint8", "int8", "e4m3fn", "e5m2")


@dataclass(frozen=True)
class WeightLayer:
    """A layer whose weight is a constant: what the search assigns a format to."""

    node: str
    op_type: str
    weight: str
    input: str
    axis: int | None  # output-channel axis: per-channel scales
    block_axis: int  # reduction axis: block formats' blocks
    params: int
    macs: int


def weight_layers(model: ir.Model) -> list[WeightLayer]:
    """The Conv/ConvTranspose/Gemm/MatMul layers of ``model`` with a float constant weight."""
    from qcompiler.cost_model import node_macs
    from qcompiler.quant.weights import block_axis

    layers = []
    for node in model.graph:
        roles = input_roles(node)
        if roles.weight is None or roles.weight >= len(node.inputs) or not roles.activations:
            continue
        w, x = node.inputs[roles.weight], node.inputs[roles.activations[0]]
        if w is None or x is None or w.const_value is None or w.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        shape = tuple(w.const_value.shape)
        axis = roles.weight_axis if len(shape) > 1 else None
        blocks = block_axis(node, axis if axis is not None else 0, len(shape)) if len(shape) > 1 else 0
        layers.append(WeightLayer(node.name, node.op_type, w.name, x.name, axis, blocks, math.prod(shape), node_macs(node, shape)))
    if not layers:
        raise QCError("no layer with a constant float weight (Conv, ConvTranspose, Gemm, MatMul) to search formats for", pass_name="search-formats")
    return layers


@dataclass
class Measurement:
    """One candidate as onnxruntime ran it on the held-out samples."""

    sqnr_db: float
    noise: float  # mean squared output error against the float model
    top1: float | None  # % on the labels, when the data has them
    seconds: float
    failed: bool = False
    #: Coefficient of determination of the outputs against the float model's (Hill et al.'s predictor input).
    r2: float = float("nan")
    #: How many of the held-out samples it ran on (the first ones).
    samples: int = 0
    #: Whether it ran as the written model does (`FormatEvaluator.measure`) or in the probe session.
    full: bool = True


@dataclass
class FormatEvaluator:
    """Builds and measures candidates of ``model`` on ``data`` (held-out samples), in this
    process or in ``workers`` worker processes (`measure_many`)."""

    model: ir.Model
    data: DataSource
    activation_format: NumberFormat
    output: str
    #: The CPU's int16 pair-sum limit (`TensorRule.pair_sum_limit`): 8-bit integer weights get
    #: pair-safe scales, so the fused kernels onnxruntime runs them in compute what was measured.
    pair_sum_limit: int | None = None
    #: Worker processes for `measure_many` (1: all in this process).
    workers: int = 1
    #: Where the workers run: local ``process``es, or ``ray`` actors (a local Ray with
    #: ``workers`` CPUs, or the cluster at ``ray_address``). The same evaluation either way.
    executor: str = "process"
    ray_address: str = ""
    #: onnxruntime intra-op threads per session (0: its default; workers use 1 each).
    threads: int = 0
    evaluations: int = 0
    #: Runs in the shared probe session (`probe`), counted apart from full evaluations.
    probes: int = 0
    #: Candidates whose evaluation failed twice (a worker that died): reported, not fatal.
    failed: int = 0
    _float: np.ndarray | None = field(default=None, repr=False)
    _ranges: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)
    _layers: list[WeightLayer] = field(default_factory=list, repr=False)
    _pool: object = field(default=None, repr=False)
    _ray_started: bool = field(default=False, repr=False)
    _probe_session: object = field(default=None, repr=False)
    _values: dict = field(default_factory=dict, repr=False)
    _weights: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._layers = weight_layers(self.model)
        if self._float is not None:
            return  # a worker's copy: the reference outputs and ranges came with it
        inputs = sorted({layer.input for layer in self._layers})
        proto = with_extra_outputs(to_proto(self.model), inputs)
        session = make_session(proto, what="float model", threads=self.threads)
        names = [o.name for o in session.get_outputs()]
        feeds = self.data.arrays
        results = run_checked(session, None, feeds, what="float model", data=self.data.origin)
        by_name = dict(zip(names, results))
        self._float = np.asarray(by_name[self.output], np.float64)
        # The activation quantizers' ranges: min and max of each layer input on these samples.
        self._ranges = {name: (float(np.min(by_name[name])), float(np.max(by_name[name]))) if by_name[name].size else (0.0, 1.0) for name in inputs}

    def _state(self) -> tuple:
        """What a worker needs to rebuild this evaluator without rerunning the float model."""
        return (to_proto(self.model).SerializeToString(), self.data.arrays, self.data.labels, self.activation_format.name, self.output,
                self.pair_sum_limit, self._float, self._ranges)

    def measure_many(self, candidates: list[dict[str, NumberFormat]], as_run: bool = True, samples: int | None = None) -> list[Measurement]:
        """`measure` for each candidate, spread over the worker processes. A candidate whose
        worker dies is tried once more in a fresh pool, then reported failed (SQNR -inf)."""
        # A worker process costs about two seconds of imports before its first result, more than a
        # full evaluation of a CIFAR network: a batch no larger than the pool (the predictor's guess
        # and its neighbour, halving's finalists) runs here, one candidate after the other on all
        # cores, unless the pool is already up.
        small_batch = self._pool is None and len(candidates) <= self.workers
        if (self.executor == "process" and (self.workers <= 1 or small_batch)) or len(candidates) <= 1:
            return [self.measure(c, as_run, samples) for c in candidates]
        results: list[Measurement | None] = [None] * len(candidates)
        named = [{k: v.name for k, v in c.items()} for c in candidates]
        pending = list(range(len(candidates)))
        for attempt in range(2):
            done, pending = self._run_on_workers(named, pending, as_run, samples, fresh=attempt > 0)
            for i, m in done.items():
                results[i] = m
                self.evaluations += 1
            if not pending:
                break
        for i in pending:
            self.failed += 1
            results[i] = Measurement(float("-inf"), float("inf"), None, 0.0, failed=True)
        return [r for r in results if r is not None]

    def _run_on_workers(self, named: list[dict[str, str]], indices: list[int], as_run: bool, samples: int | None, fresh: bool) -> tuple[dict[int, Measurement], list[int]]:
        """Measure ``named[i]`` for each ``i`` on the workers: (results, indices whose worker died)."""
        done: dict[int, Measurement] = {}
        lost: list[int] = []
        if self.executor == "ray":
            actors = self._ray_actors(fresh)  # first: says which extra to install without Ray
            import ray

            refs = {i: actors[k % len(actors)].measure.remote(named[i], as_run, samples) for k, i in enumerate(indices)}
            for i, ref in refs.items():
                try:
                    done[i] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    lost.append(i)
            return done, lost
        from concurrent.futures.process import BrokenProcessPool

        pool = self._worker_pool(fresh)
        futures = {i: pool.submit(_measure_in_worker, named[i], as_run, samples) for i in indices}
        for i, future in futures.items():
            try:
                done[i] = future.result()
            except BrokenProcessPool:
                lost.append(i)
        return done, lost

    def _ray_actors(self, fresh: bool) -> list:
        try:
            import ray
        except ImportError:
            raise QCError("executor=ray needs Ray: pip install 'qcompiler[ray]' (or pip install ray)", pass_name="search-formats", option="executor") from None
        if self._pool is not None and not fresh:
            return self._pool
        for dead in self._pool or []:
            ray.kill(dead)
        if not ray.is_initialized():
            if self.ray_address:
                ray.init(address=self.ray_address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=max(self.workers, 1), include_dashboard=False, log_to_driver=False)
                self._ray_started = True
        actor = ray.remote(num_cpus=1)(_RayWorker)
        state = ray.put(self._state())
        self._pool = [actor.remote(state) for _ in range(max(self.workers, 1))]
        return self._pool

    def _worker_pool(self, fresh: bool = False):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is not None and not fresh:
            return self._pool
        self.close()
        # spawn: a forked child would inherit onnxruntime's and torch's thread pools mid-state.
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(self._state(),))
        return self._pool

    def close(self) -> None:
        """Stop the worker processes or actors (and a Ray this evaluator started)."""
        if self._pool is not None:
            if isinstance(self._pool, list):
                import ray

                for actor in self._pool:
                    ray.kill(actor)
            else:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    @property
    def layers(self) -> list[WeightLayer]:
        return self._layers

    @property
    def signal(self) -> float:
        """Mean squared float output: the SQNR's numerator."""
        return float(np.mean(self._float**2))

    def build(self, formats: dict[str, NumberFormat]) -> ir.Model:
        """``model`` with each weight in ``formats`` (by weight name; absent: float) lowered, and
        every layer input fake-quantized in the activation format."""
        model = copy_model(self.model)
        graph = model.graph
        nodes = {n.name: n for n in graph}
        first = graph[0]
        for layer in self._layers:
            fmt = formats.get(layer.weight)
            if fmt is None or fmt == FP32:
                continue
            node = nodes[layer.node]
            index = input_roles(node).weight
            w = node.inputs[index]
            lowered = lower_constant(f"{layer.weight}_{layer.node}".replace("/", "_"), w.const_value.numpy().astype(np.float32), fmt, axis=layer.axis,
                                     block_axis=layer.block_axis, pair_sum_limit=self.pair_sum_limit)
            for init in lowered.initializers:
                graph.register_initializer(init)
            for n in lowered.nodes:
                graph.insert_before(first, n)
            node.replace_input_with(index, lowered.output)
            if not w.uses() and w.name in graph.initializers and w not in graph.outputs:
                del graph.initializers[w.name]  # the float weight, now read by no one
        if self.activation_format != FP32:
            values = {v.name: v for n in graph for v in n.inputs if v is not None} | {v.name: v for v in graph.inputs}
            for name in sorted({layer.input for layer in self._layers}):
                self._fake_quantize(graph, values[name], first)
        return model

    def _fake_quantize(self, graph: ir.Graph, value: ir.Value, before: ir.Node) -> None:
        fmt = self.activation_format
        readers = [(u.node, u.idx) for u in value.uses()]
        if fmt.name == "fp16":
            down = ir.Node("", "Cast", [value], attributes={"to": ir.AttrInt64("to", ir.DataType.FLOAT16)})
            up = ir.Node("", "Cast", [down.outputs[0]], attributes={"to": ir.AttrInt64("to", ir.DataType.FLOAT)})
            new_nodes, out = [down, up], up.outputs[0]
        else:
            lo, hi = self._ranges.get(value.name, (0.0, 1.0))
            if isinstance(fmt, IntFormat):
                # Affine onto [0, max] unsigned (zero on an integer code, as calibrate does), symmetric signed.
                scale, zp = affine_params(lo, hi, -int(fmt.max_value) if fmt.signed else 0, int(fmt.max_value), symmetric=fmt.signed)
                zero = np.array(zp, np.uint8 if not fmt.signed else np.int8)
            else:
                top = int(fmt.max_value)
                scale, _ = affine_params(lo, hi, -top, top, symmetric=True)
                zero = np.array(0, FLOAT8_STORAGE[fmt.name][1])
            s = ir.Value(name=f"{value.name}_search_scale", const_value=ir.tensor(np.array(scale, np.float32)))
            z = ir.Value(name=f"{value.name}_search_zero_point", const_value=ir.tensor(zero))
            graph.register_initializer(s)
            graph.register_initializer(z)
            q = ir.Node("", "QuantizeLinear", [value, s, z])
            dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, z])
            dq.metadata_props[FORMAT_KEY] = fmt.name
            new_nodes, out = [q, dq], dq.outputs[0]
        out.dtype, out.shape = ir.DataType.FLOAT, value.shape
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, new_nodes)
        else:
            graph.insert_before(before, new_nodes)
        for node, idx in readers:
            node.replace_input_with(idx, out)

    def measure(self, formats: dict[str, NumberFormat], as_run: bool = True, samples: int | None = None) -> Measurement:
        """Build the candidate, run it in onnxruntime and compare its outputs with the float model's.

        ``as_run``: all optimizations on, as onnxruntime runs the written model (its integer
        kernels included). False: basic optimizations, the formats' own numerics; what the
        per-layer damage is measured with, because with some layers left float onnxruntime
        (1.2x's weight-bias quantization) quantizes those float weights itself next to
        quantized activations, which would charge their error to the layer being measured.
        ``samples``: only the first that many held-out samples (all: None)."""
        start = time.perf_counter()
        model = self.build(formats)
        session = make_session(to_proto(model), optimize=as_run, what="candidate", threads=self.threads)
        n = self._count(samples)
        feeds = {k: a[:n] for k, a in self.data.arrays.items()}
        y = np.asarray(run_checked(session, [self.output], feeds, what="candidate", data=self.data.origin)[0], np.float64)
        self.evaluations += 1
        return self._compare(y, n, start, full=True)

    def probe(self, formats: dict[str, NumberFormat], samples: int) -> Measurement:
        """The candidate on the first ``samples`` held-out samples in one session shared by every
        candidate: the weights are its inputs, fed with the values each format's lowering computes
        (`lower_constant(...).values`), the activations fake-quantized as in `build`. The formats'
        own numerics without a session per candidate (onnxruntime's integer kernels not in the
        loop): what the predictor and the first rungs of successive halving run on."""
        start = time.perf_counter()
        if self._probe_session is None:
            model = self.build({})
            nodes = {n.name: n for n in model.graph}
            for i, layer in enumerate(self._layers):
                node = nodes[layer.node]
                index = input_roles(node).weight
                w = node.inputs[index]
                value = ir.Value(name=f"qc_probe_weight_{i}", shape=ir.Shape(list(w.const_value.shape)), type=ir.TensorType(ir.DataType.FLOAT))
                model.graph.inputs.append(value)
                node.replace_input_with(index, value)
            self._probe_session = make_session(to_proto(model), optimize=False, what="probe", threads=self.threads)
        n = self._count(samples)
        feeds = {k: a[:n] for k, a in self.data.arrays.items()}
        for i, layer in enumerate(self._layers):
            feeds[f"qc_probe_weight_{i}"] = self.weight_values(layer, formats.get(layer.weight, FP32))
        y = np.asarray(run_checked(self._probe_session, [self.output], feeds, what="probe", data=self.data.origin)[0], np.float64)
        self.probes += 1
        return self._compare(y, n, start, full=False)

    def weight_values(self, layer: WeightLayer, fmt: NumberFormat) -> np.ndarray:
        """The float32 values ``layer``'s weight has in ``fmt`` as onnxruntime computes them (cached)."""
        key = (layer.weight, fmt.name)
        if key not in self._values:
            if not self._weights:  # read once, on the first probe: workers never need them
                values = {v.name: v for n in self.model.graph for v in n.inputs if v is not None}
                self._weights = {lay.weight: values[lay.weight].const_value.numpy().astype(np.float32) for lay in self._layers}
            w = self._weights[layer.weight]
            self._values[key] = w if fmt == FP32 else lower_constant("probe", w, fmt, axis=layer.axis, block_axis=layer.block_axis,
                                                                      pair_sum_limit=self.pair_sum_limit).values.astype(np.float32)
        return self._values[key]

    def _count(self, samples: int | None) -> int:
        return self.data.num_samples if samples is None else max(1, min(samples, self.data.num_samples))

    def _compare(self, y: np.ndarray, n: int, start: float, full: bool) -> Measurement:
        ref = self._float[:n]
        noise = float(np.mean((y - ref) ** 2))
        top1 = self._top1(y)
        spread = float(np.sum((ref - ref.mean()) ** 2))
        r2 = 1.0 - float(np.sum((y - ref) ** 2)) / spread if spread > 0 else float("nan")
        return Measurement(sqnr_db(ref, y), noise, top1, time.perf_counter() - start, r2=r2, samples=n, full=full)

    def _top1(self, y: np.ndarray) -> float | None:
        """Top-1 % of outputs ``y`` for the first ``len(y)`` held-out samples (None: no labels, or not a classifier)."""
        if self.data.labels is None or y.ndim != 2:
            return None
        return float(np.mean(np.argmax(y, axis=1) == np.asarray(self.data.labels).reshape(-1)[: len(y)]) * 100)

    def float_top1_on(self, samples: int | None) -> float | None:
        """The float model's top-1 on the first ``samples`` held-out samples (all: None)."""
        return self._top1(self._float[: self._count(samples)])

    def float_top1(self) -> float | None:
        """The float model's top-1 on all the held-out samples."""
        return self.float_top1_on(None)


def layer_energy_pj(layer: WeightLayer, fmt: NumberFormat, activation: NumberFormat, table: EnergyTable) -> float:
    """Modelled energy of one layer's MACs and weight reads with its weight in ``fmt``."""
    return layer.macs * table.mac_pj(fmt, activation) + layer.params * float(fmt.bits) * table.bit_pj(table.weights_from)


def layer_time(layer: WeightLayer, fmt: NumberFormat, activation: NumberFormat, table: EnergyTable) -> float:
    """Modelled time of one layer on an iso-area MAC array, in fp32-MAC times: its MACs times the
    format's MAC energy over fp32's (a MAC's area taken proportional to its energy, as `qc cost`'s
    iso-area speedup does). Memory time is not modelled."""
    return layer.macs * table.mac_pj(fmt, activation) / table.mac_pj(FP32, FP32)


#: The evaluator of a worker process (one per process, built once by `_start_worker`).
_WORKER: FormatEvaluator | None = None


def _start_worker(state: tuple) -> None:
    global _WORKER
    proto, arrays, labels, activation, output, limit, reference, ranges = state
    model = ir.serde.deserialize_model(__import__("onnx").load_from_string(proto))
    _WORKER = FormatEvaluator(model, DataSource(arrays, labels), parse_format(activation), output, pair_sum_limit=limit, threads=1,
                              _float=reference, _ranges=ranges)


def _measure_in_worker(formats: dict[str, str], as_run: bool, samples: int | None = None) -> Measurement:
    assert _WORKER is not None
    return _WORKER.measure({k: parse_format(v) for k, v in formats.items()}, as_run, samples)


class _RayWorker:
    """A Ray actor holding one evaluator (the same as a process worker's)."""

    def __init__(self, state: tuple) -> None:
        _start_worker(state)

    def measure(self, formats: dict[str, str], as_run: bool, samples: int | None = None) -> Measurement:
        return _measure_in_worker(formats, as_run, samples)
