"""Compare CPU inference runtimes of one trained classifier on the same texts.

    python scripts/inference_speed.py --ckpt <run folder> [--texts 300] [--repeats 2]

Variants, each timed on the run's test split (``splits/test.csv``) in this process,
interleaved ``--repeats`` times (best time kept, since the machine is shared):

- ``torch``: ``TextClassifier`` as ``predict.py`` runs it (float32);
- ``onnxruntime``: an ``export.py format=onnx`` export of the same run (float32);
- ``torch int8``: PyTorch's dynamic int8 quantisation of every ``nn.Linear``;
- ``onnxruntime int8``: ONNX Runtime's dynamic int8 quantisation of that export.

It prints messages/s, the speed-up over ``torch``, how many labels agree with ``torch``
and the largest probability difference. Needs ``pip install -e ".[onnx]"``.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import warnings
from pathlib import Path

import torch

from gpt_classifier.inference import TextClassifier


def timed(classifier: TextClassifier, ids: list[list[int]]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    probs = classifier.probabilities_from_ids(ids)
    return time.perf_counter() - start, probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a training run folder")
    parser.add_argument("--texts", type=int, default=300, help="first N test-split texts")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    run = Path(args.ckpt)
    with (run / "splits" / "test.csv").open(encoding="utf-8", newline="") as f:
        texts = [row["Text"] for row in csv.DictReader(f)][: args.texts]

    base = TextClassifier.load(run)
    ids, _ = base.encode(texts)
    variants = {"torch": base}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = base.export(Path(tmp) / "onnx", format="onnx")
        variants["onnxruntime"] = TextClassifier.load(onnx_dir)
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated; measured anyway
            warnings.simplefilter("ignore")
            int8 = TextClassifier.load(run)
            int8.model = torch.ao.quantization.quantize_dynamic(
                int8.model, {torch.nn.Linear}, dtype=torch.qint8
            )
        variants["torch int8"] = int8
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = Path(tmp) / "onnx-int8"
        quantized.mkdir()
        for name in ("config.json",):
            (quantized / name).write_bytes((onnx_dir / name).read_bytes())
        quantize_dynamic(onnx_dir / "model.onnx", quantized / "model.onnx",
                         weight_type=QuantType.QInt8)  # fmt: skip
        variants["onnxruntime int8"] = TextClassifier.load(quantized)

        for classifier in variants.values():  # warm-up
            classifier.probabilities_from_ids(ids[:8])
        best: dict[str, float] = {}
        probs: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name, classifier in variants.items():
                seconds, probs[name] = timed(classifier, ids)
                best[name] = min(best.get(name, float("inf")), seconds)

    ref = probs["torch"]
    print(f"{run}: {len(texts)} test-split texts, {torch.get_num_threads()} threads")
    print("| runtime | msg/s | x torch | labels agree | max abs prob diff |\n|---|---|---|---|---|")
    for name in variants:
        agree = (probs[name].argmax(1) == ref.argmax(1)).float().mean().item()
        diff = (probs[name] - ref).abs().max().item()
        print(f"| {name} | {len(texts) / best[name]:.2f} | {best['torch'] / best[name]:.2f} | "
              f"{agree:.2%} | {diff:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
