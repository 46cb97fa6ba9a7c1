"""Winograd F(2x2, 3x3) convolutions in the engine's CPU executor file, where they are faster.

ONNX Runtime's CPU convolution is direct: 36 multiply-adds per input channel for each 2x2 block
of output. Winograd's F(2x2, 3x3) (Lavin and Gray, 2015) needs 16: the input's overlapping 4x4
tiles are transformed (B^T d B, additions only), multiplied with the transformed weights
(G g G^T, computed once here) in 16 matrix products over the channels, and transformed back
(A^T m A), written in ONNX ops (a 16-kernel convolution for the input transform, two transposes,
two MatMuls). Against ONNX Runtime's Conv it wins on small images with many channels and loses
on large images with few (the transforms are memory traffic) and at batch 1 (the transformed
weights, 16/9 the size, stream from memory for a single image): the measurements of single
convolutions and of whole steps (benchmarks/winograd_step.py) are in benchmarks/results/.

So ``worth_it`` chooses by shape (a rule, never a timing: the same bits on every run), and the
rewritten graph is a second file beside the executor file (``variant_path``), which sessions of
``MIN_BATCH`` images or more open (``table_chain.session_file``, where the file's seal
names a form). It is written only where the chosen
convolutions hold ``MIN_SHARE`` of the file's convolution work or more: a model whose work is
mostly on large images would gain nothing from a form and pay for a second large file. Both files
are the same function: the transforms' coefficients are 0, +-1 and +-1/2, so fp32 stays close to
the direct convolution (tests/test_winograd.py holds it to 1e-5 relative).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..files import temporary_name

MIN_BATCH = 2
MIN_SHARE = 0.25  # of the multiply-adds of the file's convolutions
SUFFIX = ".winograd"  # beside executor-KEY.onnx: executor-KEY.winograd (pruned with it)

B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
# The input transform as 16 correlation kernels over a tile (index a * 4 + b), and the output
# transform as a [4, 16] matrix (output r * 2 + s of the 2x2 block).
INPUT_KERNELS = np.einsum("ai,bj->abij", B_T, B_T).reshape(16, 1, 4, 4).astype(np.float32)
OUTPUT_MATRIX = np.einsum("ra,sb->rsab", A_T, A_T).reshape(4, 16).astype(np.float32)
# G g G^T of a flattened 3x3 kernel g, as a [9, 16] matrix (float64: the weights' transform is
# rounded once, to float32, at the end).
WEIGHT_MATRIX = np.einsum("ai,bj->ijab", G, G).reshape(9, 16)

Worth = Callable[[int, int, int, int], bool]


def worth_it(c_in: int, c_out: int, height: int, width: int) -> bool:
    """Whether a 3x3 convolution of ``c_in`` to ``c_out`` channels on ``height`` x ``width``
    images runs faster as Winograd (the measurements in benchmarks/results/, with a margin)."""
    if height % 2 or width % 2:
        return False
    if height * width <= 16:
        return c_in >= 512 and c_out >= 512
    if height * width <= 64:
        return min(c_in, c_out) >= 256
    return False


def variant_path(path: Path) -> Path:
    """Where the Winograd form of the executor file ``path`` is kept."""
    return path.with_suffix(SUFFIX)


def write_variant(source: Path, target: Path, worth: Worth | None = None) -> int:
    """Write the Winograd form of the ONNX file ``source`` to ``target`` (atomically), or remove
    ``target`` where ``rewrite`` finds nothing worth it (``worth``: ``worth_it`` unless given).
    Returns the number rewritten."""
    import onnx

    model = onnx.load(str(source))
    count = rewrite(model, worth)
    if not count:
        target.unlink(missing_ok=True)
        return 0
    tmp = temporary_name(target)
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def rewrite(model, worth: Worth | None = None) -> int:
    """Replace, in place, the 3x3 convolutions of ``model`` (stride 1, padding 1, one group,
    weights and bias constant) that ``worth`` (``worth_it`` unless given) chooses by their
    Winograd form, where together they hold ``MIN_SHARE`` of its convolutions' multiply-adds or
    more (else nothing). Returns how many."""
    worth = worth or worth_it
    graph = model.graph
    shapes = _inferred_shapes(model)
    constants = {t.name: t for t in graph.initializer}
    old = list(graph.node)
    plans = [_plan(node, constants, shapes, worth) for node in old]
    work = [_work(node, constants, shapes) for node in old]
    chosen = sum(w for w, plan in zip(work, plans, strict=True) if plan)
    if not chosen or chosen < MIN_SHARE * sum(work):
        return 0
    uses = Counter(name for node in old for name in node.input)
    nodes, count = [], 0
    for node, plan in zip(old, plans, strict=True):
        if plan is None:
            nodes.append(node)
            continue
        nodes += _winograd(node, *plan, graph)
        count += 1
        for name in node.input[1:]:
            uses[name] -= 1
    del graph.node[:]
    graph.node.extend(nodes)
    unused = {name for name in constants if not uses[name]}
    replaced = [i for i, t in enumerate(graph.initializer) if t.name in unused]
    for index in reversed(replaced):  # by index: no copy of the weights that stay
        del graph.initializer[index]
    return count


def rewritten(path: Path) -> int:
    """How many convolutions the Winograd form at ``path`` holds (their product MatMuls, named
    by ``_winograd``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(node.name.endswith("/winograd/m") for node in model.graph.node)


def _inferred_shapes(model) -> dict[str, list[int]]:
    """Every value's shape, by ONNX's shape inference with data propagation (the sizes that
    Reshapes compute), run on a copy whose float weights are inputs of their shapes: the same
    answer without serializing the weights (seconds for a large model). In the copy,
    small values computed from constants alone are constants (``_folded``): the pads of a
    ``torch.nn.functional.pad`` export, through which inference cannot see otherwise."""
    from onnx import ModelProto, TensorProto, helper, shape_inference

    light = ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.node.extend(_folded(model))
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            value = helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            graph.input.append(value)
        else:  # integer constants: the shapes that data propagation reads
            graph.initializer.append(tensor)
    inferred = shape_inference.infer_shapes(light, data_prop=True).graph
    return {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*inferred.value_info, *inferred.output)
    }


