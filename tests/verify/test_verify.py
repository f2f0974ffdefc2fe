"""The verifier library on ONNX models: it must pass what matches and fail what does not."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from convfuse import runtime, verify
from convfuse.compare import DEFAULT_RTOL, compare, locate, tolerance_for
from convfuse.errors import ConvfuseError, DeviceUnavailableError, InvalidModelError, NotRunnableError
from convfuse.runtime import cuda_in_ort
from convfuse.testing import assert_equivalent
from convfuse.verify import VerifyResult, attribute, verify_onnx
from convfuse.verify.inputs import InputSpec, generate_inputs, load_inputs, parse_shape, resolve_devices
from tests.support import verify_models as vm

verify_module = importlib.import_module("convfuse.verify")  # the name `convfuse.verify` is the function


# =========================================================================== comparison math
def test_tolerance_is_relative_to_the_reference_scale() -> None:
    ref = np.array([100.0, -200.0, 50.0])
    at_limit = ref + np.array([0.0, 200.0 * 0.99e-5, 0.0])  # error just under rtol * max|ref|
    assert compare(ref, at_limit, rtol=1e-5, atol=0.0).passed
    beyond = ref + np.array([0.0, 0.0, 200.0 * 1.01e-5])
    c = compare(ref, beyond, rtol=1e-5, atol=0.0)
    assert not c.passed and c.mismatched == 1
    assert c.scale == 200.0 and c.tolerance == pytest.approx(2e-3)
    assert c.max_rel_error == pytest.approx(1.01e-5)


def test_atol_adds_to_the_relative_tolerance_and_zero_outputs_need_it() -> None:
    zeros = np.zeros(4)
    assert not compare(zeros, zeros + 1e-30, rtol=1e-5, atol=0.0).passed  # scale 0: exact unless atol
    assert compare(zeros, zeros + 1e-30, rtol=1e-5, atol=1e-20).passed


def test_non_finite_values_must_agree_position_by_position() -> None:
    ref = np.array([1.0, np.nan, np.inf, -np.inf])
    assert compare(ref, ref.copy(), rtol=1e-5, atol=0.0).passed
    c = compare(ref, np.array([1.0, 0.0, np.inf, -np.inf]), rtol=1e-5, atol=0.0)
    assert not c.passed and c.max_abs_error == math.inf and c.mismatched == 1
    assert not compare(ref, np.array([np.nan, np.nan, np.inf, -np.inf]), rtol=1e-5, atol=0.0).passed
    assert not compare(ref, np.array([1.0, np.nan, -np.inf, -np.inf]), rtol=1e-5, atol=0.0).passed


def test_integer_and_bool_outputs_match_exactly_whatever_the_tolerance() -> None:
    assert tolerance_for("int64", rtol=0.5, atol=10.0) == (0.0, 0.0, True)
    assert tolerance_for("bool") == (0.0, 0.0, True)
    ref = np.array([1, 2, 3], np.int64)
    c = compare(ref, np.array([1, 2, 4], np.int64), rtol=0.0, atol=0.0, exact=True)
    assert not c.passed and c.max_abs_error == 1.0
    assert compare(ref, ref.copy(), rtol=0.0, atol=0.0, exact=True).passed


def _rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` stored in ``dtype`` and read back as float64 (bfloat16 through its bits)."""
    if dtype == "bfloat16":
        return runtime.bfloat16_values(runtime.bfloat16_bits(values)).astype(np.float64)
    return values.astype(dtype).astype(np.float64)


@pytest.mark.parametrize("dtype", sorted(DEFAULT_RTOL))
def test_default_tolerance_passes_rounding_and_fails_a_real_error(dtype: str) -> None:
    """Each dtype's default: a sum of 64 products rounded to the dtype at every step passes; one
    element off by twice the tolerance fails (the default is neither too tight nor too loose)."""
    rtol, atol, exact = tolerance_for(dtype)
    assert rtol == DEFAULT_RTOL[dtype] and atol == 0.0 and not exact
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 64)), rng.standard_normal(64)
    ref = a @ b
    acc = np.zeros(256)
    for j in range(64):  # accumulate in the dtype, as a kernel of that type does
        acc = _rounded(acc + _rounded(_rounded(a[:, j], dtype) * _rounded(b[j : j + 1], dtype), dtype), dtype)
    assert compare(ref, acc, rtol=rtol, atol=0.0, exact=False).passed
    wrong = ref.copy()
    wrong[7] += 2 * rtol * np.abs(ref).max()
    assert not compare(ref, wrong, rtol=rtol, atol=0.0, exact=False).passed


