"""Time one cached training step of the last block: forward, backward, AdamW.

The step that ``freeze=last_block`` repeats once the prefix cache holds every message:
hidden states after the frozen blocks in, the last block at the pooled positions, the
head, cross-entropy, a fused AdamW step over what trains. Each variant runs in its own
process (the malloc setting is process-wide), over the same real SMS batches twice: the
first pass meets each batch's shapes for the first time, the second has seen them all.

Example::

    python scripts/step_speed.py --data ../shared/data/sms_spam_collection/SMSSpamCollection

``--compare-repo DIR`` instead times the default step (row rounding, ``keep_freed_memory``,
folding) of this checkout and another one in turn, ``--repeats`` times.

Variants: float32 or bf16-mixed (autocast), ``keep_freed_memory`` on or off, the
pooled path's row rounding (``CPU_ROW_MULTIPLE``) on or off (1 row), and the folding of
the key and value layers into the query on or off (off: a no-op forward hook on the key
layer, which is what turns it off for LoRA and hooks too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [  # (precision, keep freed memory, row multiple, fold keys and values)
    ("32-true", False, 1, False),
    ("32-true", True, 64, False),
    ("32-true", True, 64, True),
    ("bf16-mixed", False, 1, False),
    ("bf16-mixed", True, 1, False),
    ("bf16-mixed", False, 64, False),
    ("bf16-mixed", True, 64, False),
    ("bf16-mixed", True, 64, True),
]


def measure(args: argparse.Namespace) -> dict:
    """One variant, in this process: ms per step (first and second pass), faults per step."""
    import torch
    import torch.nn.functional as F

    import gpt_classifier.model.gpt as gpt
    from gpt_classifier.data.datamodule import SMSSpamDataModule
    from gpt_classifier.finetuning.methods import TrainLastBlocks
    from gpt_classifier.host_memory import keep_freed_memory
    from gpt_classifier.model.classifier import CachedPrefix, SequenceClassifier

    if args.keep_freed:
        keep_freed_memory()
    gpt.CPU_ROW_MULTIPLE = args.row_multiple
    dm = SMSSpamDataModule(path=args.data, book_compat=True)
    dm.setup("fit")
    torch.manual_seed(0)
    model = SequenceClassifier(gpt.GPT.from_preset(args.model))
    TrainLastBlocks(1).apply(model)
    model.train()
    if not args.fold:  # a hook on the key layer must see its calls: no folding
        model.backbone.trf_blocks[-1].att.W_key.register_forward_hook(lambda *_: None)
    batches = []
    for batch in dm.train_dataloader():
        # Stand-ins for the cached hidden states: the step's cost does not depend on them.
        hidden = torch.randn(*batch["input_ids"].shape, model.cfg.emb_dim)
        batch["prefix"] = CachedPrefix(hidden, model.cfg.n_layers - 1)
        batches.append(batch)
        if len(batches) == args.steps:
            break
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1, fused=True)
    bf16 = args.precision == "bf16-mixed"

    def one_pass() -> tuple[float, float]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(batch["input_ids"], batch["lengths"], prefix=batch["prefix"])
            F.cross_entropy(logits.float(), batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return 1e3 * seconds / len(batches), faults / len(batches)

    first_ms, first_faults = one_pass()
    second_ms, _ = one_pass()
    return {"precision": args.precision, "keep_freed_memory": args.keep_freed,
            "row_multiple": args.row_multiple, "fold": args.fold,
            "first_pass_ms": round(first_ms, 1),
            "second_pass_ms": round(second_ms, 1),
            "faults_per_step": round(first_faults)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="path of the SMS file (data.path)")
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--steps", type=int, default=40, help="batches in each pass")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every variant")
    parser.add_argument(
        "--compare-repo", metavar="DIR",
        help="another checkout (e.g. a git worktree of the parent): its default step and "
        "this one's, alternating --repeats times",
    )  # fmt: skip
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="32-true", help=argparse.SUPPRESS)
    parser.add_argument("--keep-freed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row-multiple", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--fold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    # Each run of this checkout's variants, or with --compare-repo the default step (fold
    # on) of both checkouts in turn, so that a noisy machine slows both alike.
    codes = [("this", REPO)] + ([("other", args.compare_repo)] if args.compare_repo else [])
    variants = [v for v in VARIANTS if v[1:] == (True, 64, True)] if args.compare_repo else VARIANTS
    print(f"# {args.model}, {args.steps} batches of 8, last block; {os.cpu_count()} cores")
    columns = ["code", "precision", "keep_freed_memory", "row_multiple", "fold",
               "first_pass_ms", "second_pass_ms", "faults_per_step"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for _ in range(args.repeats):
        for precision, keep, multiple, fold in variants:
            for label, repo in codes:
                env = {**os.environ, "PYTHONPATH": str(Path(repo).resolve() / "src")}
                command = [sys.executable, __file__, "--one", "--data", args.data, "--model",
                           args.model, "--steps", str(args.steps), "--precision", precision,
                           "--row-multiple", str(multiple), *(["--keep-freed"] if keep else []),
                           *(["--fold"] if fold else [])]  # fmt: skip
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                row = {"code": label, **json.loads(out.stdout.strip().splitlines()[-1])}
                print("| " + " | ".join(str(row[c]) for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