# Values computed from constants that are folded for shape inference: shapes and pads, never
# weights, so the folding costs nothing next to the export.
FOLD_MAX_ELEMENTS = 64


def _folded(model) -> list:
    """``model``'s nodes, with each node whose inputs are all small constants (Constant nodes,
    integer initializers, or values folded before it) replaced by Constant nodes of its outputs,
    as ONNX's reference evaluator computes them."""
    from onnx import TensorProto, helper, numpy_helper

    known = {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type != TensorProto.FLOAT and np.prod(t.dims) <= FOLD_MAX_ELEMENTS
    }
    opsets = list(model.opset_import)
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size <= FOLD_MAX_ELEMENTS:
                known[node.output[0]] = value
            nodes.append(node)
            continue
        foldable = (
            node.domain in ("", "ai.onnx")
            and all(name in known for name in node.input if name)
            and not any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)
            and not node.op_type.startswith("Random")
        )
        values = _evaluate(node, known, opsets) if foldable else None
        if values is None or any(v.size > FOLD_MAX_ELEMENTS for v in values):
            nodes.append(node)
            continue
        for name, value in zip(node.output, values, strict=True):
            known[name] = value
            nodes.append(
                helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))
            )
    return nodes


def _evaluate(node, known: dict, opsets: list) -> list[np.ndarray] | None:
    """``node``'s outputs on the values ``known`` (ONNX's reference evaluator), or None where the
    evaluator cannot run it."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    inputs = [name for name in node.input if name]
    graph = helper.make_graph(
        [node],
        "fold",
        [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(known[name].dtype), None
            )
            for name in inputs
        ],
        [helper.make_tensor_value_info(name, 0, None) for name in node.output],
    )
    try:
        outputs = ReferenceEvaluator(helper.make_model(graph, opset_imports=opsets)).run(
            None, {name: known[name] for name in inputs}
        )
    except Exception:  # an op the reference evaluator lacks: left to inference as it is
        return None
    return [np.asarray(value) for value in outputs]


def _work(node, constants: dict, shapes: dict) -> int:
    """Multiply-adds of a convolution with constant weights and a known output size, else 0."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in constants:
        return 0
    shape = shapes.get(node.output[0]) or []
    return int(np.prod(constants[node.input[1]].dims)) * int(np.prod(shape[2:])) if shape else 0