def test_default_tolerances_order_by_precision() -> None:
    """Twin of the above: a wider type never gets a looser default than a narrower one."""
    order = ["float64", "float32", "float16", "bfloat16"]  # by significand bits: 53, 24, 11, 8
    assert sorted(DEFAULT_RTOL) == sorted(order)
    assert [DEFAULT_RTOL[d] for d in order] == sorted(DEFAULT_RTOL[d] for d in order)
    assert tolerance_for("float32") == (DEFAULT_RTOL["float32"], 0.0, False)
    assert tolerance_for("float16", rtol=0.1, atol=1e-3) == (0.1, 1e-3, False)


def _ring(shape: tuple[int, ...], width: int) -> np.ndarray:
    """A [1, 1, *shape] mask, True on a border ring of ``width``."""
    mask = np.ones(shape, bool)
    mask[tuple(slice(width, n - width) for n in shape)] = False
    return mask[None, None]


@pytest.mark.parametrize("width", [1, 2, 3])
def test_locate_names_a_border_ring_and_its_width(width: int) -> None:
    assert locate(_ring((16, 16), width) * 1.0, 0.5, 2) == ("border", width)
    assert locate(_ring((12, 12, 12), width) * 1.0, 0.5, 2) == ("border", width)  # 3D too
    sparse = np.zeros((1, 1, 16, 16))
    sparse[0, 0, width - 1, 7] = 1.0  # one failing element is enough when the rest is clean
    assert locate(sparse, 0.5, 2) == ("border", width)


def test_locate_interior_and_everywhere() -> None:
    inner = np.zeros((1, 1, 16, 16))
    inner[0, 0, 5:9, 6:8] = 1.0
    assert locate(inner, 0.5, 2) == ("interior", None)
    both = inner.copy()
    both[0, 0, 0, 3] = 1.0
    assert locate(both, 0.5, 2) == ("everywhere", None)
    wide = _ring((16, 16), 6) * 1.0  # deeper than a few pixels: not a padding signature
    assert locate(wide, 0.5, 2) == ("everywhere", None)
    assert locate(np.ones((1, 1, 2, 8)), 0.5, 2) == (None, None)  # grid too small to tell
    assert locate(np.zeros((1, 1, 8, 8)), 0.5, 2) == (None, None)  # nothing fails


def test_locate_does_not_call_noise_at_the_tolerance_a_border_error() -> None:
    """Errors of one size everywhere that cross the tolerance only at the edge are not a place."""
    rng = np.random.default_rng(0)
    noise = rng.uniform(0.0, 0.9e-5, (2, 4, 16, 16))
    noise[0, 1, 0, 5] = 1.1e-5  # one element just over a 1e-5 tolerance, on the edge
    assert locate(noise, 1e-5, 2) == ("everywhere", None)
    noise[0, 1, 0, 5] = 1e-3  # a hundred times the interior error: a real border error
    assert locate(noise, 1e-5, 2) == ("border", 1)
    inside = rng.uniform(0.0, 0.9e-5, (1, 1, 16, 16))
    inside[0, 0, 8, 8] = 1.1e-5
    assert locate(inside, 1e-5, 2) == ("everywhere", None)


def test_compare_reports_border_and_interior_error() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 1, 4, 10, 10))
    cand = ref + 1e-9 * rng.standard_normal(ref.shape)
    cand[..., 0, :] += 0.5  # top row wrong
    c = compare(ref, cand, rtol=1e-5, atol=0.0, spatial_from=3)
    assert (c.location, c.border_width) == ("border", 1)
    assert c.interior_max_abs_error is not None and c.interior_max_abs_error <= c.tolerance


