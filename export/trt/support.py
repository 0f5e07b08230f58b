"""TensorRT's documented ONNX support, as data: which operators its parser imports, for which tensor types.

Transcribed from onnx-tensorrt's docs/operators.md for TensorRT 10.15 ("supports operators in the inclusive range
of opset 9 to opset 24"); operators marked N there are absent here. Only restrictions a static check can decide
are kept as rules. export/trt/check.py reads these tables; no TensorRT is needed.
"""

from __future__ import annotations

SOURCE = "onnx-tensorrt docs/operators.md, TensorRT 10.15"
OPSET_RANGE = (9, 24)

F = "FP32 FP16 BF16"
FI = "FP32 FP16 BF16 INT32 INT64"
FIB = "FP32 FP16 BF16 INT32 INT64 BOOL"
REDUCE = "FP32 FP16 BF16 INT32 INT64"

# operator -> the tensor types its importer takes
OPERATORS: dict[str, str] = {
    "Abs": FI, "Acos": F, "Acosh": F, "Add": FI, "And": "BOOL", "ArgMax": FI, "ArgMin": FI, "Asin": F, "Asinh": F,
    "Atan": F, "Atanh": F, "Attention": "FP32 FP16 BF16 INT8 FP8", "AveragePool": F, "BatchNormalization": F,
    "BlackmanWindow": "FP32 FP16", "Cast": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "CastLike": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL", "Ceil": F, "Celu": F, "Clip": F, "Concat": FIB,
    "Constant": "FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL",
    "ConstantOfShape": "FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL", "Conv": F, "ConvTranspose": F, "Cos": F,
    "Cosh": F, "CumSum": F, "DeformConv": "FP32 FP16", "DepthToSpace": FI, "DequantizeLinear": "INT8 FP8 FP4 INT4",
    "Div": FI, "Dropout": F, "Einsum": F, "Elu": F, "Equal": FI, "Erf": F, "Exp": F, "Expand": FIB, "EyeLike": FIB,
    "Flatten": FIB, "Floor": F, "Gather": FIB, "GatherElements": FIB, "GatherND": FIB,
    "Gelu": "FP32 FP16 BF16 INT8 INT32 INT64", "Gemm": F, "GlobalAveragePool": F, "GlobalLpPool": F,
    "GlobalMaxPool": F, "Greater": FI, "GreaterOrEqual": FI, "GridSample": "FP32 FP16", "GroupNormalization": F,
    "GRU": F, "HammingWindow": "FP32 FP16", "HannWindow": "FP32 FP16", "HardSigmoid": F, "HardSwish": F,
    "Hardmax": F, "Identity": FIB, "If": FIB, "ImageScaler": F, "InstanceNormalization": F, "IsInf": F,
    "IsNaN": FI, "LayerNormalization": F, "LeakyRelu": F, "Less": FI, "LessOrEqual": FI, "Log": F,
    "LogSoftmax": F, "Loop": FIB, "LRN": F, "LSTM": F, "LpNormalization": F, "LpPool": F, "MatMul": F, "Max": FI,
    "MaxPool": F, "Mean": "FP32 FP16 BF16 FP8 INT32 INT64", "MeanVarianceNormalization": F, "Min": FI,
    "Mish": "FP32 FP16", "Mod": FI, "Mul": FI, "Neg": FI, "NonMaxSuppression": "FP32 FP16", "NonZero": "FP32 FP16",
    "Not": "BOOL", "OneHot": FIB, "Or": "BOOL", "Pad": FI, "ParametricSoftplus": F, "Pow": FI, "PRelu": F,
    "QuantizeLinear": F, "RandomNormal": F, "RandomNormalLike": F, "RandomUniform": F, "RandomUniformLike": F,
    "Range": FI, "Reciprocal": F, "ReduceL1": REDUCE, "ReduceL2": REDUCE, "ReduceLogSum": REDUCE,
    "ReduceLogSumExp": REDUCE, "ReduceMax": REDUCE, "ReduceMean": REDUCE, "ReduceMin": REDUCE,
    "ReduceProd": REDUCE, "ReduceSum": REDUCE, "ReduceSumSquare": REDUCE, "Relu": FI, "Reshape": FIB, "Resize": F,
    "ReverseSequence": FIB, "RMSNormalization": F, "RNN": F, "RoiAlign": "FP32 FP16", "RotaryEmbedding": F,
    "Round": F, "STFT": "FP32", "ScaledTanh": F, "Scan": F, "Scatter": FI, "ScatterElements": FI, "ScatterND": FI,
    "Selu": F, "Shape": FIB, "Shrink": FI, "Sigmoid": F, "Sign": FI, "Sin": F, "Sinh": F, "Size": FIB, "Slice": FIB,
    "Softmax": F, "Softplus": F, "Softsign": F, "SpaceToDepth": FI, "Split": FIB, "Sqrt": F, "Squeeze": FIB,
    "Sub": FI, "Sum": FI, "Tan": F, "Tanh": F, "TensorScatter": "FP32 FP16 BF16 INT32", "ThresholdedRelu": F,
    "Tile": FIB, "TopK": FI, "Transpose": FIB, "Trilu": FIB, "Unsqueeze": FIB, "Upsample": F, "Where": FIB,
    "Xor": "BOOL",
}

# Inputs that carry indices, shapes, axes, counts or conditions rather than the data the type list is about.
INDEX_INPUTS: dict[str, tuple[int, ...]] = {
    "Gather": (1,), "GatherElements": (1,), "GatherND": (1,), "Scatter": (1,), "ScatterElements": (1,),
    "ScatterND": (1,), "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Squeeze": (1,),
    "Unsqueeze": (1,), "Split": (1,), "TopK": (1,), "Pad": (1, 3), "ConstantOfShape": (0,), "OneHot": (0, 1),
    "CumSum": (1,), "Trilu": (1,), "Resize": (1, 2, 3), "Loop": (0, 1), "If": (0,), "Where": (0,),
    "Shape": (0,), "Size": (0,), "Cast": (0,), "CastLike": (0,), "RotaryEmbedding": (3,), "TensorScatter": (2,),
    **{name: (1,) for name in OPERATORS if name.startswith("Reduce")},
}

# Inputs the importer needs as build-time constants (initializers or Constant outputs), from the restrictions.
CONSTANT_INPUTS: dict[str, dict[int, str]] = {
    **{name: {1: "`axes` must be an initializer"} for name in OPERATORS if name.startswith("Reduce")},
    "CumSum": {1: "`axis` must be a build-time constant"},
}

# (attribute, value it must have when present) per operator, from the restrictions.
ATTRIBUTE_RULES: dict[str, tuple[tuple[str, object], ...]] = {
    "ScatterND": (("reduction", "none"),),
    "TopK": (("sorted", 1),),
    "LSTM": (("input_forget", 0), ("layout", 0)),
}

# ONNX TensorProto element type -> the name operators.md uses; the rest (INT16, UINT16/32/64, STRING,
# COMPLEX, ...) TensorRT does not take at all. DOUBLE is cast down to FP32 by the parser.
ONNX_TYPES: dict[int, str] = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8",
                              3: "INT8", 17: "FP8", 22: "INT4", 23: "FP4", 11: "FP32"}
DOUBLE = 11

# Elementwise and matrix operators whose floating-point inputs must share one type in a strongly typed network
# (TensorRT inserts no casts there); the ONNX checker lets some of these differ (Pow's exponent, Where's branches
# across graph boundaries), so they are checked again.
SAME_TYPE_OPERATORS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "MatMul", "Gemm", "Einsum", "Concat", "Where",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Mod", "PRelu",
})
