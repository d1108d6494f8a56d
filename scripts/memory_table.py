"""Memory and time per model size x fine-tuning method x strategy x precision.

Two tables:

- ``--paper``: what one GPU holds, worked out from the model (parameters, gradients,
  AdamW state, activations for a batch of 8 x 120 tokens), for one GPU, DDP on 8 GPUs
  and FSDP (full shard) on 8 GPUs, and whether it fits in 80 GB.
- ``--measure``: ``train.py`` runs on this machine: the first process's peak resident
  memory and the seconds per training step, from two runs of K and 3K steps (the
  difference removes start-up and weights; the prefix pass is left out of both).

Examples::

    python scripts/memory_table.py --paper
    python scripts/memory_table.py --measure --models gpt2-small --freeze last_block,lora,all \
        --trainers default,ddp_sim -- data.path=../shared/data/sms_spam_collection/SMSSpamCollection
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

GB = 1e9
TOKENS = 8 * 120  # batch 8 x 120 tokens (the SMS data's longest training message)
GPUS = 8
GPU_GB = 80
# Bytes each block keeps per token for its backward pass, in units of the width d,
# without dropout and with fused attention (no T x T scores): the inputs of the two
# LayerNorms (2 x 1), of the q/k/v projection (1), q, k, v (3), the attention output
# (1), the MLP input (1), GELU's input and output (2 x 4): 17 d values; 4 bytes each
# in float32, about 2.4 on average under bf16-mixed (matmul inputs saved in bfloat16).
ACTIVATION_BYTES = {"32-true": 17 * 4, "bf16-mixed": 17 * 2.4}
WEIGHT_BYTES = {"32-true": 4, "bf16-mixed": 4}  # bf16-mixed keeps float32 weights


def model_counts(size: str, method_name: str) -> dict[str, int]:
    """Parameters, trainable parameters, the largest block and which blocks keep
    activations, for a preset and a fine-tuning method (built on the meta device)."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from gpt_classifier.model.classifier import SequenceClassifier
    from gpt_classifier.model.config import preset_config
    from gpt_classifier.model.gpt import GPT

    cfg = preset_config(size)
    with torch.device("meta"):
        model = SequenceClassifier(GPT(cfg), 2, "last_token", head_seed=None)
    method = instantiate(OmegaConf.load(REPO / "configs" / "freeze" / f"{method_name}.yaml"))
    method.apply(model)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = model.backbone.trf_blocks
    trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    # From the first block that trains on, every block's input needs a gradient.
    first = trains.index(True) if True in trains else len(blocks)
    return {
        "params": params, "trainable": trainable, "layers": cfg.n_layers, "width": cfg.emb_dim,
        "block": sum(p.numel() for p in blocks[0].parameters()),
        "active_blocks": len(blocks) - first,
    }  # fmt: skip


def paper_row(size: str, method: str, precision: str, strategy: str) -> dict[str, object]:
    c = model_counts(size, method)
    shards = GPUS if strategy == "fsdp" else 1
    weights = c["params"] * WEIGHT_BYTES[precision] / shards
    if strategy == "fsdp":  # a block gathered whole, and the next one prefetched
        weights += 2 * c["block"] * (2 if precision == "bf16-mixed" else 4)
    grads = c["trainable"] * 4 / shards
    optimizer = c["trainable"] * 8 / shards  # AdamW: two float32 moments
    # The last block runs at the pooled position only: count it like the others (upper bound).
    activations = c["active_blocks"] * TOKENS * c["width"] * ACTIVATION_BYTES[precision]
    total = weights + grads + optimizer + activations
    return {
        "model": size, "method": method, "precision": precision,
        "strategy": {"single": "1 GPU", "ddp": f"DDP x{GPUS}", "fsdp": f"FSDP x{GPUS}"}[strategy],
        "trainable": f"{c['trainable']:,}", "weights_gb": weights / GB, "grads_gb": grads / GB,
        "optimizer_gb": optimizer / GB, "activations_gb": activations / GB,
        "total_gb": total / GB, f"fits_{GPU_GB}gb": "yes" if total < GPU_GB * GB * 0.9 else "no",
    }  # fmt: skip


def measure(model: str, method: str, trainer: str, steps: int, extra: list[str]) -> dict:
    """Peak RSS (first process) and seconds per step of ``train.py`` on this machine."""
    fits = []
    peak = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for n in (steps, 3 * steps):
            out = Path(tmp) / f"run{n}"
            command = [
                sys.executable, "train.py", f"model={model}", "model.pretrained=false",
                f"freeze={method}", f"trainer={trainer}", "trainer.precision=32-true",
                f"+trainer.max_steps={n}", "trainer.limit_val_batches=0",
                "trainer.limit_test_batches=1", "callbacks.progress_bar.refresh_rate=0",
                "callbacks.step_checkpoint=null", f"hydra.run.dir={out}", *extra,
            ]  # fmt: skip
            with open(Path(tmp) / f"log{n}.txt", "w") as log:
                process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                _, status, usage = os.wait4(process.pid, 0)
            if status != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n"
                                 + (Path(tmp) / f"log{n}.txt").read_text()[-3000:])  # fmt: skip
            peak = max(peak, usage.ru_maxrss / 2**20)
            metrics = json.loads((out / "metrics.json").read_text())
            # Without the prefix pass: the first run may compute it, the second reuse it.
            fits.append(metrics["time/fit_s"] - metrics["time/prefix_s"])
    return {"model": model, "method": method, "trainer": trainer, "precision": "32-true",
            "peak_rss_gib": round(peak, 2),
            "s_per_step": round((fits[1] - fits[0]) / (2 * steps), 3)}  # fmt: skip


def markdown(rows: list[dict[str, object]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="the worked-out GPU table")
    parser.add_argument("--measure", action="store_true", help="train.py runs on this machine")
    parser.add_argument("--models", default="gpt2-small,gpt2-medium,gpt2-large,gpt2-xl")
    parser.add_argument("--freeze", default="last_block,lora,all")
    parser.add_argument("--trainers", default="default,ddp_sim")
    parser.add_argument("--precisions", default="32-true,bf16-mixed", help="--paper rows")
    parser.add_argument("--strategies", default="single,ddp,fsdp", help="--paper rows")
    parser.add_argument("--steps", type=int, default=4, help="K: runs of K and 3K steps")
    parser.add_argument("extra", nargs="*", help="overrides for every measured run (after --)")
    args = parser.parse_args()
    models, methods = args.models.split(","), args.freeze.split(",")
    if args.paper:
        precisions, strategies = args.precisions.split(","), args.strategies.split(",")
        rows = [paper_row(m, f, p, s) for m in models for f in methods
                for p in precisions for s in strategies]  # fmt: skip
        print(markdown(rows))
    if args.measure:
        rows = []
        for model in models:
            for method in methods:
                for trainer in args.trainers.split(","):
                    start = time.perf_counter()
                    rows.append(measure(model, method, trainer, args.steps, args.extra))
                    print(f"{rows[-1]} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        print(markdown(rows))


if __name__ == "__main__":
    main()