# =========================================================================== ONNX models
def test_identical_models_pass_from_proto_and_from_path(tmp_path) -> None:
    ref = vm.padded_chain()
    result = verify_onnx(ref, ref)
    assert result.passed and result.exit_code == 0
    assert [c.max_abs_error for c in result.checks] == [0.0]
    assert result.devices == ("cpu",) and result.samples == 2 and result.seed == 0
    onnx.save(ref, tmp_path / "ref.onnx")
    onnx.save(ref, tmp_path / "cand.onnx")
    from_path = verify(str(tmp_path / "ref.onnx"), tmp_path / "cand.onnx")  # str and PathLike
    assert from_path.passed and from_path.reference.endswith("ref.onnx")


def test_an_exact_merge_passes_with_the_default_fp32_tolerance() -> None:
    """Positive twin of the border test: conv2 without padding merges exactly into one 5x5 conv."""
    result = verify_onnx(vm.unpadded_chain(), vm.exact_merge(), samples=3)
    assert result.passed, result.to_text()
    (check,) = result.checks
    assert 0 < check.max_rel_error < 1e-6  # float32 rounding of the composed kernel, far under 1e-5


@pytest.mark.parametrize("key", ["conv1.w", "conv2.w"])
@pytest.mark.parametrize("which", ["largest", "median"])
def test_one_weight_off_by_1e_3_relative_is_caught_and_attributed(key: str, which: str) -> None:
    params = vm.chain_params()
    changed = {k: v.copy() for k, v in params.items()}
    flat = changed[key].reshape(-1)
    magnitude = np.abs(flat)
    i = int(np.argmax(magnitude)) if which == "largest" else int(np.argsort(magnitude)[flat.size // 2])
    flat[i] = np.float32(flat[i] * (1 + 1e-3))
    result = verify_onnx(vm.padded_chain(params), vm.padded_chain(changed))
    assert not result.passed and result.exit_code == 1
    (check,) = result.checks
    assert check.comparison is not None and check.comparison.location == "everywhere"
    (suspect,) = result.suspects
    node = key.split(".")[0]
    assert suspect.candidate_nodes == (f"Conv '{node}'",)
    assert suspect.reference_nodes == (f"Conv '{node}'",)


def test_naive_merge_of_a_padded_chain_is_caught_as_a_border_error() -> None:
    result = verify_onnx(vm.padded_chain(), vm.naive_merge())
    assert not result.passed
    (check,) = result.checks
    c = check.comparison
    assert c is not None and (c.location, c.border_width) == ("border", 1)
    assert c.interior_max_abs_error is not None and c.interior_max_abs_error <= c.tolerance
    channels, size = vm.CHANNELS[2], vm.SIZE
    ring = size * size - (size - 2) ** 2
    assert 0.9 * ring * channels * 2 <= c.mismatched <= ring * channels * 2  # 2 samples, ring only
    assert "on the border only (ring width 1" in check.verdict()
    (suspect,) = result.suspects
    assert suspect.candidate_nodes == ("Conv 'merged'",)
    assert suspect.reference_nodes == ("Conv 'conv1'", "Conv 'conv2'")
    assert "padding" in result.to_text()


def test_attribution_names_the_first_wrong_merge_not_the_ones_after_it() -> None:
    ref = vm.two_regions()
    result = verify_onnx(ref, vm.two_regions(merge_first="naive", merge_second="exact"))
    assert not result.passed
    (suspect,) = result.suspects
    assert suspect.check.name == "b" and suspect.candidate_nodes == ("Conv 'merged_a'",)
    assert suspect.reference_nodes == ("Conv 'conv1'", "Conv 'conv2'")
    assert suspect.check.comparison is not None and suspect.check.comparison.location == "border"


def test_attribution_names_a_later_merge_when_the_earlier_one_is_right() -> None:
    ref = vm.two_regions()
    assert verify_onnx(ref, vm.two_regions(merge_second="exact")).passed
    result = verify_onnx(ref, vm.two_regions(merge_second="perturbed"))
    (suspect,) = result.suspects
    assert suspect.check.name == "y" and suspect.candidate_nodes == ("Conv 'merged_b'",)
    assert suspect.reference_nodes == ("Conv 'conv3'", "Conv 'conv4'")


def test_attribution_names_every_region_that_is_wrong_on_its_own() -> None:
    """Two bad merges in series: the second is judged on the reference's values, so both show."""
    result = verify_onnx(vm.two_regions(), vm.two_regions(merge_first="naive", merge_second="perturbed"))
    assert [s.candidate_nodes for s in result.suspects] == [("Conv 'merged_a'",), ("Conv 'merged_b'",)]
    first, second = (s.check.comparison for s in result.suspects)
    assert first is not None and first.location == "border"
    assert second is not None and second.location == "everywhere" and second.max_rel_error < 1e-3


def test_attribution_runs_each_region_alone_so_noise_downstream_is_not_blamed(monkeypatch) -> None:
    """One weight 5e-4 off in conv9 of 16: downstream errors hover at the tolerance and cross it
    here and there; judged from the full run alone, a later Relu would be blamed too."""
    ref, cand = vm.deep_chain(16, channels=32), vm.deep_chain(16, perturb=9, channels=32, factor=1.0005)
    result = verify_onnx(ref, cand)
    assert not result.passed
    assert [s.candidate_nodes for s in result.suspects] == [("Conv 'conv9'",)]
    assert result.suspects[0].check.comparison.location == "everywhere"

    def cannot_run_alone(*args: object, **kwargs: object) -> None:
        raise ConvfuseError("forced")

    monkeypatch.setattr(verify_module.attribution, "_region_alone", cannot_run_alone)
    fallback = verify_onnx(ref, cand)
    assert len(fallback.suspects) > 1 and fallback.suspects[0].candidate_nodes == ("Conv 'conv9'",)
    assert any("could not run the region of 'c9' alone (forced)" in n for n in fallback.notes)


def test_attribution_can_be_turned_off_and_called_alone() -> None:
    ref, cand = vm.two_regions(), vm.two_regions(merge_first="naive")
    assert verify_onnx(ref, cand, attribution=False).suspects == ()
    suspects = attribute(ref, cand, shapes=None, samples=1)
    assert [s.check.name for s in suspects] == ["b"]
    assert attribute(ref, ref) == ()


def test_attribution_follows_aliases_for_renamed_tensors() -> None:
    cand = vm.two_regions(merge_first="naive")
    for node in cand.graph.node:  # a front end that renamed the merged output
        node.output[:] = ["b_merged" if o == "b" else o for o in node.output]
        node.input[:] = ["b_merged" if i == "b" else i for i in node.input]
    (without,) = attribute(vm.two_regions(), cand)
    assert without.check.name == "r"  # first shared tensor after the renamed one
    (with_alias,) = attribute(vm.two_regions(), cand, aliases={"b_merged": "b"})
    assert with_alias.check.name == "b_merged" and with_alias.candidate_nodes == ("Conv 'merged_a'",)


def test_verification_does_not_change_the_caller_models() -> None:
    ref, cand = vm.two_regions(), vm.two_regions(merge_first="naive")
    before = (ref.SerializeToString(), cand.SerializeToString())
    assert not verify_onnx(ref, cand).passed
    assert (ref.SerializeToString(), cand.SerializeToString()) == before


def test_several_inputs_and_outputs_of_several_dtypes() -> None:
    ref = vm.multi_io()
    result = verify_onnx(ref, vm.multi_io(reorder=True), samples=3, seed=5)
    assert result.passed, result.to_text()
    assert [c.name for c in result.checks] == ["y", "z", "idx"]
    assert [c.dtype for c in result.checks] == ["float32", "float32", "int64"]
    assert [c.exact for c in result.checks] == [False, False, True]
    assert [(i.name, i.dtype) for i in result.inputs] == [
        ("x", "float32"),
        ("s", "float32"),
        ("k", "int64"),
        ("m", "bool"),
    ]

    shifted = verify_onnx(ref, vm.multi_io(shift=1e-3))
    assert [c.passed for c in shifted.checks] == [False, True, True]  # only y moves; its argmax holds
    flipped = verify_onnx(ref, vm.multi_io(flip_argmax=True), attribution=False)
    assert [c.passed for c in flipped.checks] == [True, True, False]
    assert flipped.checks[2].max_abs_error >= 1


def test_scalar_inputs() -> None:
    ref = vm.scaled_conv()
    result = verify_onnx(ref, vm.scaled_conv())
    assert result.passed and result.inputs[1] == InputSpec("g", "float32", ())
    given = {"x": np.ones((1, 3, 8, 8), np.float32), "g": np.array(2.0, np.float32)}
    assert verify_onnx(ref, ref, inputs=given).passed


def test_int64_and_bool_inputs_are_generated_deterministically() -> None:
    ports = [
        InputSpec("k", "int64", (2, 50)),
        InputSpec("m", "bool", (2, 50)),
        InputSpec("x", "float16", (3,)),
    ]
    first = generate_inputs(ports, 2, 7)
    again = generate_inputs(ports, 2, 7)
    other = generate_inputs(ports, 2, 8)
    for a, b in zip(first, again):
        assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(first[0]["k"], other[0]["k"])
    assert not np.array_equal(first[0]["k"], first[1]["k"])  # samples differ
    k, m, x = first[0]["k"], first[0]["m"], first[0]["x"]
    assert k.dtype == np.int64 and k.min() >= 0 and k.max() <= 3 and len(np.unique(k)) == 4
    assert m.dtype == np.bool_ and 0 < m.sum() < m.size
    assert x.dtype == np.float16


@pytest.mark.parametrize(
    "elem_type, dtype",
    [
        (TensorProto.FLOAT, "float32"),
        (TensorProto.FLOAT16, "float16"),
        (TensorProto.DOUBLE, "float64"),
        (TensorProto.BFLOAT16, "bfloat16"),
    ],
)
def test_float_dtypes_get_their_own_default_tolerance(elem_type: int, dtype: str) -> None:
    ref = vm.elementwise(elem_type)
    same = verify_onnx(ref, vm.elementwise(elem_type))
    assert same.passed and same.checks[0].dtype == dtype and same.checks[0].rtol == DEFAULT_RTOL[dtype]
    assert same.inputs[0][1] == dtype
    wrong = verify_onnx(ref, vm.elementwise(elem_type, scale=2.2))  # 7% off
    assert not wrong.passed


def test_bfloat16_tensors_are_attributed_too() -> None:
    """A region fed a bfloat16 tensor of the reference; bfloat16 graph inputs and outputs throughout."""
    scaled = verify_onnx(vm.bf16_region(), vm.bf16_region(scale=2.5))
    (suspect,) = scaled.suspects  # every later tensor is computed right from the reference's values
    assert suspect.check.name == "m" and suspect.candidate_nodes == ("Mul 'mul'",)
    leaky = verify_onnx(vm.bf16_region(), vm.bf16_region(leaky=True))
    assert not leaky.passed and leaky.checks[0].dtype == "bfloat16"
    (suspect,) = leaky.suspects
    assert suspect.check.name == "r" and suspect.candidate_nodes == ("Cast 'cast_hf'", "LeakyRelu 'act'")
    assert suspect.check.comparison is not None and suspect.check.comparison.location == "everywhere"


def test_float16_conv_merge_passes_under_the_float16_tolerance() -> None:
    result = verify_onnx(vm.fp16_chain(), vm.fp16_chain(merged=True))
    assert result.passed, result.to_text()
    assert result.checks[0].dtype == "float16" and 1e-4 < result.checks[0].max_rel_error < 1e-2


def test_symbolic_dims_are_derived_from_the_graph_with_a_note() -> None:
    """Batch 2; two 3x3 pad-1 convs run at 1, and every tap meets data from 3: sizes 1 and 4."""
    ref = vm.padded_chain(dims=["N", 3, "H", "W"])
    result = verify_onnx(ref, ref)
    assert result.passed
    assert result.inputs == (("x", "float32", (2, 3, 1, 1)), ("x", "float32", (2, 3, 4, 4)))
    assert [c.shape for c in result.checks] == [(2, 6, 1, 1), (2, 6, 4, 4)]
    (note,) = [n for n in result.notes if "symbolic" in n]
    assert note == (
        "input 'x' has symbolic dims at axes 0 (N), 2 (H), 3 (W): ran at 2x3x1x1 and 2x3x4x4 "
        "(axis 0: 2 (batch); axes 2, 3: derived from the graph, the smallest size every layer accepts "
        "and a larger one of the other parity; choose with --shape x=DIMS, or shapes= in Python)"
    )
    assert result.summary().endswith("over 2 samples at x 2x3x1x1 and 2x3x4x4")
    assert "inputs: x float32 2x3x1x1 and 2x3x4x4" in result.to_text()


def test_symbolic_dims_too_small_at_1_run_at_the_derived_sizes() -> None:
    """Twin of the old default (every symbolic dim 1), at which ONNX Runtime cannot run a valid conv."""
    ref = vm.unpadded_chain()
    for v in ref.graph.input[0].type.tensor_type.shape.dim[2:]:
        v.dim_param = "S"
    ref.graph.output[0].type.tensor_type.shape.Clear()
    result = verify_onnx(ref, ref)
    assert result.passed and result.inputs == (("x", "float32", (1, 3, 3, 3)), ("x", "float32", (1, 3, 4, 4)))
    with pytest.raises(NotRunnableError, match="failed to run the reference"):
        verify_onnx(ref, ref, shapes={"x": (1, 3, 2, 2)})  # a given size is used as given
    assert verify_onnx(ref, ref, shapes={"x": (1, 3, 9, 9)}).inputs == (("x", "float32", (1, 3, 9, 9)),)


def test_symbolic_dims_take_the_given_shape() -> None:
    dims = ["N", 3, "H", "W"]
    ref, cand = vm.padded_chain(dims=dims), vm.naive_merge(dims=dims)
    result = verify_onnx(ref, cand, shapes={"x": (2, 3, 12, 20)})
    assert result.inputs == (("x", "float32", (2, 3, 12, 20)),)
    assert not any("symbolic" in n for n in result.notes)
    assert result.checks[0].shape == (2, 6, 12, 20)
    assert result.checks[0].comparison is not None and result.checks[0].comparison.location == "border"


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({"x": (1, 3, 16)}, "does not fit"),
        ({"x": (1, 4, 16, 16)}, "does not fit"),
        ({"nope": (1,)}, "not a model input"),
    ],
)
def test_bad_shapes_are_errors(shapes: dict, message: str) -> None:
    ref = vm.padded_chain(dims=["N", 3, "H", "W"])
    with pytest.raises(ConvfuseError, match=message):
        verify_onnx(ref, ref, shapes=shapes)


