"""Pass manager: analysis caching and invalidation, provenance, instruments, third-party passes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import qcompiler.registry as registry
from qcompiler.analysis import Analysis
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.instruments import DumpDir, VerifyEach
from qcompiler.ir import PROVENANCE_KEY
from qcompiler.pass_manager import Pass, PassContext, PassManager, PassResult
from qcompiler.pipeline import parse_pipeline
from qcompiler.targets.spec import load_target
from tests.helpers import make_model, tensor_info

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class NodeCount(Analysis[int]):
    name = "node-count"
    op_type: str = ""

    def compute(self, model: ir.Model, ctx: PassContext) -> int:
        return sum(1 for n in model.graph if not self.op_type or n.op_type == self.op_type)


class ReadsCount(Pass):
    name = "reads-count"
    preserves = "all"

    def run(self, model, ctx):
        count = ctx.analyses.get(NodeCount(), model, ctx)
        ctx.facts.setdefault("seen", []).append(count)
        return PassResult(model, False, {"count": count})


class AddsIdentity(Pass):
    """Appends an Identity after the output (changes the graph, preserves nothing)."""

    name = "adds-identity"
    tolerance = 0.0

    def run(self, model, ctx):
        out = model.graph.outputs[0]
        node = ir.Node("", "Identity", [out])
        node.outputs[0].dtype, node.outputs[0].shape = out.dtype, out.shape
        model.graph.append(node)
        model.graph.outputs[0] = node.outputs[0]
        return PassResult(model, True)


class AddsIdentityPreserving(AddsIdentity):
    name = "adds-identity-preserving"
    preserves = (NodeCount,)


class BreaksNumerics(Pass):
    """Doubles the first weight but claims to preserve numerics."""

    name = "breaks-numerics"
    tolerance = 1e-6

    def run(self, model, ctx):
        w = next(iter(model.graph.initializers.values()))
        w.const_value = ir.tensor(w.const_value.numpy() * 2, name=w.name)
        return PassResult(model, True)


def _model() -> ir.Model:
    rng = np.random.default_rng(0)
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [tensor_info("x", [None, 2, 3, 3])],
        [tensor_info("y", [None, 2, 3, 3])],
        {"w": rng.normal(0, 1, (2, 2, 1, 1)).astype(np.float32)},
    )


def _ctx(**kw) -> PassContext:
    return PassContext(target=load_target("ort-cpu"), **kw)


def test_analysis_is_cached_until_a_modifying_pass_invalidates_it() -> None:
    ctx = _ctx()
    model = _model()
    PassManager([ReadsCount(), ReadsCount(), AddsIdentity(), ReadsCount()]).run(model, ctx)
    assert ctx.facts["seen"] == [1, 1, 2]
    assert ctx.analyses.stats.computed["node-count"] == 2  # once, then again after the rewrite
    assert ctx.analyses.stats.hits["node-count"] == 1


def test_declared_preserved_analysis_survives_a_rewrite() -> None:
    ctx = _ctx()
    PassManager([ReadsCount(), AddsIdentityPreserving(), ReadsCount()]).run(_model(), ctx)
    # The pass claimed NodeCount stays valid, so the (now stale) cached value is reused: the
    # contract is the pass's to keep, and the manager honours it.
    assert ctx.facts["seen"] == [1, 1]
    assert ctx.analyses.stats.computed["node-count"] == 1


def test_analyses_with_different_parameters_are_cached_separately() -> None:
    ctx = _ctx()
    model = _model()
    assert ctx.analyses.get(NodeCount("Conv"), model, ctx) == 1
    assert ctx.analyses.get(NodeCount("Relu"), model, ctx) == 0
    assert ctx.analyses.get(NodeCount("Conv"), model, ctx) == 1
    assert ctx.analyses.stats.computed["node-count"] == 2


def test_new_nodes_get_unique_names_and_provenance() -> None:
    ctx = _ctx()
    model = _model()
    PassManager([AddsIdentity(), AddsIdentity()]).run(model, ctx)
    added = [n for n in model.graph if n.op_type == "Identity"]
    assert len(added) == 2
    assert all(n.metadata_props[PROVENANCE_KEY] == "adds-identity" for n in added)
    assert all(n.outputs[0].metadata_props[PROVENANCE_KEY] == "adds-identity" for n in added)
    names = [n.name for n in model.graph] + [v.name for n in model.graph for v in n.outputs]
    assert len(names) == len(set(names)) and all(names)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert PROVENANCE_KEY not in conv.metadata_props  # imported nodes are not tagged


def test_timings_record_every_pass() -> None:
    ctx = _ctx()
    PassManager([ReadsCount(), AddsIdentity()]).run(_model(), ctx)
    assert [(name, modified) for name, _, modified, _ in ctx.timings] == [("reads-count", False), ("adds-identity", True)]
    assert all(seconds >= 0 for _, seconds, _, _ in ctx.timings)


def test_a_pass_run_twice_keeps_the_stats_of_each_run() -> None:
    ctx = _ctx()
    PassManager([ReadsCount(), AddsIdentity(), ReadsCount()]).run(_model(), ctx)
    runs = [stats["count"] for name, _, _, stats in ctx.timings if name == "reads-count"]
    assert runs == [ctx.facts["seen"][0], ctx.facts["seen"][0] + 1]  # one Identity more the second time
    assert ctx.stats["reads-count"]["count"] == runs[1]


def test_pass_manager_is_itself_a_pass_and_nests() -> None:
    ctx = _ctx()
    inner = PassManager([AddsIdentity()])
    result = PassManager([inner, inner]).run(_model(), ctx)
    assert result.modified and sum(1 for n in result.model.graph if n.op_type == "Identity") == 2


def test_verify_each_holds_a_pass_to_its_declared_tolerance() -> None:
    data = DataSource({"x": np.ones((4, 2, 3, 3), np.float32)})
    ctx = _ctx(data=data, instruments=[VerifyEach()])
    PassManager([AddsIdentity()]).run(_model(), ctx)  # exact: passes
    with pytest.raises(QCError) as info:
        PassManager([BreaksNumerics()]).run(_model(), _ctx(data=data, instruments=[VerifyEach()]))
    assert info.value.pass_name == "breaks-numerics" and "tolerance" in info.value.message


def test_dump_dir_writes_the_model_after_each_pass(tmp_path: Path) -> None:
    ctx = _ctx(instruments=[DumpDir(tmp_path)])
    PassManager([AddsIdentity(), ReadsCount()]).run(_model(), ctx)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["01-adds-identity.onnx", "02-reads-count.onnx"]
    assert sum(1 for n in ir.load(tmp_path / "01-adds-identity.onnx").graph if n.op_type == "Identity") == 1


def test_plugin_file_registers_a_pass_usable_in_pipelines() -> None:
    registry.load_plugin_file(ROOT / "examples" / "custom_pass.py")
    manager = parse_pipeline("clip-weights{sigmas=2.5}")
    assert manager.passes[0].options.sigmas == 2.5
    with pytest.raises(QCError) as info:
        parse_pipeline("clip-weights{sigmas=-1}")
    assert info.value.pass_name == "clip-weights" and "positive" in info.value.message


def test_entry_point_group_registers_third_party_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "thirdparty_pass.py"
    package.write_text(
        "from qcompiler import Pass, PassResult\n"
        "class Noop(Pass):\n"
        "    '''Does nothing, from an installed distribution.'''\n"
        "    name = 'thirdparty-noop'\n"
        "    def run(self, model, ctx):\n"
        "        return PassResult(model, False)\n"
    )
    dist = tmp_path / "thirdparty_pass-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-pass\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[qcompiler.passes]\nthirdparty-noop = thirdparty_pass:Noop\n")
    # The built-in passes are loaded once, as in any session, and stay loaded: only the entry
    # points are scanned again, so the test does not depend on which modules passes/ holds by now
    # (resetting the whole registry imported any module added there since the session's first
    # load, and failed with that module's ImportError). The registry is a copy: the plugin's pass
    # is not left registered for later tests.
    registry.all_passes()
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    assert "thirdparty-noop" not in registry._registry
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded_entry_points", False)
    try:
        assert registry.get_pass("thirdparty-noop").summary() == "Does nothing, from an installed distribution."
        assert registry.get_pass("thirdparty-noop").__module__ == "thirdparty_pass"
    finally:
        sys.modules.pop("thirdparty_pass", None)


def test_register_pass_rejects_bad_names_and_collisions() -> None:
    class Bad(Pass):
        name = "Not_Kebab"

        def run(self, model, ctx):
            return PassResult(model, False)

    with pytest.raises(TypeError):
        registry.register_pass(Bad)

    class Clash(Pass):
        name = "fold-batchnorm"

        def run(self, model, ctx):
            return PassResult(model, False)

    registry.all_passes()
    with pytest.raises(TypeError, match="taken"):
        registry.register_pass(Clash)
