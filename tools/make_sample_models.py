"""Train the small digits MLP that the README, tests and benchmarks use, and export it to ONNX.

Run from the repository root:  python tools/make_sample_models.py [--out sample_models]

Writes digits_mlp.onnx (64 -> 256 -> 256 -> 10, ReLU), digits_calib.npz (512 training samples)
and digits_test.npz (500 held-out samples). Everything is seeded and the npz files are written with
a fixed zip timestamp, so running the script twice gives byte-identical files.
scikit-learn is used only to load its bundled digits data; training is plain numpy.
"""

import argparse
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SEED = 0
TEST_SIZE = 500
CALIB_SIZE = 512
HIDDEN = 256
CLASSES = 10
EPOCHS = 100
BATCH = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
ZIP_DATE = (2024, 1, 1, 0, 0, 0)


def load_digits_scaled():
    """Digits pixels scaled to [0, 1] (divide by 16) as float32, labels as int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def stratified_split(labels, test_size, rng):
    """Indices (train, test) with each class's share of the test set proportional to its frequency."""
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts * test_size / len(labels)).astype(int)
    leftover = test_size - quotas.sum()
    remainders = counts * test_size / len(labels) - quotas
    quotas[np.argsort(-remainders, kind="stable")[:leftover]] += 1
    test = []
    for cls, quota in zip(classes, quotas):
        members = np.flatnonzero(labels == cls)
        test.extend(rng.permutation(members)[:quota])
    test = np.sort(np.array(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def init_params(rng, sizes):
    """He-initialised weights [in, out] and zero biases for each layer."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
        params.append([weight, np.zeros(fan_out)])
    return params


def forward(params, x):
    """Logits and the per-layer inputs (needed by the backward pass)."""
    inputs = []
    h = x
    for i, (weight, bias) in enumerate(params):
        inputs.append(h)
        h = h @ weight + bias
        if i < len(params) - 1:
            h = np.maximum(h, 0.0)
    return h, inputs


def gradients(params, x, labels):
    """Gradients of the mean cross-entropy w.r.t. every weight and bias."""
    logits, inputs = forward(params, x)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    grad_out = probs
    grad_out[np.arange(len(labels)), labels] -= 1.0
    grad_out /= len(labels)
    grads = [None] * len(params)
    for i in range(len(params) - 1, -1, -1):
        weight, _ = params[i]
        grads[i] = [inputs[i].T @ grad_out, grad_out.sum(axis=0)]
        if i > 0:
            grad_out = (grad_out @ weight.T) * (inputs[i] > 0)
    return grads


def train(x, labels, rng):
    """Mini-batch Adam with cosine learning-rate decay and decoupled weight decay.

    float64 throughout so reruns are exact and the float32 export is not the limiting precision.
    """
    params = init_params(rng, [x.shape[1], HIDDEN, HIDDEN, CLASSES])
    first = [[np.zeros_like(p) for p in layer] for layer in params]
    second = [[np.zeros_like(p) for p in layer] for layer in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    x64 = x.astype(np.float64)
    step = 0
    for epoch in range(EPOCHS):
        rate = LEARNING_RATE * 0.5 * (1 + np.cos(np.pi * epoch / EPOCHS))  # cosine decay to 0
        order = rng.permutation(len(x64))
        for start in range(0, len(order), BATCH):
            batch = order[start:start + BATCH]
            grads = gradients(params, x64[batch], labels[batch])
            step += 1
            for layer, layer_grads, m_layer, v_layer in zip(params, grads, first, second):
                for j, grad in enumerate(layer_grads):
                    m_layer[j] = beta1 * m_layer[j] + (1 - beta1) * grad
                    v_layer[j] = beta2 * v_layer[j] + (1 - beta2) * grad**2
                    m_hat = m_layer[j] / (1 - beta1**step)
                    v_hat = v_layer[j] / (1 - beta2**step)
                    if j == 0:
                        layer[j] *= 1 - rate * WEIGHT_DECAY
                    layer[j] -= rate * m_hat / (np.sqrt(v_hat) + eps)
    return [[p.astype(np.float32) for p in layer] for layer in params]


def export_onnx(params):
    """ONNX graph mixing Gemm and MatMul+Add the way real exporters write Linear layers."""
    (w1, b1), (w2, b2), (w3, b3) = params
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(w1.T), "fc1.weight"),  # [out, in], Linear style
        numpy_helper.from_array(b1, "fc1.bias"),
        numpy_helper.from_array(w2, "fc2.weight"),  # [in, out] for MatMul
        numpy_helper.from_array(b2, "fc2.bias"),
        numpy_helper.from_array(w3, "head.weight"),  # [in, out] for Gemm(transB=0)
        numpy_helper.from_array(b3, "head.bias"),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["fc1/Gemm_output"],
                         name="fc1/Gemm", transB=1),
        helper.make_node("Relu", ["fc1/Gemm_output"], ["fc1/Relu_output"], name="fc1/Relu"),
        helper.make_node("MatMul", ["fc1/Relu_output", "fc2.weight"], ["fc2/MatMul_output"],
                         name="fc2/MatMul"),
        helper.make_node("Add", ["fc2/MatMul_output", "fc2.bias"], ["fc2/Add_output"], name="fc2/Add"),
        helper.make_node("Relu", ["fc2/Add_output"], ["fc2/Relu_output"], name="fc2/Relu"),
        helper.make_node("Gemm", ["fc2/Relu_output", "head.weight", "head.bias"], ["logits"],
                         name="head/Gemm", transB=0),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="onnx_fwlr",
        doc_string="MLP 64-256-256-10 (ReLU) trained on scikit-learn digits; input = pixels / 16.",
    )
    model.ir_version = 9
    helper.set_model_props(model, {"source": "tools/make_sample_models.py",
                                   "input_scaling": "pixels / 16"})
    onnx.checker.check_model(model, full_check=True)
    return model


def save_npz(path, inputs, labels):
    """npz with keys input, labels in that order, written with a fixed zip timestamp."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in (("input", inputs), ("labels", labels)):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE), buffer.getvalue())


def onnx_accuracy(model_path, inputs, labels):
    """Top-1 accuracy of the saved model run in ONNX Runtime."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": inputs})[0]
    return float(np.mean(logits.argmax(axis=1) == labels))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "sample_models")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    x, y = load_digits_scaled()
    rng = np.random.default_rng(SEED)
    train_idx, test_idx = stratified_split(y, TEST_SIZE, rng)
    calib_idx = np.sort(rng.choice(train_idx, size=CALIB_SIZE, replace=False))
    params = train(x[train_idx], y[train_idx], rng)

    model_path = args.out / "digits_mlp.onnx"
    model_path.write_bytes(export_onnx(params).SerializeToString())
    save_npz(args.out / "digits_calib.npz", x[calib_idx], y[calib_idx])
    save_npz(args.out / "digits_test.npz", x[test_idx], y[test_idx])

    print(f"train samples {len(train_idx)}, calib {len(calib_idx)}, test {len(test_idx)}")
    print(f"ONNX Runtime test accuracy: {onnx_accuracy(model_path, x[test_idx], y[test_idx]):.4f}")
    for name in ("digits_mlp.onnx", "digits_calib.npz", "digits_test.npz"):
        path = args.out / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{name}: {path.stat().st_size} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