def test_parse_shape() -> None:
    assert parse_shape("input=1x3x224x224") == ("input", (1, 3, 224, 224))
    assert parse_shape("a=b=2,3") == ("a=b", (2, 3))
    for bad in ["input", "=1x2", "x=1xa", "x=0x3"]:
        with pytest.raises(ConvfuseError):
            parse_shape(bad)


def test_different_input_or_output_names_are_bad_input() -> None:
    ref = vm.padded_chain()
    renamed_out = vm.padded_chain()
    renamed_out.graph.node[-1].output[0] = "out"
    renamed_out.graph.output[0].name = "out"
    with pytest.raises(
        InvalidModelError, match="same output names.*only in reference: y; only in candidate: out"
    ):
        verify_onnx(ref, renamed_out)
    renamed_in = vm.padded_chain()
    renamed_in.graph.node[0].input[0] = "image"
    renamed_in.graph.input[0].name = "image"
    with pytest.raises(InvalidModelError, match="same input names"):
        verify_onnx(ref, renamed_in)


def test_a_shape_change_is_a_mismatch_not_an_error() -> None:
    result = verify_onnx(vm.unpadded_chain(), vm.naive_merge())  # 14x14 vs 16x16 output
    (check,) = result.checks
    assert not result.passed and check.comparison is None and check.problem == "candidate shape is 1x6x16x16"
    assert "FAIL: candidate shape is 1x6x16x16" in result.to_text()