def _plan(node, constants: dict, shapes: dict, worth: Worth):
    """(weight, bias or None, height, width) of a convolution to rewrite, else None."""
    from onnx import helper, numpy_helper

    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if (
        list(attrs.get("strides", [1, 1])) != [1, 1]
        or list(attrs.get("dilations", [1, 1])) != [1, 1]
        or list(attrs.get("pads", [0, 0, 0, 0])) != [1, 1, 1, 1]
        or attrs.get("group", 1) != 1
        or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        or node.input[1] not in constants
    ):
        return None
    weight = numpy_helper.to_array(constants[node.input[1]])
    if weight.dtype != np.float32 or weight.ndim != 4 or weight.shape[2:] != (3, 3):
        return None
    bias = None
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in constants:
            return None
        bias = numpy_helper.to_array(constants[node.input[2]])
    shape = shapes.get(node.output[0])
    if not shape or len(shape) != 4 or not all(shape[1:]):
        return None
    c_out, c_in = weight.shape[:2]
    height, width = shape[2:]
    if not worth(c_in, c_out, height, width):
        return None
    return weight, bias, height, width


def _winograd(node, weight: np.ndarray, bias, height: int, width: int, graph) -> list:
    """The nodes computing ``node``'s output with F(2x2, 3x3); their constants go to ``graph``."""
    from onnx import helper, numpy_helper

    c_out, c_in = weight.shape[:2]
    tiles_h, tiles_w = height // 2, width // 2
    prefix = f"{node.name or node.output[0]}/winograd"

    def name(what: str) -> str:
        return f"{prefix}/{what}"

    def constant(what: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name(what)))
        return name(what)

    def shape(what: str, *dims: int) -> str:
        return constant(what, np.array(dims, np.int64))

    # G g G^T for every (output, input) channel pair, as 16 [c_out, c_in] matrices.
    transformed = weight.reshape(-1, 9).astype(np.float64) @ WEIGHT_MATRIX  # [c_out * c_in, 16]
    products = transformed.T.reshape(16, c_out, c_in).astype(np.float32)
    last = node.output[0] if bias is None else name("y")
    steps = [
        ("Reshape", [node.input[0], shape("planes_shape", -1, 1, height, width)], "planes", {}),
        (
            "Conv",
            [name("planes"), constant("input_kernels", INPUT_KERNELS)],
            "tiles",
            {"strides": [2, 2], "pads": [1, 1, 1, 1]},
        ),  # [B * c_in, 16, H / 2, W / 2]
        ("Reshape", [name("tiles"), shape("v_shape", -1, c_in, 16, tiles_h * tiles_w)], "v", {}),
        ("Transpose", [name("v")], "v_t", {"perm": [2, 1, 0, 3]}),  # [16, c_in, B, T]
        ("Reshape", [name("v_t"), shape("columns_shape", 16, c_in, -1)], "columns", {}),
        ("MatMul", [constant("weights", products), name("columns")], "m", {}),
        ("Reshape", [name("m"), shape("m_shape", 16, -1)], "m_flat", {}),
        ("MatMul", [constant("output_matrix", OUTPUT_MATRIX), name("m_flat")], "blocks", {}),
        (
            "Reshape",
            [name("blocks"), shape("blocks_shape", 2, 2, c_out, -1, tiles_h, tiles_w)],
            "blocks_6d",
            {},
        ),
        ("Transpose", [name("blocks_6d")], "blocks_t", {"perm": [3, 2, 4, 0, 5, 1]}),
        ("Reshape", [name("blocks_t"), shape("y_shape", -1, c_out, height, width)], "y", {}),
    ]
    nodes = [
        helper.make_node(op, inputs, [name(out) if out != "y" else last], name=name(out), **attrs)
        for op, inputs, out, attrs in steps
    ]
    if bias is not None:
        channel_bias = bias.reshape(1, c_out, 1, 1).astype(np.float32)
        nodes.append(
            helper.make_node(
                "Add", [last, constant("bias", channel_bias)], [node.output[0]], name=name("bias")
            )
        )
    return nodes