def test_given_inputs_are_used_and_checked(tmp_path) -> None:
    ref = vm.multi_io()
    rng = np.random.default_rng(0)
    given = {
        "x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
        "s": np.zeros((1, 4, 8, 8), np.float32),
        "k": np.ones((1, 4, 8, 8), np.int64),
        "m": np.ones((1, 4, 8, 8), bool),
    }
    np.savez(tmp_path / "in.npz", **given)
    result = verify_onnx(ref, ref, inputs=load_inputs(tmp_path / "in.npz"))
    assert result.passed and result.samples == 1
    assert verify_onnx(ref, ref, inputs=[given, given]).samples == 2
    with pytest.raises(ConvfuseError, match="declared int64 but the array given is int32"):
        verify_onnx(ref, ref, inputs={**given, "k": given["k"].astype(np.int32)})
    with pytest.raises(ConvfuseError, match="missing m"):
        verify_onnx(ref, ref, inputs={n: a for n, a in given.items() if n != "m"})
    with pytest.raises(ConvfuseError, match="does not fit"):
        verify_onnx(ref, ref, inputs={**given, "x": given["x"][:, :2]})


def test_given_inputs_of_different_shapes_per_sample() -> None:
    ref = vm.padded_chain(dims=["N", 3, "H", "W"])
    naive = vm.naive_merge(dims=["N", 3, "H", "W"])
    rng = np.random.default_rng(0)
    sets = [{"x": rng.standard_normal((1, 3, h, h)).astype(np.float32)} for h in (8, 12)]
    assert verify_onnx(ref, ref, inputs=sets).passed
    result = verify_onnx(ref, naive, inputs=sets)
    assert not result.passed and result.samples == 2 and result.checks[0].comparison.location is None


def test_bad_input_files() -> None:
    with pytest.raises(ConvfuseError, match="does not exist"):
        load_inputs("/nonexistent/in.npz")
    with pytest.raises(InvalidModelError, match="does not exist"):
        verify_onnx("/nonexistent/ref.onnx", vm.padded_chain())


def test_garbage_model_file_is_an_invalid_model(tmp_path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(InvalidModelError, match="garbage.onnx"):
        verify_onnx(path, vm.padded_chain())


def test_a_model_onnxruntime_cannot_load_is_an_error_with_a_clean_message() -> None:
    m = vm.padded_chain()
    m.ir_version = 99
    with pytest.raises(InvalidModelError, match="cannot load the candidate: Unsupported model IR") as e:
        verify_onnx(vm.padded_chain(), m)
    assert "onnxruntime_src" not in str(e.value) and "\n" not in str(e.value)


def test_cuda_requested_without_cuda_raises_device_unavailable() -> None:
    if cuda_in_ort():
        pytest.skip("this machine has CUDA for onnxruntime")
    with pytest.raises(
        DeviceUnavailableError, match="CUDA was requested but onnxruntime has no CUDAExecution"
    ):
        verify_onnx(vm.padded_chain(), vm.padded_chain(), device="cuda")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_a_session_that_falls_back_to_cpu_is_not_a_cuda_run() -> None:
    """ONNX Runtime quietly runs on CPU when its CUDA provider cannot start: that must not pass as CUDA."""
    if cuda_in_ort():
        pytest.skip("this machine has CUDA for onnxruntime")
    with pytest.raises(DeviceUnavailableError, match="could not start its CUDA provider for the reference"):
        runtime.session(vm.padded_chain(), "cuda", "reference")


def test_device_resolution() -> None:
    assert resolve_devices("cpu", lambda: False, "absent") == (["cpu"], [])
    assert resolve_devices("all", lambda: True, "absent") == (["cpu", "cuda"], [])
    assert resolve_devices("cuda", lambda: True, "absent") == (["cuda"], [])
    assert resolve_devices("all", lambda: False, "no GPU") == (["cpu"], ["cuda not checked: no GPU"])
    with pytest.raises(
        DeviceUnavailableError, match="CUDA was requested but no GPU; use device 'cpu' or 'all'"
    ):
        resolve_devices("cuda", lambda: False, "no GPU")


def test_all_devices_runs_cpu_and_says_when_cuda_is_absent() -> None:
    ref = vm.padded_chain()
    if not cuda_in_ort():
        result = verify_onnx(ref, ref, device="all")
        assert result.devices == ("cpu",) and any("cuda not checked" in n for n in result.notes)
    with pytest.raises(ConvfuseError, match="device must be one of"):
        verify_onnx(ref, ref, device="tpu")


def test_result_text_and_dict() -> None:
    result = verify_onnx(vm.padded_chain(), vm.naive_merge())
    assert isinstance(result, VerifyResult)
    text = result.to_text()
    assert (
        text.startswith("FAIL: 1 of 1 output checks differ")
        and "wrong on its own (sample 0): tensor 'y'" in text
    )
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["passed"] is False and data["exit_code"] == 1 and data["devices"] == ["cpu"]
    (out,) = data["outputs"]
    assert out["name"] == "y" and out["location"] == "border" and out["border_width"] == 1
    assert out["tolerance"] == pytest.approx(out["rtol"] * out["scale"])
    assert data["suspects"][0]["candidate_nodes"] == ["Conv 'merged'"]
    assert result.summary().startswith("verified: candidate DIFFERS (1 of 1 checks); max rel err")
    same = verify_onnx(vm.padded_chain(), vm.padded_chain())
    assert same.to_text().startswith("PASS: ")
    assert (
        same.summary()
        == "verified: candidate matches; max rel err 0.0e+00 on cpu over 2 samples at x 1x3x16x16"
    )


def test_verify_rejects_a_mixed_pair() -> None:
    with pytest.raises(ConvfuseError, match="two ONNX models .* or two nn.Modules"):
        verify(vm.padded_chain(), 3)


def test_assert_equivalent() -> None:
    ref = vm.padded_chain()
    assert assert_equivalent(ref, ref).passed
    with pytest.raises(AssertionError, match="(?s)not equivalent.*border"):
        assert_equivalent(ref, vm.naive_merge())
    with pytest.raises(InvalidModelError):  # a broken setup is an error, not a failed assertion
        assert_equivalent("/nonexistent.onnx", ref)


# =========================================================================== properties
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    factor=st.floats(1e-6, 1e6),
    noise=st.floats(1e-9, 1e-3),
)
def test_compare_is_scale_free(seed: int, factor: float, noise: float) -> None:
    """Scaling reference and candidate together does not change the verdict or relative error."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((2, 3, 7, 7))
    cand = ref + noise * rng.standard_normal(ref.shape)
    a = compare(ref, cand, rtol=1e-4, atol=0.0, spatial_from=2)
    b = compare(ref * factor, cand * factor, rtol=1e-4, atol=0.0, spatial_from=2)
    assert a.mismatched == b.mismatched and a.location == b.location
    assert b.max_rel_error == pytest.approx(a.max_rel_error, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    spatial=st.lists(st.integers(8, 24), min_size=1, max_size=3),
    width=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_wrong_ring_is_located_as_a_border_of_its_width(spatial: list[int], width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((1, 2, 3, *spatial))
    cand = ref + 1e-9 * rng.standard_normal(ref.shape)
    ring = np.ones(spatial, bool)
    ring[tuple(slice(width, n - width) for n in spatial)] = False
    cand[..., ring] += 0.1 + rng.random(int(ring.sum()))  # every ring position off, by varying amounts
    c = compare(ref, cand, rtol=1e-5, atol=0.0, spatial_from=3)
    assert (c.location, c.border_width) == ("border", width)
    assert c.interior_max_abs_error is not None and c.interior_max_abs_error <= c.tolerance
